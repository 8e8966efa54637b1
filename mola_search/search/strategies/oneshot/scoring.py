"""One-shot scoring: allocations scored as masked sub-networks of the trained supernet, no training.

An Optuna study of its own ("<study name>-oneshot", same storage, sampler, space, seeds first) proposes
the allocations; each is one validation pass with the mask. Finished scores are kept: a resumed study
scores only what is missing. A proposal already scored is answered from the cache and the next one is drawn
at random (a sampler that has converged on a few allocations would otherwise stop the scoring far short of
`oneshot_trials`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mola_search.allocation import AllocationSpec, run_length
from mola_search.search.progress import duration
from mola_search.search.samplers import make_sampler
from mola_search.search.seeds import Seed
from mola_search.search.study import Origin
from mola_search.search.study.records import (ALLOCATION, DUPLICATE_OF, FAILURE, FORCED, METRICS, ORIGIN, SECONDS_PER_ALLOCATION,
                                              SEEDS_ENQUEUED, forced, forced_spec, spec_attrs, spec_key, trial_spec)

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext
    from mola_search.search.strategies.oneshot.supernet import Supernet

MAX_DUPLICATES_IN_A_ROW = 25
MAX_FAILURES_IN_A_ROW = 3


def oneshot_study_name(study: "StudyContext") -> str:
    return f"{study.config.study_name or study.folder.name}-oneshot"


def score_allocations(study: "StudyContext", supernet: "Supernet", seeds: Sequence[Seed]) -> Any:
    """Score `oneshot_trials` distinct allocations (seeds first, then the sampler); returns the one-shot
    Optuna study."""
    scorer = _Scorer(study, supernet, _open(study, seeds))
    scorer.run()
    study.folder.write_oneshot_csv(scorer.optuna)
    return scorer.optuna


def ranked_allocations(oneshot: Any) -> list[tuple[AllocationSpec, float]]:
    """Distinct scored allocations, best one-shot score first."""
    from optuna.trial import TrialState

    done = [t for t in oneshot.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if DUPLICATE_OF not in t.user_attrs]
    return [(trial_spec(t), float(t.value)) for t in sorted(done, key=lambda t: -t.value)]


def _open(study: "StudyContext", seeds: Sequence[Seed]) -> Any:
    """The one-shot Optuna study, its seeds enqueued once; scorings a killed study left RUNNING are redone."""
    import optuna
    from optuna.trial import TrialState

    config = study.config
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    oneshot = optuna.create_study(study_name=oneshot_study_name(study),
                                  storage=study.folder.storage_url(config.storage),
                                  sampler=make_sampler(config.sampler, config.seed), direction="maximize",
                                  load_if_exists=True)
    for t in oneshot.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        oneshot.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    if not oneshot.user_attrs.get(SEEDS_ENQUEUED):
        for seed in seeds:
            params, exact = study.space.encode(seed.spec)
            attrs: dict[str, Any] = {ORIGIN: seed.label}
            if not exact:
                attrs[FORCED] = forced(seed.spec)
            oneshot.enqueue_trial(params, user_attrs=attrs)
        oneshot.set_user_attr(SEEDS_ENQUEUED, True)
    return oneshot


class _Scorer:
    """The scoring loop: ask, answer duplicates from the cache, score by masking, tell; with progress."""

    def __init__(self, study: "StudyContext", supernet: "Supernet", oneshot: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        self.study, self.supernet, self.optuna = study, supernet, oneshot
        self.sampler = oneshot.sampler
        self.explore = optuna.samplers.RandomSampler(seed=study.config.seed)
        self.scored = {spec_key(trial_spec(t)): t
                       for t in oneshot.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if DUPLICATE_OF not in t.user_attrs}
        self.best = max(self.scored.values(), key=lambda t: t.value) if self.scored else None
        self.target = study.config.oneshot_trials
        self.ran = self.duplicates = self.failures = 0
        self.start = time.perf_counter()

    def run(self) -> None:
        if len(self.scored) < self.target:
            self.study.message(f"one-shot scoring: {self.target - len(self.scored)} allocations to score "
                               f"({len(self.scored)} scored before), "
                               f"{len(self.supernet.prepared.splits['validation'])} validation examples each, by "
                               "masking the supernet (no training)")
        while len(self.scored) < self.target and self._step():
            pass
        if self.ran:
            self.optuna.set_user_attr(SECONDS_PER_ALLOCATION, (time.perf_counter() - self.start) / self.ran)

    def _step(self) -> bool:
        """Score one proposal; False when the scoring must stop (too many duplicates or failures in a row)."""
        trial = self.optuna.ask()
        spec = self.study.space.suggest(trial, self.study.num_layers, self.study.budget)
        spec = forced_spec(trial) or spec
        origin = trial.user_attrs.get(ORIGIN) or ("random" if self.optuna.sampler is self.explore
                                                  else self.study.config.sampler)
        for key, value in {ORIGIN: origin, **spec_attrs(spec)}.items():
            trial.set_user_attr(key, value)
        twin = self.scored.get(spec_key(spec))
        if twin is not None:
            return self._duplicate(trial, twin)
        self.duplicates = 0
        self.optuna.sampler = self.sampler
        try:
            score, result = self._score(spec)
        except Exception as exc:  # noqa: BLE001 - recorded; three in a row stop the scoring
            return self._failed(trial, exc)
        self.failures = 0
        trial.set_user_attr(METRICS, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        self.optuna.tell(trial, score)
        self._scored(self.optuna.trials[trial.number], spec, origin, score)
        return True

    def _score(self, spec: AllocationSpec) -> tuple[float, dict[str, Any]]:
        from mola_search.train.run import evaluate
        from mola_search.trial.mola import metric_of

        with self.supernet.model.allocation(spec):
            result = evaluate(self.supernet.model, self.supernet.prepared, "validation")
        score, _ = metric_of(result, self.study.config.metric)
        if not math.isfinite(score):
            raise FloatingPointError(f"one-shot {self.study.config.metric} is {score}")
        return score, result

    def _duplicate(self, trial: Any, twin: Any) -> bool:
        trial.set_user_attr(DUPLICATE_OF, twin.number)
        self.optuna.tell(trial, twin.value)
        self.optuna.sampler = self.explore
        self.duplicates += 1
        if self.duplicates >= MAX_DUPLICATES_IN_A_ROW:
            self.study.message(f"one-shot scoring: {self.duplicates} proposals in a row (random ones included) were "
                               f"allocations already scored: stopping at {len(self.scored)} distinct allocations")
            return False
        return True

    def _failed(self, trial: Any, exc: Exception) -> bool:
        from optuna.trial import TrialState

        trial.set_user_attr(FAILURE, f"{type(exc).__name__}: {exc}")
        self.optuna.tell(trial, state=TrialState.FAIL)
        self.failures += 1
        if self.failures >= MAX_FAILURES_IN_A_ROW:
            self.study.message(f"one-shot scoring stopped: {self.failures} failures in a row (last: {exc})")
            return False
        return True

    def _scored(self, frozen: Any, spec: AllocationSpec, origin: str, score: float) -> None:
        self.scored[spec_key(spec)] = frozen
        if self.best is None or score > self.best.value:
            self.best = frozen
        self.ran += 1
        every = max(1, self.target // 20)
        if self.ran % every == 0 or len(self.scored) == self.target or Origin(origin).is_seed:
            eta = (time.perf_counter() - self.start) / self.ran * (self.target - len(self.scored))
            best = self.best
            self.study.message(f"  [one-shot {len(self.scored)}/{self.target}] {origin:<24} "
                               f"{run_length(spec.experts):<22} {score:.4f}  best {best.value:.4f} "
                               f"({run_length(best.user_attrs[ALLOCATION])})  ETA {duration(eta)}")
