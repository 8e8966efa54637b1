"""The noise floor: variance components of pilot scores, their interval, and noise.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from mola_search.errors import UserError
from mola_search.search.study import StudyFolder
from mola_search.stats.noise import NoiseFloor, estimate_noise

NOISE_FILE = "noise.json"
from mola_search.search.seeds import paper_seeds
from mola_search.trial.synthetic import SyntheticObjective

PILOT = ("triangle", "inverted_triangle", "rectangle")
SHAPES = {s.name: s.spec.experts for s in paper_seeds(30, 150, 1, 8)}


def _objective(noise: float, seed_sd: float = 0.3, name: str = "upper") -> SyntheticObjective:
    return SyntheticObjective(name, 30, 150, 1, 8, noise=noise, seed_sd=seed_sd, example_sd=0.3)


def _pilot(objective: SyntheticObjective, allocations: dict[str, list[int]], seeds: range,
           **kwargs: object) -> dict[str, dict[int, float]]:
    return {name: {k: objective.observe(x, seed=k, **kwargs) for k in seeds} for name, x in allocations.items()}


# ------------------------------------------------------------------------------------ recovery and coverage


@pytest.mark.parametrize(("noise", "fidelity", "train_examples", "tolerance"), [
    (0.1, 1.0, None, 0.02),   # true share 0.90; sd of the estimate over 150 pilots 0.005
    (0.3, 1.0, None, 0.08),   # true share 0.49; sd 0.022
    (0.3, 0.5, 256, 0.08),    # true share 0.35 (shrunk values, 4x the data); sd 0.023
])
def test_recovers_the_true_allocation_share(noise: float, fidelity: float, train_examples: int | None,
                                            tolerance: float) -> None:
    """3 allocations x N = 400 seeds recover `true_allocation_share` within `tolerance` (~3.5 sd).

    The sd of the estimate was measured over 150 independent pilots of this size (seed
    blocks 400 r .. 400 r + 399); |error| never exceeded 0.015 / 0.052 / 0.070. A 3 x 3
    pilot is far less precise (sd ~0.3): that is what the interval is for.
    """
    objective = _objective(noise)
    pilot = {name: SHAPES[name] for name in PILOT}
    truth = objective.true_allocation_share(list(pilot.values()), fidelity=fidelity, train_examples=train_examples)
    floor = estimate_noise(_pilot(objective, pilot, range(400), fidelity=fidelity, train_examples=train_examples))
    assert floor.allocation_share == pytest.approx(truth, abs=tolerance)
    assert floor.share_ci[0] <= floor.allocation_share <= floor.share_ci[1]
    assert floor.can_separate
    # the residual sd is the model's, h g noise (module docstring of synthetic)
    scale = math.sqrt(64 / (train_examples or 64)) * (3 - 2 * fidelity)
    assert math.sqrt(floor.residual_var) == pytest.approx(noise * scale, rel=0.1)


def _coverage(objective: SyntheticObjective, allocations: dict[str, list[int]], seeds: int,
              repeats: int = 400) -> tuple[float, float, float]:
    truth = objective.true_allocation_share(list(allocations.values()))
    covered = separated = 0
    for r in range(repeats):
        floor = estimate_noise(_pilot(objective, allocations, range(r * seeds, (r + 1) * seeds)))
        covered += floor.share_ci[0] <= truth <= floor.share_ci[1]
        separated += floor.can_separate
    return truth, covered / repeats, separated / repeats


@pytest.mark.parametrize(("noise", "seeds"), [(0.3, 3), (0.1, 8)])
def test_interval_covers_the_truth_at_its_level(noise: float, seeds: int) -> None:
    """Over 400 pilots the 95% interval covers the true share 0.88..0.99 of the time.

    Measured: 3 x 3 pilots at share 0.49 and 3 x 8 at share 0.90. The second case also
    rules out the random-effects interval (F / (1 + b theta) ~ central F): for fixed
    allocations it over-covers (0.997 at this size).
    """
    pilot = {name: SHAPES[name] for name in PILOT}
    truth, coverage, _ = _coverage(_objective(noise), pilot, seeds)
    assert 0.3 < truth < 0.95
    assert 0.88 <= coverage <= 0.99


def test_equal_allocations_are_rarely_called_separable() -> None:
    """Three allocations with the same value (sparse: they differ in uninformative layers only).

    can_separate means p < (1 - level) / 2 = 0.025; over 400 pilots of 3 x 3 it should fire
    about that often (0.005..0.06 allowed), and the interval contains 0 otherwise.
    """
    objective = _objective(0.05, name="sparse")
    base, _ = objective.optimum()
    assert 1 < base[0] < 8 and 1 < base[1] < 8 and 0 not in objective.informative_layers()
    pilot = {"a": base, "b": [base[0] + 1, base[1] - 1, *base[2:]], "c": [base[0] - 1, base[1] + 1, *base[2:]]}
    assert len({tuple(x) for x in pilot.values()}) == 3
    truth, coverage, separated = _coverage(objective, pilot, 3)
    assert truth == 0.0
    assert 0.005 <= separated <= 0.06
    assert coverage == pytest.approx(1 - separated)


# ------------------------------------------------------------------------------------ the analysis itself


def test_matches_a_regression_anova() -> None:
    """F, p and the components agree with an independent least-squares fit (full vs no-allocation model)."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=(4, 5)) + np.array([0.0, 0.4, 0.8, 0.1])[:, None] + rng.normal(size=5)[None, :]
    floor = estimate_noise({f"x{i}": {j: float(y[i, j]) for j in range(5)} for i in range(4)}, level=0.9)
    rows, cols = np.indices(y.shape)
    design = [np.ones(y.size)] + [(rows.ravel() == i) * 1.0 for i in range(1, 4)] + [(cols.ravel() == j) * 1.0
                                                                                       for j in range(1, 5)]
    full, reduced = np.column_stack(design), np.column_stack([design[0], *design[4:]])
    rss = [float(np.sum((y.ravel() - m @ np.linalg.lstsq(m, y.ravel(), rcond=None)[0]) ** 2))
           for m in (full, reduced)]
    f_stat = ((rss[1] - rss[0]) / 3) / (rss[0] / 12)
    assert floor.f_statistic == pytest.approx(f_stat)
    assert floor.p_value == pytest.approx(stats.f.sf(f_stat, 3, 12))
    assert floor.residual_var == pytest.approx(rss[0] / 12)
    assert floor.allocation_var == pytest.approx(max(0.0, (rss[1] - rss[0]) / 3 - rss[0] / 12) / 5)
    assert floor.min_detectable_difference == pytest.approx(stats.norm.ppf(0.95) * math.sqrt(2 * rss[0] / 12))
    assert floor.level == 0.9 and floor.can_separate == (floor.p_value < 0.05)


def test_blocking_on_the_seed_matters() -> None:
    """A large shared seed effect hides the allocations from a one-way analysis, not from the blocked one."""
    objective = _objective(noise=0.02, seed_sd=1.0)
    scores = _pilot(objective, {name: SHAPES[name] for name in PILOT}, range(5))
    one_way = stats.f_oneway(*[list(row.values()) for row in scores.values()])
    assert one_way.pvalue > 0.3  # ignoring the seeds: nothing to see
    floor = estimate_noise(scores)
    assert floor.allocation_share > 0.9 and floor.can_separate and floor.p_value < 1e-4
    assert floor.seed_share > 0.7
    truth = objective.true_allocation_share([SHAPES[name] for name in PILOT])
    assert floor.share_ci[0] <= truth <= floor.share_ci[1]


def test_line_says_whether_the_search_can_separate() -> None:
    pilot = {name: SHAPES[name] for name in PILOT}
    clear = estimate_noise(_pilot(_objective(0.02), pilot, range(3)), fidelity={"max_train_examples": 64})
    blurred = estimate_noise(_pilot(_objective(2.0), pilot, range(3)))
    assert clear.can_separate and not blurred.can_separate
    assert clear.line().endswith("at this fidelity the search can separate them")
    assert blurred.line().endswith("at this fidelity the search cannot separate them")
    for floor in (clear, blurred):
        line = floor.line()
        assert line.startswith(f"noise floor: allocations explain {100 * floor.allocation_share:.0f}% ")
        assert f"(95% CI {100 * floor.share_ci[0]:.0f}-{100 * floor.share_ci[1]:.0f}%)" in line
        assert "over 3 allocations x 3 seeds" in line and "gold_logprob" in line
        assert f"differences below {floor.min_detectable_difference:.2g} are noise" in line
    assert estimate_noise({"a": {0: 1.0}}).line().startswith("noise floor: not estimated")


def test_an_interval_of_0_to_0_says_why_it_is_not_certainty() -> None:
    """Equal allocation means: the inverted F test's upper bound is 0 too, which reads as certainty unless said."""
    equal = estimate_noise(_table({"a": [0.1, 0.5, 0.3], "b": [0.3, 0.1, 0.5], "c": [0.5, 0.3, 0.1]}))
    assert equal.share_ci == (0.0, 0.0) and not equal.can_separate
    assert ("(95% CI 0-0%: the allocations agree more closely than seed noise alone would make them) over 3 "
            "allocations x 3 seeds") in equal.line()
    spread = estimate_noise(_table({"a": [0.1, 0.5, 0.3], "b": [0.3, 0.1, 0.6], "c": [0.6, 0.4, 0.2]}))
    assert spread.share_ci[1] > 0 and "agree more closely" not in spread.line()


# ------------------------------------------------------------------------------------ incomplete and degenerate


def _table(values: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {name: dict(enumerate(row)) for name, row in values.items()}


def test_incomplete_pilot_drops_seeds_before_allocations() -> None:
    scores = _table({"a": [0.1, 0.2, 0.35], "b": [0.3, 0.5, math.nan], "c": [0.2, 0.3, 0.4]})
    floor = estimate_noise(scores)
    assert floor.allocations == ("a", "b", "c") and floor.seeds == (0, 1)  # 3 x 2 beats 2 x 3 (tie: seeds go)
    assert any("'b' seed 2 scored nan" in n for n in floor.notes)
    assert any("dropped seed(s) 2" in n for n in floor.notes)
    assert floor.scores == {"a": {0: 0.1, 1: 0.2}, "b": {0: 0.3, 1: 0.5}, "c": {0: 0.2, 1: 0.3}}

    scores = _table({"a": [0.1, 0.2, 0.3, 0.45], "b": [0.3, 0.5, 0.6, 0.8], "c": [0.2]})  # 2 x 4 beats 3 x 1
    floor = estimate_noise(scores)
    assert floor.allocations == ("a", "b") and floor.seeds == (0, 1, 2, 3)
    assert any("dropped allocation(s) c" in n for n in floor.notes)
    assert math.isfinite(floor.allocation_share)


@pytest.mark.parametrize("scores", [{}, {"a": {0: 1.0, 1: 2.0}}, {"a": {0: 1.0}, "b": {1: 2.0}},
                                    {"a": {0: math.nan, 1: 1.0}, "b": {0: 1.0, 1: math.inf}}])
def test_too_little_data_gives_nan_not_an_error(scores: dict) -> None:
    floor = estimate_noise(scores)
    assert math.isnan(floor.allocation_share) and math.isnan(floor.residual_var) and not floor.can_separate
    assert any("need >= 2 allocations x 2 seeds" in n for n in floor.notes)
    assert NoiseFloor.from_dict(json.loads(json.dumps(floor.to_dict(), allow_nan=False))).notes == floor.notes


def test_exactly_zero_residual_variance() -> None:
    additive = estimate_noise(_table({"a": [0.1, 0.3, 0.2], "b": [0.4, 0.6, 0.5]}))  # b = a + 0.3 at every seed
    assert additive.residual_var == 0 and additive.allocation_share == 1.0 and additive.share_ci == (1.0, 1.0)
    assert additive.can_separate and additive.f_statistic == math.inf and additive.p_value == 0.0
    assert any("residual variance is exactly zero" in n for n in additive.notes)
    same = estimate_noise(_table({"a": [0.1, 0.3], "b": [0.1, 0.3]}))
    assert math.isnan(same.allocation_share) and not same.can_separate and same.seed_share == 1.0
    assert any("nothing to separate" in n for n in same.notes)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scores": {"a": {"zero": 1.0}}}, "seed 'zero' of allocation 'a' is not an integer"),
    ({"scores": {"a": [1.0]}}, "use a mapping seed -> score"),
    ({"scores": {"a": {0: "x"}}}, "score of 'a' at seed 0 is 'x'"),
    ({"scores": {}, "level": 1.0}, "level is 1.0: use a confidence level in"),
])
def test_malformed_input_is_refused(kwargs: dict, message: str) -> None:
    scores = kwargs.pop("scores")
    with pytest.raises(UserError, match=message):
        estimate_noise(scores, **kwargs)


# ------------------------------------------------------------------------------------ noise.json


def test_noise_json_round_trip_with_rounds(tmp_path) -> None:
    pilot = {name: SHAPES[name] for name in PILOT}
    rounds = [estimate_noise(_pilot(_objective(0.3), pilot, range(3), train_examples=n), fidelity={"n": n})
              for n in (64, 128)]
    chosen = estimate_noise(_pilot(_objective(0.3), pilot, range(3), train_examples=256), fidelity={"n": 256})
    assert StudyFolder(tmp_path).read_noise() is None and StudyFolder(tmp_path).read_noise_rounds() == []
    path = StudyFolder(tmp_path).write_noise(chosen, rounds)
    assert path == tmp_path / NOISE_FILE
    raw = json.loads(path.read_text())
    assert set(raw["scores"]["triangle"]) == {"0", "1", "2"}
    assert raw["line"] == chosen.line() and raw["allocation_share"] == chosen.allocation_share
    assert [r["fidelity"] for r in raw["rounds"]] == [{"n": 64}, {"n": 128}, {"n": 256}]
    assert StudyFolder(tmp_path).read_noise() == chosen
    assert StudyFolder(tmp_path).read_noise_rounds() == [*rounds, chosen]
    StudyFolder(tmp_path).write_noise(chosen, [*rounds, chosen])  # already last: not repeated
    assert len(StudyFolder(tmp_path).read_noise_rounds()) == 3

    degenerate = estimate_noise(_table({"a": [0.1, 0.3, 0.2], "b": [0.4, 0.6, 0.5]}))
    StudyFolder(tmp_path).write_noise(degenerate)
    assert StudyFolder(tmp_path).read_noise() == degenerate  # inf F survives as null + zero residual


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "holds a list"),
    ('{"metric": "gold_logprob"}', "lacks fidelity"),
])
def test_corrupt_noise_json_is_a_user_error(tmp_path, text: str, message: str) -> None:
    (tmp_path / NOISE_FILE).write_text(text)
    with pytest.raises(UserError, match=message):
        StudyFolder(tmp_path).read_noise()
