"""Which pruner stops good allocations on a noisy objective, and what does pruning save?

    python benchmarks/pruner_benchmark.py                           # L=30, budget 150, 100 trials x 30 repeats, ~30 s
    python benchmarks/pruner_benchmark.py --repeats 2 --trials 20      # smoke run
    python benchmarks/pruner_benchmark.py --out runs/pruner_benchmark.json

Each repeat r runs one Optuna study per pruner (`mola_search.search.pruning`: asha,
wilcoxon, none) on the synthetic objective (`mola_search.trial.synthetic`) whose
noise-free value and noise are known: in-memory storage, a RandomSampler seeded with r
over the ``blocks`` encoding, so every pruner sees the *same* proposals in a repeat (a
paired comparison). Every trial trains with the study seed r (common random numbers, as
`mola-search` does): the seed effect is shared and only the residual and per-example
noise separate trials. At each rung the trial reports through `report_rung` (the mean,
or its per-example validation values for wilcoxon) and asks `trial.should_prune()`
before the last rung; a pruned trial is told PRUNED.

Measured, pooled over repeats:

* top pruned: of the trials whose noise-free value is in the top `--top` fraction
  (default 10%) of the trials proposed in that study, the share that was pruned;
* rung evals saved: 1 - rung evaluations run / (trials x rungs);
* training saved: 1 - training run / full training of every trial (a trial stopped
  after rung k cost rungs[k-1] of a full trial);
* best true: the noise-free value of the completed trial with the best observed value
  (what the study would report), mean over repeats; "vs none": its paired difference to
  the no-pruning study of the same repeat; regret: best true value among the proposals
  minus best true.

The "top pruned" rate counts any top-decile trial stopped, also one that is truly worse
than the incumbent (Wilcoxon compares with the best trial, so it stops the runners-up on
purpose); the best-true columns say whether that cost the study its answer.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mola_search.search.pruning import PRUNERS, make_pruner, report_rung
from mola_search.search.space import load_space
from mola_search.trial.synthetic import SyntheticObjective

# Realistic noise at full fidelity and 64 training examples (the objective's values of random
# `blocks` allocations spread with sd ~0.2; the top 10% lie within ~0.07 of the best proposal).
DEFAULTS: dict[str, Any] = dict(objective="upper", num_layers=30, budget=150, trials=100, repeats=30,
                                rungs=(0.5, 1.0), examples=200, noise=0.1, seed_sd=0.1, example_sd=0.3,
                                reduction_factor=2, p_threshold=0.1, top=0.1)


def run_study(objective: SyntheticObjective, pruner: str, *, trials: int, repeat: int, rungs: Sequence[float],
              examples: int, reduction_factor: int, p_threshold: float) -> list[dict[str, Any]]:
    """One study; per trial: its allocation's noise-free value, rungs run, pruned, final observed value."""
    space = load_space("blocks")
    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage(),
                                sampler=optuna.samplers.RandomSampler(seed=repeat),
                                pruner=make_pruner(pruner, reduction_factor=reduction_factor,
                                                   p_threshold=p_threshold))
    records: list[dict[str, Any]] = []
    for _ in range(trials):
        trial = study.ask()
        experts = space.suggest(trial, objective.num_layers, objective.budget).experts
        record = {"value": objective.value(experts), "rungs_run": 0, "pruned": False, "observed": None}
        records.append(record)
        for k, fidelity in enumerate(rungs, start=1):
            mean = objective.observe(experts, seed=repeat, fidelity=fidelity)
            per_example = (objective.observe_examples(experts, seed=repeat, fidelity=fidelity, n=examples)
                           if pruner == "wilcoxon" else None)
            report_rung(trial, pruner, k, mean, per_example)
            record["rungs_run"], record["observed"] = k, mean
            if k < len(rungs) and trial.should_prune():
                record["pruned"] = True
                break
        if record["pruned"]:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, record["observed"])
    return records


def summarize(records: list[dict[str, Any]], rungs: Sequence[float], top: float) -> dict[str, Any]:
    """The per-study numbers of the module docstring."""
    values = sorted((r["value"] for r in records), reverse=True)
    cut = values[max(1, math.ceil(top * len(values))) - 1]
    top_trials = [r for r in records if r["value"] >= cut]
    completed = [r for r in records if not r["pruned"]]
    best = max(completed, key=lambda r: r["observed"])["value"] if completed else math.nan
    return {
        "top_trials": len(top_trials),
        "top_pruned": sum(r["pruned"] for r in top_trials),
        "pruned": sum(r["pruned"] for r in records),
        "rung_evals_saved": 1 - sum(r["rungs_run"] for r in records) / (len(records) * len(rungs)),
        "training_saved": 1 - sum(rungs[r["rungs_run"] - 1] for r in records) / len(records),
        "best_true": best,
        "regret": values[0] - best,
    }


def benchmark_pruners(*, objective: str = DEFAULTS["objective"], num_layers: int = DEFAULTS["num_layers"],
                      budget: int = DEFAULTS["budget"], trials: int = DEFAULTS["trials"],
                      repeats: int = DEFAULTS["repeats"], rungs: Sequence[float] = DEFAULTS["rungs"],
                      examples: int = DEFAULTS["examples"], noise: float = DEFAULTS["noise"],
                      seed_sd: float = DEFAULTS["seed_sd"], example_sd: float = DEFAULTS["example_sd"],
                      reduction_factor: int = DEFAULTS["reduction_factor"],
                      p_threshold: float = DEFAULTS["p_threshold"], top: float = DEFAULTS["top"],
                      pruners: Sequence[str] = PRUNERS) -> dict[str, Any]:
    """Run every pruner on `repeats` paired studies; return the config, pooled results and per-study rows."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = SyntheticObjective(objective, num_layers, budget, 1, 8, noise=noise, seed_sd=seed_sd,
                                example_sd=example_sd)
    config = dict(objective=objective, num_layers=num_layers, budget=budget, trials=trials, repeats=repeats,
                  rungs=list(rungs), examples=examples, noise=noise, seed_sd=seed_sd, example_sd=example_sd,
                  reduction_factor=reduction_factor, p_threshold=p_threshold, top=top, sampler="random",
                  space="blocks")
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in pruners}
    shares: list[float] = []
    for repeat in range(repeats):
        for name in pruners:
            records = run_study(target, name, trials=trials, repeat=repeat, rungs=rungs, examples=examples,
                                reduction_factor=reduction_factor, p_threshold=p_threshold)
            rows[name].append(summarize(records, rungs, top))
        if trials >= 2:  # how separable the proposals are at full fidelity, seed-paired (noise.estimate_noise's share)
            space = load_space("blocks")
            probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=repeat))
            allocations = []
            for _ in range(trials):
                trial = probe.ask()
                allocations.append(space.suggest(trial, num_layers, budget).experts)
                probe.tell(trial, 0.0)
            shares.append(target.true_allocation_share(allocations))
    results = {}
    for name, studies in rows.items():
        top_total = sum(s["top_trials"] for s in studies)
        results[name] = {
            "top_pruned_rate": sum(s["top_pruned"] for s in studies) / top_total if top_total else math.nan,
            "pruned_rate": sum(s["pruned"] for s in studies) / (trials * len(studies)) if studies else math.nan,
            "rung_evals_saved": _mean([s["rung_evals_saved"] for s in studies]),
            "training_saved": _mean([s["training_saved"] for s in studies]),
            "best_true": _mean([s["best_true"] for s in studies]),
            "best_true_sd": statistics.stdev([s["best_true"] for s in studies]) if len(studies) > 1 else math.nan,
            "regret": _mean([s["regret"] for s in studies]),
        }
    if "none" in rows:  # paired by repeat: same proposals, same noise; only the pruning differs
        for name, studies in rows.items():
            diffs = [s["best_true"] - n["best_true"] for s, n in zip(studies, rows["none"])]
            results[name]["vs_none"] = _mean(diffs)
            spread = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            results[name]["vs_none_se"] = spread / math.sqrt(len(diffs))
    return {"config": config, "true_allocation_share": _mean(shares), "results": results, "studies": rows}


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [f"synthetic:{c['objective']}, L={c['num_layers']}, budget {c['budget']}, {c['trials']} trials x "
             f"{c['repeats']} repeats, rungs {c['rungs']}, {c['examples']} validation examples; noise sd "
             f"{c['noise']} (residual), {c['seed_sd']} (seed), {c['example_sd']} (per example); true seed-paired "
             f"allocation share of the proposals {report['true_allocation_share']:.2f}",
             "",
             f"| pruner | top-{100 * c['top']:.0f}% trials pruned | all pruned | rung evals saved | training saved "
             f"| best completed (true value, mean ± sd) | vs none (paired, ± se) | regret |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        paired = f"{r['vs_none']:+.3f} ± {r['vs_none_se']:.3f}" if "vs_none" in r else "-"
        lines.append(f"| {name} | {r['top_pruned_rate']:.1%} | {r['pruned_rate']:.1%} | {r['rung_evals_saved']:.1%} "
                     f"| {r['training_saved']:.1%} | {r['best_true']:.3f} ± {r['best_true_sd']:.3f} | {paired} "
                     f"| {r['regret']:.3f} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--trials", type=int, default=DEFAULTS["trials"])
    parser.add_argument("--objective", choices=("upper", "middle", "sparse"), default=DEFAULTS["objective"])
    parser.add_argument("--noise", type=float, default=DEFAULTS["noise"])
    parser.add_argument("--seed-sd", type=float, default=DEFAULTS["seed_sd"])
    parser.add_argument("--example-sd", type=float, default=DEFAULTS["example_sd"])
    parser.add_argument("--examples", type=int, default=DEFAULTS["examples"])
    parser.add_argument("--p-threshold", type=float, default=DEFAULTS["p_threshold"])
    parser.add_argument("--reduction-factor", type=int, default=DEFAULTS["reduction_factor"])
    parser.add_argument("--out", type=Path, help="write the full report (config, pooled results, per-study rows)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = benchmark_pruners(repeats=args.repeats, trials=args.trials, objective=args.objective, noise=args.noise,
                               seed_sd=args.seed_sd, example_sd=args.example_sd, examples=args.examples,
                               p_threshold=args.p_threshold, reduction_factor=args.reduction_factor)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(markdown(report))
    print(f"\n({report['wall_s']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
