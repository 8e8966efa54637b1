"""Synthetic objectives: their optimum is truly optimal, scores are bounded, noise follows fidelity."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import optuna
import pytest

from mola_search.allocation import round_to_budget
from mola_search.errors import UserError
from mola_search.search.seeds import paper_seeds
from mola_search.search.space import make_space
from mola_search.trial.synthetic import SYNTHETIC_NAMES, SyntheticObjective, is_synthetic, make_synthetic


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
    space = make_space("blocks")
    seeds = paper_seeds(num_layers, budget, 1, 8)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for seed in seeds:
        study.enqueue_trial(space.encode(seed.spec)[0])
    study.optimize(lambda trial: objective(space.suggest(trial, num_layers, budget).experts), n_trials=40)
    best_seed = max(objective.value(seed.spec.experts) for seed in seeds)
    assert [t.value for t in study.trials[:5]] == [objective.value(s.spec.experts) for s in seeds]
    assert study.best_value > best_seed


# ------------------------------------------------------------------------------------ seeded observation model

def _upper(**knobs: float) -> SyntheticObjective:
    return SyntheticObjective("upper", 30, 150, 1, 8, **knobs)


SHAPES = {s.name: s.spec.experts for s in paper_seeds(30, 150, 1, 8)}


def test_observe_is_a_fixed_seed_training_run() -> None:
    objective = _upper(noise=0.05, seed_sd=0.1)
    x = SHAPES["rectangle"]
    assert objective.observe(x, seed=3) == objective.observe(list(x), seed=3)  # no trial number: same run
    assert len({objective.observe(x, seed=3, fidelity=f) for f in (0.5, 1.0)}) == 2
    assert len({objective.observe(x, seed=s) for s in range(5)}) == 5
    assert objective.observe(x, seed=3, train_examples=64) == objective.observe(x, seed=3)  # 64 is the reference
    assert objective.observe(x, seed=3, train_examples=128) != objective.observe(x, seed=3)
    quiet = _upper(noise=0.0, seed_sd=0.0)
    assert quiet.observe(x, seed=3) == quiet.value(x)
    assert quiet.observe(x, seed=3, fidelity=0.5) == pytest.approx(0.75 * quiet.value(x) + 0.125)


def test_seed_effect_is_shared_and_noise_scales_with_data_and_fidelity() -> None:
    """sd of one observation sqrt(seed_sd^2 + noise^2); seed-paired differences only sqrt(2) noise;
    doubling the training examples divides both by sqrt(2); fidelity 0.5 doubles them."""
    objective = _upper(noise=0.05, seed_sd=0.2)
    a, b = SHAPES["triangle"], SHAPES["inverted_triangle"]
    seeds = range(2000)

    def sds(**kwargs: object) -> tuple[float, float]:
        ya = [objective.observe(a, seed=k, **kwargs) for k in seeds]
        yb = [objective.observe(b, seed=k, **kwargs) for k in seeds]
        return statistics.stdev(ya), statistics.stdev([p - q for p, q in zip(ya, yb)])

    single, paired = sds()
    assert single == pytest.approx(math.hypot(0.2, 0.05), rel=0.06)
    assert paired == pytest.approx(0.05 * math.sqrt(2), rel=0.06)
    single_128, paired_128 = sds(train_examples=128)
    assert single_128 == pytest.approx(single / math.sqrt(2), rel=0.08)
    assert paired_128 == pytest.approx(paired / math.sqrt(2), rel=0.08)
    assert sds(fidelity=0.5)[1] == pytest.approx(2 * paired, rel=0.08)


def test_true_allocation_share_matches_the_observations() -> None:
    """The share computed from the model equals the one measured from 3000 seeds (seed-paired residuals)."""
    objective = _upper(noise=0.3, seed_sd=0.3)
    allocations = [SHAPES[n] for n in ("triangle", "inverted_triangle", "rectangle")]
    for kwargs in ({}, {"fidelity": 0.5, "train_examples": 256}):
        ys = [[objective.observe(x, seed=k, **kwargs) for k in range(3000)] for x in allocations]
        seed_means = [statistics.fmean(col) for col in zip(*ys)]
        residual = statistics.fmean(statistics.variance([y - m for y, m in zip(row, seed_means)]) for row in ys) * 1.5
        shrink = (1 - kwargs.get("fidelity", 1.0)) / 2
        clean = [(1 - shrink) * objective.value(x) + shrink / 2 for x in allocations]
        spread = statistics.variance(clean)
        assert objective.true_allocation_share(allocations, **kwargs) == pytest.approx(
            spread / (spread + residual), abs=0.02)
    assert _upper(noise=0.0).true_allocation_share(allocations) == 1.0
    assert _upper(noise=0.1).true_allocation_share([allocations[0]] * 3) == 0.0
    assert math.isnan(_upper(noise=0.0).true_allocation_share([allocations[0]] * 2))
    with pytest.raises(UserError, match="needs at least 2"):
        objective.true_allocation_share(allocations[:1])


def test_observe_examples_average_to_the_observation() -> None:
    objective = _upper(noise=0.05, seed_sd=0.1, example_sd=0.3)
    a, b = SHAPES["triangle"], SHAPES["rectangle"]
    va = objective.observe_examples(a, seed=1, fidelity=0.5, n=400)
    vb = objective.observe_examples(b, seed=1, fidelity=0.5, n=400)
    assert len(va) == 400 and va == objective.observe_examples(a, seed=1, fidelity=0.5, n=400)
    assert statistics.fmean(va) == pytest.approx(objective.observe(a, seed=1, fidelity=0.5), abs=1e-12)
    assert statistics.stdev(va) == pytest.approx(0.3 * math.sqrt(2), rel=0.12)
    # example difficulty is shared by allocations (and seeds): half the per-example variance
    assert statistics.correlation(va, vb) == pytest.approx(0.5, abs=0.12)
    vc = objective.observe_examples(a, seed=2, fidelity=0.5, n=400)
    assert statistics.correlation(va, vc) == pytest.approx(0.5, abs=0.12)
    assert objective.observe_examples(a, seed=1, n=1) == [objective.observe(a, seed=1)]


@pytest.mark.parametrize(("call", "message"), [
    (lambda o, x: o.observe(x, seed=-1), "seed is -1"),
    (lambda o, x: o.observe(x, seed=1.5), "seed is 1.5"),
    (lambda o, x: o.observe(x, seed=0, fidelity=0), "fidelity is 0"),
    (lambda o, x: o.observe(x, seed=0, train_examples=0), "train_examples is 0"),
    (lambda o, x: o.observe(x[:-1], seed=0), "has 29 layers"),
    (lambda o, x: o.observe_examples(x, seed=0, n=0), "n is 0"),
])
def test_observe_refuses_bad_arguments(call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call(_upper(), SHAPES["rectangle"])


def test_make_synthetic_takes_the_noise_knobs() -> None:
    objective = make_synthetic("synthetic:middle", 8, 24, 1, 8, 0.02, seed_sd=0.3, example_sd=0.5)
    assert (objective.noise, objective.seed_sd, objective.example_sd) == (0.02, 0.3, 0.5)
    for key in ("noise", "seed_sd", "example_sd"):
        with pytest.raises(UserError, match=f"{key} is -1"):
            SyntheticObjective("upper", 8, 24, **{key: -1})
