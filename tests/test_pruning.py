"""Pruners for a noisy objective: construction, per-example reporting for Wilcoxon, the benchmark."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mola_search.errors import UserError
from mola_search.search.study.records import TRAIN_SEED
from mola_search.search.pruning import (EXAMPLE_STRIDE, PRUNERS, SameSeedWilcoxonPruner, example_step, make_pruner,
                                       report_rung)
from mola_search.search.seeds import paper_seeds
from mola_search.trial.synthetic import SyntheticObjective

SHAPES = {s.name: s.spec.experts for s in paper_seeds(30, 150, 1, 8)}
OBJECTIVE = SyntheticObjective("upper", 30, 150, 1, 8, noise=0.0, seed_sd=0.0, example_sd=0.3)


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pruner_benchmark.py"
    spec = importlib.util.spec_from_file_location("pruner_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_pruner_builds_optunas_pruners() -> None:
    asha = make_pruner("asha", reduction_factor=3)
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner) and asha._reduction_factor == 3
    assert asha._min_resource == 1
    wilcoxon = make_pruner("wilcoxon", p_threshold=0.05)
    assert isinstance(wilcoxon, SameSeedWilcoxonPruner) and wilcoxon._inner._p_threshold == 0.05
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (("median",), {}, "unknown pruner 'median': use one of asha, wilcoxon, none"),
    (("asha",), {"reduction_factor": 1}, "reduction_factor is 1: use an integer >= 2"),
    (("asha",), {"reduction_factor": 2.5}, "reduction_factor is 2.5"),
    (("wilcoxon",), {"p_threshold": 0}, "p_threshold is 0: use a p-value in"),
    (("wilcoxon",), {"p_threshold": 1.5}, "p_threshold is 1.5"),
])
def test_make_pruner_refuses_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_pruner(*args, **kwargs)


def test_example_steps_keep_rungs_apart() -> None:
    assert example_step(1, 0) == EXAMPLE_STRIDE and example_step(2, 5) == 2 * EXAMPLE_STRIDE + 5
    for rung, index, message in [(0, 0, "rung is 0"), (1, -1, "example index is -1"),
                                 (1, EXAMPLE_STRIDE, "example index is 1000000")]:
        with pytest.raises(UserError, match=message):
            example_step(rung, index)


def _study(pruner: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", pruner=make_pruner(pruner),
                               sampler=optuna.samplers.RandomSampler(seed=0))


def _complete(study: optuna.Study, pruner: str, experts: list[int], rungs=(0.5, 1.0), train_seed: int | None = None
              ) -> None:
    trial = study.ask()
    if train_seed is not None:
        trial.set_user_attr(TRAIN_SEED, train_seed)
    for k, f in enumerate(rungs, start=1):
        report_rung(trial, pruner, k, OBJECTIVE.observe(experts, seed=0, fidelity=f),
                    OBJECTIVE.observe_examples(experts, seed=0, fidelity=f, n=50))
        if k < len(rungs):  # ASHA records a trial's rung score only when asked (the call order of pruning.py)
            assert trial.should_prune() is False
    study.tell(trial, OBJECTIVE.observe(experts, seed=0, fidelity=rungs[-1]))


def _first_rung_prunes(study: optuna.Study, pruner: str, experts: list[int], train_seed: int | None = None) -> bool:
    trial = study.ask()
    if train_seed is not None:
        trial.set_user_attr(TRAIN_SEED, train_seed)
    report_rung(trial, pruner, 1, OBJECTIVE.observe(experts, seed=0, fidelity=0.5),
                OBJECTIVE.observe_examples(experts, seed=0, fidelity=0.5, n=50))
    return trial.should_prune()


def test_report_rung_steps() -> None:
    study = _study("wilcoxon")
    _complete(study, "wilcoxon", SHAPES["rectangle"])
    steps = sorted(study.trials[0].intermediate_values)
    assert steps == [example_step(1, i) for i in range(50)] + [example_step(2, i) for i in range(50)]
    study = _study("asha")
    _complete(study, "asha", SHAPES["rectangle"])
    assert study.trials[0].intermediate_values == {
        1: OBJECTIVE.observe(SHAPES["rectangle"], seed=0, fidelity=0.5),
        2: OBJECTIVE.observe(SHAPES["rectangle"], seed=0, fidelity=1.0)}
    trial = study.ask()
    report_rung(trial, "none", 1, math.nan, None)  # a NaN rung is the caller's failure to record
    assert trial.should_prune() is False and study.trials[-1].intermediate_values == {}
    with pytest.raises(UserError, match="wilcoxon pruner needs per-example"):
        report_rung(trial, "wilcoxon", 1, 0.5, None)
    with pytest.raises(UserError, match="unknown pruner 'hyperband'"):
        report_rung(trial, "hyperband", 1, 0.5, [0.5])


@pytest.mark.parametrize("pruner", ["wilcoxon", "asha"])
def test_prunes_a_clearly_worse_trial_and_keeps_a_better_one(pruner: str) -> None:
    """Noise-free runs (per-example spread only): triangle (0.41) is worse than rectangle (0.79), the
    inverted triangle (0.98) better. Wilcoxon pairs the 50 examples with the best trial's at rung 1."""
    values = {name: OBJECTIVE.value(SHAPES[name]) for name in ("triangle", "rectangle", "inverted_triangle")}
    assert values["triangle"] < values["rectangle"] < values["inverted_triangle"]
    study = _study(pruner)
    _complete(study, pruner, SHAPES["rectangle"])
    assert _first_rung_prunes(study, pruner, SHAPES["triangle"]) is True
    study.tell(study.trials[-1].number, state=TrialState.PRUNED)
    assert _first_rung_prunes(study, pruner, SHAPES["inverted_triangle"]) is False
    assert _first_rung_prunes(_study("none"), "none", SHAPES["triangle"]) is False


def test_benchmark_at_tiny_size() -> None:
    bench = _benchmark()
    report = bench.benchmark_pruners(trials=8, repeats=2, examples=20)
    assert set(report["results"]) == set(PRUNERS)
    for name, result in report["results"].items():
        for key in ("top_pruned_rate", "pruned_rate", "rung_evals_saved", "training_saved"):
            assert 0.0 <= result[key] <= 1.0, (name, key)
        assert 0.0 <= result["best_true"] <= 1.0 and result["regret"] >= 0.0
    none = report["results"]["none"]
    assert none["pruned_rate"] == none["top_pruned_rate"] == none["rung_evals_saved"] == 0.0
    assert report["results"]["asha"]["rung_evals_saved"] > 0  # r = 2 stops about half at rung 1
    assert all(len(rows) == 2 for rows in report["studies"].values())
    assert "| none | 0.0% | 0.0% | 0.0% |" in bench.markdown(report)


def test_wilcoxon_compares_with_the_best_trial_of_the_same_training_seed() -> None:
    """A pilot run at another seed that scored best must not become the bar for study-seed trials.

    Study seed 0: rectangle completed. A pilot run at seed 7 (the inverted triangle, better) completed too.
    A new seed-0 trial that matches the seed-0 rectangle example for example is not pruned, although
    Optuna's own WilcoxonPruner (reference: the best trial of any seed) prunes it; a clearly worse seed-0
    trial (the triangle) is still pruned."""
    def study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
        s = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
        _complete(s, "wilcoxon", SHAPES["rectangle"], train_seed=0)
        _complete(s, "wilcoxon", SHAPES["inverted_triangle"], train_seed=7)
        assert s.best_trial.user_attrs[TRAIN_SEED] == 7
        return s

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ours = study(make_pruner("wilcoxon", reference_seed=0))
    assert _first_rung_prunes(ours, "wilcoxon", SHAPES["rectangle"], train_seed=0) is False
    ours.tell(ours.trials[-1].number, state=TrialState.PRUNED)
    assert _first_rung_prunes(ours, "wilcoxon", SHAPES["triangle"], train_seed=0) is True
    ours.tell(ours.trials[-1].number, state=TrialState.PRUNED)
    assert _first_rung_prunes(ours, "wilcoxon", SHAPES["rectangle"]) is False  # no seed recorded: the study seed
    stock = study(optuna.pruners.WilcoxonPruner(p_threshold=0.1))
    assert _first_rung_prunes(stock, "wilcoxon", SHAPES["rectangle"], train_seed=0) is True
    fresh = optuna.create_study(direction="maximize", pruner=make_pruner("wilcoxon"))
    _complete(fresh, "wilcoxon", SHAPES["inverted_triangle"], train_seed=7)
    assert _first_rung_prunes(fresh, "wilcoxon", SHAPES["triangle"], train_seed=0) is False  # no seed-0 reference yet
