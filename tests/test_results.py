"""The honest result table: chosen on validation, reported on test once, paired on examples x seeds.

Study folders are built in code (an Optuna sqlite study + finalists' metrics.json +
noise.json in the layout of the shared data contract), so nothing is trained here;
`make_study` and friends are also used by test_report.py and test_analysis.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from mola_search.analysis.results import EXAMPLES_X_SEEDS, PER_SEED, paired_examples, result_table
from mola_search.analysis.studydata import load_study

L, BUDGET = 8, 40
SHAPES = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")
FINALIST_SEEDS = (1000, 1001, 1002)


# ------------------------------------------------------------------------------------------ study builder


def shape(name: str) -> tuple[int, ...]:
    from mola_search.allocation import shape_allocation

    return tuple(shape_allocation(name, L, BUDGET, 1, 8))


def random_allocations(n: int, seed: int) -> list[tuple[int, ...]]:
    from mola_search.allocation import round_to_budget

    rng = np.random.default_rng(seed)
    return [tuple(round_to_budget(list(rng.random(L) + 0.05), BUDGET, 1, 8)) for _ in range(n)]


def trial(origin: str, allocation: Sequence[int], value: float, *, train_seed: int | None = 0,
          pilot: bool = False) -> dict:
    """One completed trial; train_seed=None writes an old-format trial (no train_seed, pilot, metrics)."""
    return {"origin": origin, "allocation": tuple(allocation), "value": float(value), "train_seed": train_seed,
            "pilot": pilot}


def run_metrics(train_seed: int, val: float, test: Sequence[float], correct: Sequence[int],
                ids: Sequence[str] | None = None, *, val_acc: float = 0.7, metric: str = "gold_logprob",
                extra: dict | None = None) -> dict:
    """A finalist run's metrics.json (contract format); per-example arrays in the order of `ids`."""
    ids = list(ids) if ids is not None else [f"ex{i:04d}" for i in range(len(test))]
    test, correct = [float(v) for v in test], [int(c) for c in correct]
    return {"train_seed": train_seed, "metric": metric,
            "validation": {"accuracy": val_acc, "gold_logprob": val, "margin": 2 * val, "n": 100,
                           "majority_baseline": 0.6},
            "test": {"accuracy": sum(correct) / len(correct), "gold_logprob": sum(test) / len(test),
                     "margin": 2 * sum(test) / len(test), "n": len(test), "majority_baseline": 0.6, **(extra or {}),
                     "per_example": {"ids": ids, "gold_logprob": test, "margin": [2 * v for v in test],
                                     "correct": correct}}}


def old_metrics(val_acc: float, test_acc: float, majority: float = 0.6) -> dict:
    """A finalist run of a study written before the continuous metric: accuracy only, no per-example data."""
    return {"validation": {"accuracy": val_acc}, "test": {"accuracy": test_acc, "majority_baseline": majority}}


def finalist(number: int, origin: str, allocation: Sequence[int], runs: dict[int, dict]) -> dict:
    return {"number": number, "origin": origin, "allocation": tuple(allocation), "runs": runs}


def make_study(folder: Path, trials: Sequence[dict], finalists: Sequence[dict] = (), *, noise: dict | None = None,
               noise_rounds: Sequence[tuple[dict, dict]] = (), best: dict | None = None, old: bool = False,
               finished: bool = True, **config) -> Path:
    """Write a study folder: study.json, study.db (Optuna, trials added in order), finalists, noise.json.

    `noise`: pilot scores {allocation: {seed: score}}; `noise_rounds`: earlier --auto-fidelity rounds
    as (scores, fidelity) pairs."""
    import optuna
    from optuna.distributions import FloatDistribution

    from mola_search.search.config import StudyConfig

    folder.mkdir(parents=True)
    cfg = StudyConfig(**{"task": "mrpc", "model": "tiny-llama-L8", "objective": "synthetic:sparse",
                         "space": "per_layer", "sampler": "random", "executor": "local", "scheduler": "none",
                         "study_name": folder.name, "finalist_seeds": 3, "out": str(folder), **config})
    cfg.save(folder)
    if old:  # a study.json written before the metric existed
        raw = json.loads((folder / "study.json").read_text())
        raw.pop("metric", None)
        (folder / "study.json").write_text(json.dumps(raw))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}",
                                direction="maximize")
    study.set_user_attr("num_layers", L)
    study.set_user_attr("budget", BUDGET)
    for t in trials:
        alloc = t["allocation"]
        attrs = {"origin": t["origin"], "allocation": list(alloc), "top_k": [min(2, c) for c in alloc],
                 "rank": [8] * len(alloc)}
        if t["train_seed"] is not None:
            attrs.update(train_seed=t["train_seed"], pilot=t["pilot"],
                         metrics={"gold_logprob": t["value"], "accuracy": 0.7, "margin": 2 * t["value"]})
        params = {f"w_layer{j:02d}": c / BUDGET for j, c in enumerate(alloc)}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: FloatDistribution(0.0, 1.0) for k in params}, value=t["value"],
            user_attrs=attrs))
    for f in finalists:
        label = f"t{f['number']:03d}-{f['origin'].replace(':', '_')}"
        for seed, metrics in f["runs"].items():
            run = folder / "finalists" / label / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(metrics))
    if noise is not None:
        from mola_search.search.study import StudyFolder
        from mola_search.stats.noise import estimate_noise

        StudyFolder(folder).write_noise(estimate_noise(noise), [estimate_noise(sc, fidelity=fid) for sc, fid in noise_rounds])
    if best is not None:
        (folder / "best_allocation.json").write_text(json.dumps(best))
    if finished:
        (folder / "summary.md").write_text("# finished\n")
    return folder


def effect_study(folder: Path, score: Callable[[tuple[int, ...], np.random.Generator], float], *, n: int = 30,
                 seed: int = 0, seed_sd: float = 0.2, noise: bool = True, **kwargs) -> Path:
    """Shape seeds + `n` random trials at seed 0, pilot replicates (3 shapes x seeds 1, 2), and
    finalists (2 searched + 3 shapes x seeds 1000..1002). Every training seed adds its own offset
    (sd `seed_sd`) to every run it trains: only a seed-blocked analysis sees through it."""
    rng = np.random.default_rng(seed)
    offset = {s: float(rng.normal(0, seed_sd)) for s in (0, 1, 2, *FINALIST_SEEDS)}
    pilots = ("triangle", "inverted_triangle", "rectangle")
    trials = [trial(f"seed:{s}", shape(s), score(shape(s), rng) + offset[0], pilot=s in pilots) for s in SHAPES]
    searched = random_allocations(n, seed + 1)
    trials += [trial("random", a, score(a, rng) + offset[0]) for a in searched]
    pilot = {s: {0: trials[SHAPES.index(s)]["value"]} for s in pilots}
    for k in (1, 2):
        for s in pilots:
            pilot[s][k] = score(shape(s), rng) + offset[k]
            trials.append(trial(f"seed:{s}", shape(s), pilot[s][k], train_seed=k, pilot=True))
    top = sorted(range(n), key=lambda i: -trials[len(SHAPES) + i]["value"])[:2]
    fins = [finalist(len(SHAPES) + i, "random", searched[i], {}) for i in top]
    fins += [finalist(SHAPES.index(s), f"seed:{s}", shape(s), {}) for s in pilots]
    for f in fins:
        for k in FINALIST_SEEDS:
            v = score(f["allocation"], rng) + offset[k]
            test = v + rng.normal(0, 0.3, 60)
            f["runs"][k] = run_metrics(k, v, test, (test > v).astype(int))
    return make_study(folder, trials, fins, noise=pilot if noise else None, **kwargs)


# ------------------------------------------------------------------------------------------ tests


def _selection_study(folder: Path, best_json: dict | None = None) -> Path:
    """Validation and test disagree: trial 10 is best on validation, trial 11 on test; among the seeds
    rectangle is best on validation, triangle on test. Per-example test arrays of every finalist are
    written in its own shuffled order, so pairing must go by example id."""
    rng = np.random.default_rng(3)
    ids = [f"q{i:03d}" for i in range(200)]
    difficulty = rng.normal(-0.7, 0.5, len(ids))          # shared by every run: pairing removes it
    plan = {  # number, origin: (validation mean, true test shift)
        (10, "tpe"): (-0.50, 0.00), (11, "tpe"): (-0.55, 0.08),
        (0, "seed:triangle"): (-0.62, 0.05), (1, "seed:inverted_triangle"): (-0.66, -0.04),
        (2, "seed:hourglass"): (-0.64, 0.0), (3, "seed:rectangle"): (-0.60, 0.0), (4, "seed:diamond"): (-0.65, 0.0),
    }
    fins, trials = [], []
    for (number, origin), (val, shift) in plan.items():
        alloc = shape(origin[5:]) if origin.startswith("seed:") else random_allocations(12, 5)[number]
        runs = {}
        for k in FINALIST_SEEDS:
            test = difficulty + shift + rng.normal(0, 0.02, len(ids))
            order = rng.permutation(len(ids))
            runs[k] = run_metrics(k, val + rng.normal(0, 0.001), test[order], (test > -0.7).astype(int)[order],
                                  [ids[i] for i in order], val_acc=0.7 + val / 10)
        fins.append(finalist(number, origin, alloc, runs))
    for number in range(12):
        origin = ["seed:" + s for s in SHAPES][number] if number < 5 else "tpe"
        alloc = shape(origin[5:]) if number < 5 else random_allocations(12, 5)[number]
        trials.append(trial(origin, alloc, -0.6 + 0.01 * number))
    noise = {s: {k: -0.6 + 0.01 * i + 0.02 * k for k in range(3)} for i, s in
             enumerate(("triangle", "inverted_triangle", "rectangle"))}
    noise["rectangle"][2] += 0.015
    return make_study(folder, trials, fins, noise=noise, best=best_json)


def test_best_is_chosen_on_validation_and_compared_with_every_seed(tmp_path: Path) -> None:
    exported = {"experts": list(random_allocations(12, 5)[11]), "trial": 11, "origin": "tpe",
                "chosen_by": "mean test accuracy over 3 seeds"}
    data = load_study(_selection_study(tmp_path / "sel", exported))
    assert data.metric == "gold_logprob" and data.selected_on() == "validation"
    f10 = next(f for f in data.finalists if f.number == 10)
    assert sorted(f10.test) == list(FINALIST_SEEDS)   # seed1000.. folders, any int
    table = result_table(data, n_boot=500)
    best = table.row("best")
    # trial 11 has the higher test score, trial 10 the higher validation score: validation decides
    assert best.number == 10 and best.mean < next(r for r in table.rows if r.number == 11).mean
    assert table.row("best searched") is best
    assert table.row("best seed").name == "rectangle" and table.best_seed == "rectangle"
    assert next(r for r in table.rows if r.name == "triangle").mean > table.row("best seed").mean
    assert data.best_finalist().number == 10 and data.exported_finalist().number == 11
    # the best against every seeded shape, in paper order, on the same examples and seeds
    assert [c.seed for c in table.vs_seeds] == ["triangle", "inverted_triangle", "hourglass", "rectangle", "diamond"]
    tri = table.vs_seeds[0].metric
    assert tri.method == EXAMPLES_X_SEEDS and tri.n == 3 and tri.n_examples == 200
    assert tri.hi < 0 and tri.mean_diff == pytest.approx(-0.05, abs=0.01)   # triangle's +0.05 shift, found
    assert table.vs_seeds[1].metric.lo > 0                                   # best beats inverted_triangle
    assert table.vs_seeds[3].metric.lo < 0 < table.vs_seeds[3].metric.hi    # same shift as rectangle
    # notes: the noise floor first, then the test-chosen export said in words
    assert table.notes[0] == data.noise.line() and table.notes[0].startswith("noise floor:")
    chosen = next(n for n in table.notes if "best_allocation.json" in n)
    assert "chosen on the test split" in chosen and "picks trial 10 (tpe), not the exported trial 11 (tpe)" in chosen


def test_examples_x_seeds_bootstrap_finds_a_clear_difference_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(300)]
    base = {k: rng.normal(-0.7, 0.6, 300) for k in range(3)}   # example and seed variation, shared by a and b

    def runs(shift: float, noise_seed: int) -> dict[int, dict[str, float]]:
        r = np.random.default_rng(noise_seed)
        return {k: dict(zip(ids, base[k] + shift + r.normal(0, 0.1, 300))) for k in base}

    ref = runs(0.0, 1)
    clear = paired_examples(runs(0.05, 2), ref, n_boot=2000)
    assert clear.lo > 0 and clear.p_value < 0.01 and clear.mean_diff == pytest.approx(0.05, abs=0.015)
    assert clear.n == 3 and clear.n_examples == 300
    null = paired_examples(runs(0.0, 3), ref, n_boot=2000)
    assert null.lo < 0 < null.hi and null.p_value > 0.05
    # seeds are resampled too: a gain on two seeds and a loss on the third is not a clear gain,
    # although every seed's difference is measured precisely on 300 examples
    mixed = {k: {i: v + (0.1 if k < 2 else -0.15) for i, v in row.items()} for k, row in ref.items()}
    m = paired_examples(mixed, ref, n_boot=2000)
    assert m.mean_diff == pytest.approx((0.1 + 0.1 - 0.15) / 3)
    assert m.lo < 0 < m.hi
    # only common seeds and common ids are paired
    part = paired_examples({0: {"a": 1.0, "b": 2.0}, 5: {"a": 0.0}}, {0: {"a": 0.5, "c": 9.0}}, n_boot=100)
    assert (part.n, part.n_examples, part.mean_diff) == (1, 1, 0.5)
    assert paired_examples({0: {"a": 1.0}}, {1: {"a": 1.0}}) is None


def test_old_format_study_loads_with_accuracy_and_per_seed_pairs(tmp_path: Path) -> None:
    trials = [trial(f"seed:{s}", shape(s), 0.6 + 0.01 * i, train_seed=None) for i, s in enumerate(SHAPES)]
    trials += [trial("tpe", a, 0.62 + 0.003 * i, train_seed=None) for i, a in enumerate(random_allocations(8, 2))]
    accs = {5: ([0.70, 0.72, 0.71], [0.69, 0.70, 0.74]), 3: ([0.68, 0.69, 0.70], [0.66, 0.67, 0.69]),
            0: ([0.60, 0.61, 0.62], [0.75, 0.76, 0.77])}
    fins = [finalist(n, trials[n]["origin"], trials[n]["allocation"],
                     {k: old_metrics(v, t) for k, (v, t) in enumerate(zip(*accs[n]))}) for n in accs]
    folder = make_study(tmp_path / "old", trials, fins, old=True,
                        best={"experts": list(shape("triangle")), "trial": 0,
                              "chosen_by": "mean test accuracy over 3 seeds"})
    data = load_study(folder)
    assert data.metric == "accuracy" and data.noise is None
    tri = data.finalist_for_seed("triangle")
    assert tri.test == {0: 0.75, 1: 0.76, 2: 0.77} and tri.test_accuracy == tri.test and tri.per_example() == {}
    assert all(t.train_seed is None for t in data.trials) and len(data.completed()) == 13
    table = result_table(data, n_boot=500)
    assert table.row("best").number == 5 and table.row("best seed").name == "rectangle"
    assert all(c.metric.method == PER_SEED for c in table.vs_seeds)
    vs_tri = next(c for c in table.vs_seeds if c.seed == "triangle").metric
    assert vs_tri.n == 3 and vs_tri.mean_diff == pytest.approx((0.69 + 0.70 + 0.74 - 0.75 - 0.76 - 0.77) / 3)
    notes = " ".join(table.notes)
    assert table.notes[0].startswith("no noise floor was measured")
    assert "recorded accuracy only" in notes and "pair per-seed means only" in notes
    assert "chosen on the test split" in notes and "not the exported triangle" in notes


def test_without_finalists_the_table_shows_single_validation_scores(tmp_path: Path) -> None:
    trials = [trial(f"seed:{s}", shape(s), -0.6 - 0.01 * i) for i, s in enumerate(SHAPES)]
    trials += [trial("tpe", a, -0.65 + 0.02 * i) for i, a in enumerate(random_allocations(4, 1))]
    trials.append(trial("seed:triangle", shape("triangle"), 5.0, train_seed=2, pilot=True))  # a replicate
    data = load_study(make_study(tmp_path / "nofin", trials, finalists=()))
    assert len(data.completed()) == 9 and len(data.completed(replicates=True)) == 10
    assert data.seed_trials()["triangle"].train_seed == 0
    table = result_table(data)
    assert not table.on_test and table.row("best").name == "trial 8 (tpe)" and table.best_seed == "triangle"
    assert table.row("best").vs_best_seed.mean_diff == pytest.approx(-0.65 + 0.06 - (-0.6))
    assert math.isnan(table.row("best").vs_best_seed.lo)
