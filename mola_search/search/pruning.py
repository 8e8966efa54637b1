"""Pruners for a noisy objective, and how a trial reports a rung to them.

Three choices (`PRUNERS`):

* ``asha``: Optuna's `SuccessiveHalvingPruner(min_resource=1, reduction_factor=r)`.
  A trial reports its rung score ``mean`` at ``step = rung`` (rungs numbered 1, 2, ...).
  A report at step s is judged at ASHA level j when s >= r**j (min_resource = 1): step 1
  at level 0, step 2 at level 1 (r = 2), step 4 at level 2; the trial is stopped unless
  its score is in the top 1/r of the scores all trials reported at that level. ASHA
  records a trial's score at a level only inside `should_prune`: a trial that never asks
  (e.g. one told COMPLETE without asking) is not among the competitors.
  One noisy number per rung: a trial whose run was unlucky is stopped like a bad one.
* ``wilcoxon``: Optuna's `WilcoxonPruner(p_threshold=p)`. A trial reports one value per
  validation example, example i of rung k at ``step = example_step(k, i) = k * EXAMPLE_STRIDE + i``,
  so examples pair up across trials (same ids, same order: the eval subsample does not
  depend on the training seed). Semantics of the installed Optuna (``optuna/pruners/_wilcoxon.py``):

  - "best" is ``study.best_trial``: the COMPLETE trial with the highest final value
    (study direction "maximize"), whose intermediate values are all its rungs' examples.
    Here it is the best COMPLETE trial *trained with the same seed* as the trial being
    judged (`SameSeedWilcoxonPruner`): the pilot's runs at other seeds are trials too, and
    a lucky seed must not become the bar every search trial is held to;
  - the current trial is compared on the steps both have (so rung k with rung k);
    ``scipy.stats.wilcoxon(current - best, alternative="less", zero_method="zsplit")``;
  - it is pruned when p < p_threshold, *unless* the mean of its reported values is >= the
    best trial's mean over *all* the best trial's steps (every rung; a safety rule);
  - no pruning before ``max(2, n_startup_steps)`` paired steps (default 2: irrelevant
    here, a rung reports all its examples before `should_prune` is asked);
  - NaN/inf values anywhere (current or best) mean "never prune".

  The test pairs *examples*: it treats the validation set as the only randomness. The
  run-to-run noise of training (same seed, different allocation: the residual of
  `mola_search.stats.noise`) shifts all of a run's examples together and is invisible
  to it, so with a noisy objective it is confident about differences that are noise.
* ``none``: `NopPruner`: every trial runs all rungs.

Call order in a trial: for each rung k = 1..K: train to the rung, score, then
``report_rung(trial, name, k, mean, per_example)`` and, before the last rung,
``trial.should_prune()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import optuna

from mola_search.errors import UserError
from mola_search.search.study.records import trial_seed

PRUNERS: tuple[str, ...] = ("asha", "wilcoxon", "none")
EXAMPLE_STRIDE = 1_000_000  # steps reserved per rung for per-example reports (validation sets are smaller)


def make_pruner(name: str, *, reduction_factor: int = 2, p_threshold: float = 0.1,
                reference_seed: int = 0) -> optuna.pruners.BasePruner:
    """The Optuna pruner called `name` (one of PRUNERS), set up as the module docstring says.

    `reference_seed` is the training seed of trials that recorded none (the study seed)."""
    if name not in PRUNERS:
        raise UserError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")
    if name == "asha":
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 2:
            raise UserError(f"reduction_factor is {reduction_factor!r}: use an integer >= 2 (keep 1 in r trials "
                            f"per rung)")
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)
    if name == "wilcoxon":
        if (isinstance(p_threshold, bool) or not isinstance(p_threshold, (int, float))
                or not 0 < p_threshold < 1):
            raise UserError(f"p_threshold is {p_threshold!r}: use a p-value in (0, 1), e.g. 0.1")
        with warnings.catch_warnings():  # experimental since Optuna 3.6; we pin its behaviour in tests
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SameSeedWilcoxonPruner(optuna.pruners.WilcoxonPruner(p_threshold=float(p_threshold)),
                                          reference_seed)
    return optuna.pruners.NopPruner()


class SameSeedWilcoxonPruner(optuna.pruners.BasePruner):
    """Optuna's WilcoxonPruner, comparing a trial with the best COMPLETE trial of its own training seed.

    Optuna's pruner reads only ``study.best_trial`` and ``study.direction``; it is handed a view of
    the study whose best trial is chosen among the trials with the judged trial's seed.
    """

    def __init__(self, inner: optuna.pruners.WilcoxonPruner, reference_seed: int = 0) -> None:
        self._inner, self._reference_seed = inner, reference_seed

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self._inner.prune(_SameSeedView(study, trial_seed(trial, self._reference_seed),
                                               self._reference_seed), trial)


class _SameSeedView:
    def __init__(self, study: optuna.Study, seed: int, default_seed: int) -> None:
        self._study, self._seed, self._default_seed = study, seed, default_seed

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial:
        done = [t for t in self._study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and trial_seed(t, self._default_seed) == self._seed]
        if not done:
            raise ValueError(f"no COMPLETE trial trained with seed {self._seed} yet")  # what Optuna raises: no pruning
        pick = max if self._study.direction == optuna.study.StudyDirection.MAXIMIZE else min
        return pick(done, key=lambda t: t.value)

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def example_step(rung: int, index: int) -> int:
    """The Optuna step of validation example `index` (0-based) at `rung` (1-based): rung * STRIDE + index."""
    _check_rung(rung)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < EXAMPLE_STRIDE:
        raise UserError(f"example index is {index!r}: use 0 <= index < {EXAMPLE_STRIDE}")
    return rung * EXAMPLE_STRIDE + index


def report_rung(trial: optuna.trial.Trial, pruner_name: str, rung: int, mean: float,
                per_example: Sequence[float] | None) -> None:
    """Report rung `rung` (1-based) of `trial` the way pruner `pruner_name` reads it.

    wilcoxon: every ``per_example[i]`` at ``example_step(rung, i)`` (required; the order
    must be the same example order in every trial). Otherwise: `mean` at ``step = rung``.
    A NaN `mean` is not reported (the caller records the failure), as `StudyDriver.report` does.
    """
    if pruner_name not in PRUNERS:
        raise UserError(f"unknown pruner {pruner_name!r}: use one of {', '.join(PRUNERS)}")
    _check_rung(rung)
    if pruner_name == "wilcoxon":
        if per_example is None or len(per_example) == 0:
            raise UserError("the wilcoxon pruner needs per-example validation values for every rung: "
                            "pass per_example (or use `scheduler` asha|none)")
        if len(per_example) > EXAMPLE_STRIDE:
            raise UserError(f"{len(per_example)} per-example values: at most {EXAMPLE_STRIDE} per rung")
        base = rung * EXAMPLE_STRIDE
        for i, value in enumerate(per_example):
            trial.report(float(value), base + i)
        return
    if not math.isnan(mean):
        trial.report(float(mean), rung)


def _check_rung(rung: int) -> None:
    if isinstance(rung, bool) or not isinstance(rung, int) or rung < 1:
        raise UserError(f"rung is {rung!r}: use the rung number, an integer >= 1")
