"""Resident memory over one run: after every training step and every scored batch, printed as a table.

    python benchmarks/bench_memory.py                              # a cpu-standard finalist: MRPC, 1024 examples,
                                                                   # 64 steps, whole validation and test scored
    python benchmarks/bench_memory.py --max-steps 16 --max-train-examples 256
    python benchmarks/bench_memory.py --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 --env LRU_CACHE_CAPACITY=1024
                                                                   # torch's own oneDNN cache sizes (before a2557d6)
    python benchmarks/bench_memory.py --env MALLOC_MMAP_THRESHOLD_=1048576 --env MALLOC_ARENA_MAX=1
    python benchmarks/bench_memory.py --trim --gc                  # malloc_trim(0) / gc.collect() after each step
    python benchmarks/bench_memory.py --no-mkldnn                  # torch.backends.mkldnn.enabled = False
    python benchmarks/bench_memory.py --eval-width-multiple 1      # scoring batches padded to their longest row only
    python benchmarks/bench_memory.py --model tiny-llama-L4 --json out.json --png rss.png

It runs `train.run.prepare` and `train.run.execute` as `mola-train` does (nothing saved) and reads the process's
resident set (VmRSS, and the high-water mark VmHWM) from /proc/self/status and glibc's heap (mallinfo2: bytes in
use, bytes freed but kept, bytes in mmapped chunks) and the process's CPU seconds (a speed measure that the load of
a shared machine does not blur much): after loading, after building the adapter, after each optimizer step (a step
callback) and after each scoring forward (a wrapper around the scorer's `tail_logits`), with the number of examples
scored so far in the split. `--env` re-runs the script in a child process with those variables set, since the
allocator and oneDNN read them when they start (`mola_search` sets oneDNN's cache sizes on import unless they are
set already). docs/performance.md, "Memory over a whole run", has what it measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_ENV_DONE = "_BENCH_MEMORY_ENV_SET"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mb() -> tuple[float, float, float]:
    """glibc's view of the heap in MB: (bytes in use in the arenas, bytes free but kept in them, bytes in
    mmapped chunks), from mallinfo2(); NaN where the C library has none."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return float("nan"), float("nan"), float("nan")
    return info.uordblks / 2**20, info.fordblks / 2**20, info.hblkhd / 2**20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--model", default=None, help="default: mola-train's (SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", dest="data_dir")
    ap.add_argument("--shape", default="inverted_triangle")
    ap.add_argument("--max-train-examples", type=int, default=1024, dest="max_train_examples")
    ap.add_argument("--max-eval-examples", type=int, default=None, dest="max_eval_examples")
    ap.add_argument("--max-steps", type=int, default=64, dest="max_steps")
    ap.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    ap.add_argument("--micro-batch-size", type=int, default=16, dest="micro_batch_size")
    ap.add_argument("--cutoff-len", type=int, default=128, dest="cutoff_len")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-splits", default="validation,test", dest="eval_splits")
    ap.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="run in a child process with this environment variable set (repeatable)")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every step and scored batch")
    ap.add_argument("--gc", action="store_true", help="gc.collect() after every step and scored batch")
    ap.add_argument("--no-mkldnn", action="store_true", dest="no_mkldnn", help="torch.backends.mkldnn.enabled = False")
    ap.add_argument("--width-multiple", type=int, dest="width_multiple",
                    help="pad training batches to multiples of this many positions")
    ap.add_argument("--eval-width-multiple", type=int, dest="eval_width_multiple",
                    help="pad scoring batches to multiples of this many positions")
    ap.add_argument("--every", type=int, default=0, help="print scoring rows every this many examples "
                    "(default: about 8 rows per split)")
    ap.add_argument("--live", action="store_true", help="print every measurement to stderr as it is taken")
    ap.add_argument("--json", help="write the whole curve here")
    ap.add_argument("--png", help="plot the curve here (needs matplotlib)")
    args = ap.parse_args()

    if args.env and not os.environ.get(_ENV_DONE):
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env), **{_ENV_DONE: "1"})
        rc = subprocess.call([sys.executable, *sys.argv], env=env)
        if rc:
            print(f"bench_memory: the child with {args.env} exited with {rc}", file=sys.stderr)
        raise SystemExit(rc)

    import torch

    from mola_search.train import batching, evaluate as scoring, run
    from mola_search.train.run import RunConfig
    from mola_search.train.trainer import TrainConfig

    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    if args.width_multiple:
        batching.WIDTH_MULTIPLE = args.width_multiple
    if args.eval_width_multiple:
        scoring.collate = lambda items, pad_id, multiple=None: batching.collate(items, pad_id,
                                                                                args.eval_width_multiple)

    curve: list[dict] = []
    state = {"phase": "load", "n": 0, "t0": time.perf_counter()}

    def record(phase: str, n: int, width: int | None = None) -> None:
        if args.gc:
            gc.collect()
        if args.trim:
            _malloc_trim()
        rss, hwm = rss_mb()
        used, kept, mapped = heap_mb()
        curve.append({"phase": phase, "n": n, "rss_mb": round(rss, 1), "hwm_mb": round(hwm, 1),
                      "heap_used_mb": round(used, 1), "heap_free_mb": round(kept, 1), "mmap_mb": round(mapped, 1),
                      "width": width, "t": round(time.perf_counter() - state["t0"], 1),
                      "cpu": round(time.process_time(), 1)})
        if args.live:
            print(f"[live] {phase} {n} rss={rss:.0f} peak={hwm:.0f} heap_used={used:.0f} heap_free={kept:.0f} "
                  f"mmap={mapped:.0f} width={width} cpu={time.process_time():.1f}", file=sys.stderr, flush=True)

    record("start", 0)
    config = RunConfig(
        task=args.task, **({"model": args.model} if args.model else {}), data_dir=args.data_dir, shape=args.shape,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
        eval_splits=tuple(s for s in args.eval_splits.split(",") if s), threads=args.threads,
        train=TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                          cutoff_len=args.cutoff_len, lr=args.lr,
                          activation_checkpointing=args.activation_checkpointing))
    prepared = run.prepare(config)
    record("loaded", 0)

    inner_tail = scoring.tail_logits
    widths: set[tuple[int, int]] = set()

    def tail_logits(model, batch, keep):
        out = inner_tail(model, batch, keep)
        state["n"] += int(batch["input_ids"].shape[0])
        widths.add(tuple(batch["input_ids"].shape))
        record(state["phase"], state["n"], int(batch["input_ids"].shape[1]))
        return out

    scoring.tail_logits = tail_logits
    inner_evaluate = run.evaluate

    def evaluate(model, prepared_, split):
        state["phase"], state["n"] = f"score {split}", 0
        widths.clear()
        try:
            return inner_evaluate(model, prepared_, split)
        finally:
            state.setdefault("shapes", {})[split] = len(widths)
    run.evaluate = evaluate

    def on_step(event) -> None:
        record("train", event.step)

    outcome = run.execute(prepared, callbacks=[on_step], progress=False, save=False,
                          on_model=lambda m: record("built", 0))
    record("end", 0)
    metrics = outcome.metrics

    print(f"# {args.task} {config.model} steps={args.max_steps} train={args.max_train_examples} "
          f"batch={args.batch_size}/{args.micro_batch_size} cutoff={args.cutoff_len} threads={args.threads} "
          f"env={args.env or '-'} trim={args.trim} gc={args.gc} mkldnn={not args.no_mkldnn} "
          f"eval_width_multiple={args.eval_width_multiple or 'default'} torch={torch.__version__}")
    print(f"{'phase':<18}{'n':>6}{'RSS MB':>10}{'peak MB':>10}{'heap used':>11}{'heap free':>11}{'mmap MB':>9}"
          f"{'time s':>9}")
    by_phase: dict[str, list[dict]] = {}
    for row in curve:
        by_phase.setdefault(row["phase"], []).append(row)
    for phase, rows in by_phase.items():
        if phase == "train":
            marks = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, rows[-1]["n"]}
            shown = [r for r in rows if r["n"] in marks]
        elif phase.startswith("score"):
            every = args.every or max(1, rows[-1]["n"] // 8)
            shown, last = [], -every
            for r in rows:
                if r["n"] - last >= every or r is rows[-1]:
                    shown.append(r)
                    last = r["n"]
        else:
            shown = rows
        for r in shown:
            print(f"{phase:<18}{r['n']:>6}{r['rss_mb']:>10.0f}{r['hwm_mb']:>10.0f}{r['heap_used_mb']:>11.0f}"
                  f"{r['heap_free_mb']:>11.0f}{r['mmap_mb']:>9.0f}{r['t']:>9.1f}")
    train_rows = {r["n"]: r["rss_mb"] for r in by_phase.get("train", [])}
    summary = {"peak_mb": curve[-1]["hwm_mb"], "scoring_shapes": state.get("shapes", {})}
    for a, b in ((8, 64), (8, 32), (16, 64)):
        if a in train_rows and b in train_rows:
            summary[f"rss_step{b}_over_step{a}"] = round(train_rows[b] / train_rows[a], 3)
    for phase, rows in by_phase.items():
        if phase.startswith("score"):
            summary[f"{phase} adds MB"] = round(rows[-1]["rss_mb"] - rows[0]["rss_mb"], 1)
            summary[f"{phase} peak rise MB"] = round(rows[-1]["hwm_mb"] - rows[0]["hwm_mb"], 1)
    summary["scores"] = {s: {k: metrics[s].get(k) for k in ("accuracy", "gold_logprob")}
                         for s in config.eval_splits if s in metrics}
    print(json.dumps(summary, indent=None))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "curve": curve}, indent=1))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([r["t"] for r in curve], [r["rss_mb"] for r in curve], label="RSS")
        ax.plot([r["t"] for r in curve], [r["hwm_mb"] for r in curve], label="peak", linestyle="--")
        for phase, rows in by_phase.items():
            ax.axvline(rows[0]["t"], color="grey", linewidth=0.5)
            ax.text(rows[0]["t"], ax.get_ylim()[0], phase, rotation=90, fontsize=7, va="bottom")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MB")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
