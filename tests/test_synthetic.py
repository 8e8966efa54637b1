"""Synthetic objectives: their optimum is truly optimal, scores are bounded, noise follows fidelity."""

from __future__ import annotations

import itertools
import random
import statistics

import optuna
import pytest

from mola_search.allocation import round_to_budget
from mola_search.errors import UserError
from mola_search.search.seeds import paper_seeds
from mola_search.search.space import SearchSpace
from mola_search.search.synthetic import SYNTHETIC_NAMES, SyntheticObjective, is_synthetic, make_synthetic


def _feasible(num_layers: int, budget: int, low: int, high: int) -> list[tuple[int, ...]]:
    return [c for c in itertools.product(range(low, high + 1), repeat=num_layers) if sum(c) == budget]


@pytest.mark.parametrize("name", SYNTHETIC_NAMES)
@pytest.mark.parametrize(("num_layers", "budget", "low", "high"),
                         [(4, 10, 1, 4), (5, 12, 1, None), (6, 14, 1, 5), (4, 9, 2, 3), (1, 5, 1, None)])
def test_optimum_is_optimal_by_brute_force(name: str, num_layers: int, budget: int, low: int,
                                           high: int | None) -> None:
    objective = SyntheticObjective(name, num_layers, budget, low, high)
    best, best_value = objective.optimum()
    assert sum(best) == budget and min(best) >= low and (high is None or max(best) <= high)
    values = [objective.value(c) for c in _feasible(num_layers, budget, low, high or budget)]
    assert best_value == pytest.approx(max(values)) == pytest.approx(1.0)
    assert all(-1e-12 <= v <= 1.0 + 1e-12 for v in values)
    if num_layers > 1:
        assert min(values) < 0.9  # the score really discriminates


@pytest.mark.parametrize("name", SYNTHETIC_NAMES)
def test_no_random_allocation_beats_the_optimum_on_30_layers(name: str) -> None:
    objective = SyntheticObjective(name, 30, 150, 1, 8)
    best, best_value = objective.optimum()
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.random() ** rng.choice([1, 4]) for _ in range(30)]
        experts = round_to_budget(weights, 150, 1, 8)
        assert 0.0 <= objective.value(experts) <= best_value
    for seed in paper_seeds(30, 150, 1, 8):
        assert objective.value(seed.spec.experts) < best_value


def test_target_shapes() -> None:
    upper, _ = SyntheticObjective("upper", 30, 150, 1, 8).optimum()
    assert upper == sorted(upper) and upper[-1] > upper[0]
    middle, _ = SyntheticObjective("middle", 30, 150, 1, 8).optimum()
    assert middle.index(max(middle)) in range(8, 22) and middle[0] < max(middle) and middle[-1] < max(middle)
    sparse_objective = SyntheticObjective("sparse", 30, 150, 1, 8)
    sparse, _ = sparse_objective.optimum()
    assert sparse_objective.informative_layers() == tuple(range(22, 30))
    assert sparse[22:] == [8] * 8 and sum(sparse[:22]) == 150 - 64


def test_sparse_ignores_uninformative_layers() -> None:
    objective = SyntheticObjective("sparse", 8, 24, 1, 8)
    assert objective.informative_layers() == (6, 7)
    base = [3, 3, 3, 3, 3, 3, 3, 3]
    moved = [1, 5, 3, 3, 3, 3, 3, 3]  # moved between uninformative layers only
    assert objective.value(base) == objective.value(moved)
    assert objective.value([2, 3, 3, 3, 3, 3, 3, 4]) > objective.value(base)
    assert SyntheticObjective("upper", 8, 24).informative_layers() == tuple(range(8))


def test_noise_depends_on_fidelity() -> None:
    objective = SyntheticObjective("upper", 10, 40, 1, 8, noise=0.05)
    experts = round_to_budget([1.0] * 10, 40, 1, 8)
    clean = objective.value(experts)
    rng = random.Random(0)
    full = [objective(experts, 1.0, rng) for _ in range(3000)]
    low = [objective(experts, 0.25, rng) for _ in range(3000)]
    assert statistics.fmean(full) == pytest.approx(clean, abs=0.005)
    assert statistics.stdev(full) == pytest.approx(0.05 * 0.5, rel=0.1)
    assert statistics.stdev(low) == pytest.approx(0.05 * 1.25, rel=0.1)
    assert statistics.fmean(low) == pytest.approx(0.625 * clean + 0.375 * 0.5, abs=0.005)  # shrunk to 0.5


def test_observations_are_repeatable_without_an_rng() -> None:
    objective = SyntheticObjective("middle", 10, 40)
    experts = round_to_budget([1.0] * 10, 40, 1, 8)
    assert objective(experts, 0.5) == objective(experts, 0.5)
    assert objective(experts, 0.5) != objective(experts, 1.0)
    assert SyntheticObjective("middle", 10, 40, noise=0.0)(experts) == objective.value(experts)


@pytest.mark.parametrize(("experts", "fidelity", "message"), [
    ([4] * 9, 1.0, "has 9 layers"),
    ([4] * 9 + [5], 1.0, "sums to 41"),
    ([9, 1, 1, 1, 1, 1, 5, 7, 7, 7], 1.0, None),
    ([4] * 10, 0.0, "fidelity is 0.0"),
    ([4] * 10, 1.5, "fidelity is 1.5"),
])
def test_invalid_inputs_are_refused(experts: list[int], fidelity: float, message: str | None) -> None:
    objective = SyntheticObjective("upper", 10, 40, 1, 8)
    with pytest.raises(UserError, match=message or "layer 0 has 9 experts"):
        objective(experts, fidelity)


def test_make_synthetic_parses_names() -> None:
    assert make_synthetic("synthetic", 8, 24).name == "upper"
    assert make_synthetic("synthetic:sparse", 8, 24, 1, 4) == SyntheticObjective("sparse", 8, 24, 1, 4)
    assert make_synthetic(" Synthetic:Middle ", 8, 24).name == "middle"
    for bad in ("synthetic:pyramid", "pyramid", "synthetic_upper"):
        with pytest.raises(UserError, match="synthetic, synthetic:upper, synthetic:middle, synthetic:sparse"):
            make_synthetic(bad, 8, 24)
    with pytest.raises(UserError, match="infeasible"):
        make_synthetic("synthetic", 8, 100, 1, 8)
    assert is_synthetic("synthetic:upper") and not is_synthetic("gsm8k")


def test_a_seeded_optuna_search_beats_the_paper_seeds() -> None:
    """End to end: blocks space + enqueued paper seeds + TPE improve on the best seed."""
    num_layers, budget = 12, 48
    objective = make_synthetic("synthetic:upper", num_layers, budget, 1, 8, noise=0.0)
    space = SearchSpace("blocks")
    seeds = paper_seeds(num_layers, budget, 1, 8)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for seed in seeds:
        study.enqueue_trial(space.encode(seed.spec)[0])
    study.optimize(lambda trial: objective(space.suggest(trial, num_layers, budget).experts), n_trials=40)
    best_seed = max(objective.value(seed.spec.experts) for seed in seeds)
    assert [t.value for t in study.trials[:5]] == [objective.value(s.spec.experts) for s in seeds]
    assert study.best_value > best_seed
