"""The honest result table: chosen on validation, reported on test once, paired on examples x seeds.

Study folders are built in code (an Optuna sqlite study + finalists' metrics.json +
noise.json in the layout of the shared data contract), so nothing is trained here;
`make_study` and friends (tests/helpers.py) are also used by test_report.py and test_analysis.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mola_search.analysis.results import EXAMPLES_X_SEEDS, PER_SEED, paired_examples, result_table
from mola_search.analysis.studydata import load_study
from helpers import FINALIST_SEEDS, SHAPES, finalist, make_study, old_metrics, random_allocations, run_metrics, shape, trial

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
