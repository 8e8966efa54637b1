"""One real search trial, end to end, split into load, tokenise, train and score, with peak memory.

    python benchmarks/bench_trial.py                      # a cpu-quick trial: MRPC, SmolLM2, inverted_triangle
    python benchmarks/bench_trial.py --task rte --shape rectangle --preset cpu-standard --json out.json
    python benchmarks/bench_trial.py --activation-checkpointing   # the same trial, decoder layers recomputed
    python benchmarks/bench_trial.py --width-multiple 1           # batches padded to their longest row only

It calls `trial.run_trial` as a study's worker does (the preset's fidelity, the study seed) and times
the phases by wrapping the functions that do them: `train.run.prepare` (model and data: "load"),
`train.trainer.encode_example` ("tokenise"), `train.trainer.train` minus its tokenising ("train") and
`train.run.evaluate` ("score", one validation pass per rung). Peak RSS is the process's high-water mark
(VmHWM) after each phase, reset after the script's own first model load, so the last one is the trial's peak.
Needs the task data ($MOLA_DATA_DIR or --data-dir).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from mola_search.allocation import resolve_allocation
from mola_search.search.config import PRESETS, StudyConfig, pin_paths
from mola_search.search.context import resolve_space
from mola_search.trial import TrialRequest, run_trial
from mola_search.train import batching, run, trainer


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-quick", choices=sorted(PRESETS))
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--model", help="default: the preset's (SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", default="inverted_triangle")
    ap.add_argument("--data-dir", dest="data_dir")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a study's --cpus-per-trial)")
    ap.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing",
                    help="recompute each decoder layer in backward (the trial's TrainConfig setting)")
    ap.add_argument("--width-multiple", type=int, dest="width_multiple",
                    help=f"pad batches to multiples of this many positions (default {batching.WIDTH_MULTIPLE})")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.width_multiple:
        batching.WIDTH_MULTIPLE = args.width_multiple

    preset = PRESETS[args.preset]
    train = {**preset.get("train", {}), **({"activation_checkpointing": True} if args.activation_checkpointing else {})}
    study = pin_paths(StudyConfig(**{**preset, "train": train, "task": args.task, "data_dir": args.data_dir,
                                     "cpus_per_trial": args.threads, "preset": args.preset,
                                     **({"model": args.model} if args.model else {})}))
    fidelity = resolve_space(study).fidelity
    seconds: dict[str, float] = defaultdict(float)
    peaks: dict[str, float] = {}

    def timed(module, name: str, phase: str) -> None:
        inner = getattr(module, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                seconds[phase] += time.perf_counter() - t0
                peaks[phase] = _peak_rss_mb()
        setattr(module, name, wrapper)

    timed(run, "prepare", "load")
    timed(trainer, "encode_example", "tokenise")
    timed(run, "train", "train+tokenise")
    timed(run, "evaluate", "score")
    start = time.perf_counter()
    from mola_search.models import decoder_layers, load_base_model

    layers = len(decoder_layers(load_base_model(study.model, device="cpu")[0]))  # converted and cached once
    warm = time.perf_counter() - start
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts from here
    spec = resolve_allocation(args.shape, layers, study.budget or 5 * layers, top_k=2, rank=8)
    spec = type(spec).build(spec.experts, [min(2, e) for e in spec.experts], 8, source=args.shape)
    request = TrialRequest(0, spec.experts, spec.top_k, spec.rank, f"seed:{args.shape}", train_seed=study.seed)
    start = time.perf_counter()
    outcome = run_trial(study.trial_settings(), fidelity, request, lambda *_: False, layers)
    wall = time.perf_counter() - start
    if outcome.failure:
        sys.exit(f"bench_trial: the trial failed: {outcome.failure}")
    phases = {"load": seconds["load"], "tokenise": seconds["tokenise"],
              # a search trial scores its rungs from inside the training loop (a callback at each rung)
              "train": seconds["train+tokenise"] - seconds["tokenise"] - seconds["score"], "score": seconds["score"]}
    phases["other"] = wall - sum(phases.values())
    print(f"{args.preset} trial, {args.task}, {args.shape} ({sum(spec.experts)} experts), {args.threads} thread(s)"
          + (", activation checkpointing" if args.activation_checkpointing else "") + ": "
          f"{wall:.1f} s (the model's first load and conversion before it: {warm:.1f} s)")
    for name, value in phases.items():
        peak = peaks.get("train+tokenise" if name == "train" else name)  # train's includes the rungs' scoring
        print(f"  {name:<9} {value:7.1f} s  {100 * value / wall:5.1f} %"
              + (f"   peak RSS so far {peak:,.0f} MB" if peak else ""))
    print(f"  peak RSS of the trial process: {_peak_rss_mb():,.0f} MB; validation {study.metric} "
          f"{outcome.score:.4f} at rungs {[round(s, 4) for s in outcome.scores]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall_s": wall, "phases_s": phases,
                                               "peak_rss_mb": _peak_rss_mb(), "phase_peaks_mb": peaks,
                                               "scores": outcome.scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
