"""Does the study decide correctly, and at what cost? A benchmark with a known truth, calibrated to real noise.

    python benchmarks/decision_benchmark.py                        # 100 repetitions x 4 gaps (about 30 min)
    python benchmarks/decision_benchmark.py --reps 10 --json out.json

Truth. Every allocation scores 0.5 except the best, the paper's triangle, which scores 0.5 + gap,
with gap in {0, delta/2, delta, 2 delta} (delta = the race's `min_effect`, 0.01 gold log-prob). On top of the
truth, each run adds the noise the synthetic objective draws with the sizes measured on MRPC
(`SyntheticObjective.calibrated`: residual sd 0.060 at trial fidelity, 0.011 at finalist fidelity, a seed
effect shared by every allocation a seed trains). Each repetition draws another noise stream.

Pipelines, each run the way a study runs it (StudyDriver, LocalExecutor, the strategies and final stages of
mola_search.search; the cpu-standard settings: 14 search trials with the seeded shapes first, contenders =
triangle, inverted triangle, rectangle and the best by search score):

* (a) today: TPE, then a fixed block of 3 seeds per contender; the exported "best" is the highest mean
  validation score, always named (a winner claim every time);
* (a') TPE, the same fixed block, its one look at family-wise level 0.05 (`--no-racing`);
* (b) TPE + racing with budgets of 12 (the fixed block's spend) and 40 (the cpu-standard default);
* (c) random search + racing (40).

(a), (a') and (b) share their search and their finalist noise (common random numbers), so their differences
are the final stage's alone. Reported per pipeline and gap, over the repetitions: P(a winner claim), P(the
true best is the declared winner), P(a false claim: a winner that is not the best, or "equivalent" when the
best is ahead by delta or more), P(equivalent), and the finalist fine-tunes spent.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from mola_search.allocation import shape_allocation
from mola_search.search.config import StudyConfig
from mola_search.search.context import StudyContext
from mola_search.search.executors import LocalExecutor
from mola_search.search.final import FixedFinalists, Racing
from mola_search.search.progress import Progress
from mola_search.search.runner import search
from mola_search.search.seeds import paper_seeds
from mola_search.search.space import load_space
from mola_search.search.strategies import Standalone
from mola_search.search.study import StudyDriver, StudyFolder
from mola_search.trial import Fidelity
from mola_search.trial.synthetic import SyntheticObjective

LAYERS, BUDGET, DELTA = 30, 150, 0.01
# The best is the triangle: not the shape the tie-break prefers (the inverted triangle), so an undecided race's
# export is not flattered by the benchmark's choice of truth.
TARGET = tuple(shape_allocation("triangle", LAYERS, BUDGET, 1, 8))
TRIAL_EXAMPLES, FINAL_EXAMPLES = 256, 1024
BUDGETS = (12, 40)            # the racing budgets shown: the fixed block's spend and the cpu-standard default


def objective(gap: float, stream: int):
    """A user objective with the needle truth and the calibrated noise (trial.objective's contract)."""
    noise = SyntheticObjective.calibrated("upper", LAYERS, BUDGET, stream=stream)

    def score(trial) -> float | dict:
        x = tuple(trial.spec.experts)
        truth = 0.5 + (gap if x == TARGET else 0.0)
        if trial.final:
            val = truth + noise.noise_at(x, seed=trial.train_seed, train_examples=FINAL_EXAMPLES)
            test = truth + noise.noise_at(x, seed=trial.train_seed + 100_000, train_examples=FINAL_EXAMPLES)
            return {"validation": val, "test": test}
        for f in trial.rungs[:-1]:
            trial.report(truth + noise.noise_at(x, seed=trial.train_seed, fidelity=f, train_examples=TRIAL_EXAMPLES))
        return truth + noise.noise_at(x, seed=trial.train_seed, train_examples=TRIAL_EXAMPLES)

    score.__qualname__ = score.__name__ = f"needle_gap{gap}_stream{stream}"
    return score


def study_context(root: Path, sampler: str, fn, rep: int) -> StudyContext:
    config = StudyConfig(task="mrpc", model=f"tiny-llama-L{LAYERS}", objective=f"python:bench:{fn.__name__}",
                         budget=BUDGET, trials=14, sampler=sampler, seed=0, executor="local", pilot=False,
                         seed_names=("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond"),
                         finalist_shapes=("triangle", "inverted_triangle", "rectangle"), finalist_top_n=1,
                         finalist_seeds=3, finalist_train_examples=FINAL_EXAMPLES, study_name=f"r{rep}",
                         fidelity={"max_train_examples": TRIAL_EXAMPLES, "rungs": [0.5, 1.0]})
    space = load_space("blocks")
    space = replace(space, fidelity=Fidelity.from_dict({**space.fidelity.to_dict(), **config.fidelity}))
    folder = StudyFolder(root)
    folder.create()
    progress = Progress(config.trials, stream=io.StringIO())
    driver = StudyDriver(config, folder, space, LAYERS, BUDGET, None, progress,
                         storage=optuna.storages.InMemoryStorage(), objective=fn)
    seeds = [s for s in paper_seeds(LAYERS, BUDGET, 1, 8) if s.name in config.seed_names]
    return StudyContext(config, folder, space, driver, LocalExecutor(config, folder, LAYERS, fn), progress, LAYERS,
                        BUDGET, seeds, objective=fn, fidelity=space.fidelity)


def final_stage(study: StudyContext, root: Path, stage, contenders, **config) -> StudyContext:
    """A copy of `study` in a folder of its own with `config` changes, for one final stage."""
    folder = StudyFolder(root)
    folder.create()
    cfg = replace(study.config, **config)
    return replace(study, config=cfg, folder=folder, executor=LocalExecutor(cfg, folder, LAYERS, study.objective))


def outcome(decision, finalists, today: bool = False) -> dict:
    """What a pipeline said: the claim, whether the exported allocation is the true best, the runs spent."""
    target = next((f.label for f in finalists if tuple(f.spec.experts) == TARGET), None)
    if today:  # the old rule: the highest mean validation score, always called "best"
        scored = [f for f in finalists if f.validation]
        best = max(scored, key=lambda f: f.val_mean) if scored else None
        return {"claim": "winner", "chosen_is_best": best is not None and best.label == target,
                "exported_is_best": best is not None and best.label == target,
                "runs": sum(len(f.validation) for f in finalists)}
    return {"claim": decision.decision, "chosen_is_best": decision.chosen == target and target is not None,
            "exported_is_best": decision.chosen == target and target is not None, "runs": decision.runs}


def repetition(rep: int, gap: float, tmp: Path) -> dict[str, dict]:
    fn = objective(gap, stream=1 + rep)
    out = {}
    for sampler in ("tpe", "random"):
        study = study_context(tmp / f"{sampler}-{rep}", sampler, fn, rep)
        strategy = Standalone()
        strategy.queue(study)
        search(study, "trials")
        contenders = strategy.contenders(study)
        if sampler == "tpe":
            fixed = FixedFinalists().run(final_stage(study, tmp / f"fixed-{rep}", None, contenders, final_stage="finalists"),
                                         contenders)
            out["a today"] = outcome(fixed.decision, fixed.finalists, today=True)
            out["a' one look"] = outcome(fixed.decision, fixed.finalists)
            for budget in BUDGETS:
                raced = Racing().run(final_stage(study, tmp / f"race{budget}-{rep}", None, contenders,
                                                 max_finalist_runs=budget), contenders)
                out[f"b race {budget}"] = outcome(raced.decision, raced.finalists)
        else:
            raced = Racing().run(final_stage(study, tmp / f"random-{rep}", None, contenders,
                                             max_finalist_runs=BUDGETS[-1]), contenders)
            out[f"c random+race {BUDGETS[-1]}"] = outcome(raced.decision, raced.finalists)
    return out


def summarise(results: dict[float, list[dict[str, dict]]]) -> list[dict]:
    rows = []
    for gap, reps in results.items():
        for pipeline in reps[0]:
            got = [r[pipeline] for r in reps]
            n = len(got)
            wins = [g for g in got if g["claim"] == "winner"]
            # at gap 0 there is no best: every winner claim is false
            false = [g for g in got if (g["claim"] == "winner" and (gap == 0 or not g["chosen_is_best"]))
                     or (g["claim"] == "equivalent" and gap >= DELTA - 1e-12)]
            rows.append({"gap": gap, "pipeline": pipeline, "reps": n, "winner_claims": len(wins) / n,
                         "true_best_declared": sum(g["chosen_is_best"] for g in wins) / n if gap > 0 else None,
                         "false_claims": len(false) / n,
                         "equivalent": sum(g["claim"] == "equivalent" for g in got) / n,
                         "exported_is_best": sum(g["exported_is_best"] for g in got) / n if gap > 0 else None,
                         "runs_mean": sum(g["runs"] for g in got) / n})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| true gap | pipeline | winner claimed | true best declared winner | false claim | equivalent | "
             "exported = true best | finalist fine-tunes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = "–" if r["true_best_declared"] is None else f"{r['true_best_declared']:.0%}"
        lines.append(f"| {r['gap']:g} | {r['pipeline']} | {r['winner_claims']:.0%} | {best} | "
                     f"{r['false_claims']:.0%} | {r['equivalent']:.0%} | "
                 + ("–" if r["exported_is_best"] is None else f"{r['exported_is_best']:.0%}") + f" | {r['runs_mean']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--gaps", default="0,0.5,1,2", help="gaps in units of delta (0.01)")
    ap.add_argument("--budgets", default="12,40", help="racing budgets (finalist fine-tunes); random search races "
                                                         "with the last")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    global BUDGETS
    BUDGETS = tuple(int(b) for b in args.budgets.split(","))
    gaps = [float(g) * DELTA for g in args.gaps.split(",")]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    results: dict[float, list] = {g: [] for g in gaps}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, gap in enumerate(gaps):
            for rep in range(args.reps):
                results[gap].append(repetition(rep, gap, Path(tmp) / f"g{i}"))
                done = i * args.reps + rep + 1
                eta = (time.time() - start) / done * (len(gaps) * args.reps - done)
                print(f"\r[{done}/{len(gaps) * args.reps}] gap {gap:g} rep {rep}  ETA {eta / 60:.1f} min", end="",
                      file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows = summarise(results)
    print(f"decision benchmark: {args.reps} repetitions per gap, delta {DELTA}, {time.time() - start:.0f} s\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
