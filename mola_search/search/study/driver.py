"""The Optuna side of a search: storage, seeds first, ask/tell, duplicate cache, resume.

Executors (Ray Tune or in-process) only move `TrialRequest`s to workers and
outcomes back; every decision about *which* allocation to try and what the
study records is made here, in one process, against one storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from mola_search.allocation import AllocationSpec
from mola_search.search.config import StudyConfig
from mola_search.search.progress import Progress
from mola_search.search.pruning import make_pruner, report_rung
from mola_search.search.samplers import make_sampler
from mola_search.search.seeds import Seed
from mola_search.search.space import SearchSpace
from mola_search.search.study.folder import StudyFolder
from mola_search.search.study.records import (BUDGET, DUPLICATE_OF, FAILURE, FORCED, METRICS, NODE, NUM_LAYERS, ORIGIN,
                                              PEAK_GPU, PEAK_RSS, PILOT, RETRY_OF, RUNG_SCORES, SEED_EXACT, SEEDS_ENQUEUED,
                                              TRAIN_SEED, WALL_TIME, best_search_trial, forced, forced_spec,
                                              spec_attrs, trial_seed)
from mola_search.trial import TrialOutcome, TrialRequest

MAX_DUPLICATE_ASKS = 25


@dataclass
class Proposal:
    trial: optuna.trial.Trial
    request: TrialRequest
    started: float
    reported: set[int] = field(default_factory=set)


class StudyDriver:
    """The study's one Optuna storage and every decision about it.

    Call order: construct (recovers trials a killed study left RUNNING) -> `record` the
    pilot's runs -> `enqueue_seeds` -> repeatedly `ask` / `report` / `finish` (what the
    executors do) -> read `study`.
    """

    def __init__(self, config: StudyConfig, folder: StudyFolder, space: SearchSpace, num_layers: int, budget: int,
                 seeds: list[Seed] | None = None, progress: Progress | None = None,
                 storage: str | optuna.storages.BaseStorage | None = None,
                 objective: Callable[..., Any] | None = None, trial_mb: float = 4096.0,
                 live_csv: bool = False) -> None:
        """`storage` overrides config.storage, e.g. an `optuna.storages.InMemoryStorage()` for benchmarks.
        `seeds` are enqueued at once when given (callers with a pilot enqueue them after it).
        `objective` is a user objective (search.objective) the executors run instead of config.objective;
        `trial_mb` estimates one trial's peak memory until trials have measured theirs; with `live_csv`,
        trials.csv in `folder` is rewritten as each trial finishes (whichever executor ran it)."""
        self.config, self.folder, self.space, self.objective = config, folder, space, objective
        self.trial_mb_estimate = trial_mb
        self.live_csv = live_csv
        self.num_layers, self.budget = num_layers, budget
        self.target = config.trials  # trials to train in all (a one-shot study sets it to its checks)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            study_name=config.study_name or folder.name,
            storage=storage if storage is not None else folder.storage_url(config.storage),
            sampler=make_sampler(config.sampler, config.seed), direction="maximize", load_if_exists=True,
            pruner=make_pruner(config.scheduler, reduction_factor=max(2, int(config.asha_reduction_factor)),
                               reference_seed=config.seed))
        self.progress = progress or Progress(config.trials)
        self.recovered = self._recover_interrupted()
        if seeds is not None:
            self.enqueue_seeds(seeds)
        self.progress.resume_from(self.trained_trials())

    # --- bookkeeping -----------------------------------------------------------------
    def trained_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Finished trials that really trained (duplicates answered from the cache are not counted)."""
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                and DUPLICATE_OF not in t.user_attrs and t.user_attrs.get(FAILURE, "").find("interrupted") < 0]

    def remaining(self) -> int:
        return max(0, self.target - len(self.trained_trials()))

    def _recover_interrupted(self) -> int:
        """Trials left RUNNING by a killed study never finished: mark them failed and queue them again."""
        stale = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for t in stale:
            attrs = {k: v for k, v in t.user_attrs.items() if k in (ORIGIN, FORCED, TRAIN_SEED, PILOT)}
            self.study.enqueue_trial(t.params, user_attrs={**attrs, RETRY_OF: t.number})
            self.study._storage.set_trial_user_attr(  # Optuna has no public setter for a trial it did not hand out
                t._trial_id, FAILURE, "interrupted: the study process ended before this trial finished; re-queued")
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        return len(stale)

    def enqueue_seeds(self, seeds: list[Seed]) -> None:
        """Queue the seeded allocations (once per study); those the pilot already trained are skipped."""
        if self.study.user_attrs.get(SEEDS_ENQUEUED):
            return
        for seed in seeds:
            if self._twin(-1, seed.spec, self.config.seed) is not None:
                continue
            params, exact = self.space.encode(seed.spec)
            attrs: dict[str, Any] = {ORIGIN: seed.label, SEED_EXACT: exact}
            if not exact:  # train the seed itself; the sampler learns from its nearest point
                attrs[FORCED] = forced(seed.spec)
            self.study.enqueue_trial(params, user_attrs=attrs)
        self.study.set_user_attr(SEEDS_ENQUEUED, True)
        self.study.set_user_attr(NUM_LAYERS, self.num_layers)
        self.study.set_user_attr(BUDGET, self.budget)

    # --- ask / report / tell -------------------------------------------------------------
    def ask(self) -> Proposal | None:
        """The next allocation to train, or None when the sampler only repeats finished ones."""
        for _ in range(MAX_DUPLICATE_ASKS):
            trial = self.study.ask()
            spec = self._spec_for(trial)
            origin = trial.user_attrs.get(ORIGIN) or self.config.sampler
            trial.set_user_attr(ORIGIN, origin)
            for key, value in spec_attrs(spec).items():
                trial.set_user_attr(key, value)
            train_seed = int(trial.user_attrs.get(TRAIN_SEED, self.config.seed))
            trial.set_user_attr(TRAIN_SEED, train_seed)
            twin = self._twin(trial.number, spec, train_seed)
            if twin is None:
                request = TrialRequest(trial.number, spec.experts, spec.top_k, spec.rank, origin,
                                       train_seed=train_seed, min_experts=self.space.min_experts,
                                       max_experts=self.space.max_experts)
                return Proposal(trial, request, time.time())
            self._answer_from_cache(trial, twin)
        return None

    def record(self, spec: AllocationSpec, origin: str, train_seed: int, outcome: TrialOutcome,
               **attrs: Any) -> optuna.trial.FrozenTrial:
        """Tell the study about a run trained outside `ask` (the pilot's), as a trial of its own.

        The run's allocation is enqueued and asked for at once, so it is stored with the
        encoding's parameters (the sampler learns from it) and every user attr a trial has.
        """
        params, _ = self.space.encode(spec)
        self.study.enqueue_trial(params, user_attrs={ORIGIN: origin, FORCED: forced(spec), TRAIN_SEED: train_seed,
                                                     **attrs}, skip_if_exists=False)
        trial = self.study.ask()
        spec = self._spec_for(trial)
        for key, value in spec_attrs(spec).items():
            trial.set_user_attr(key, value)
        request = TrialRequest(trial.number, spec.experts, spec.top_k, spec.rank, origin, train_seed=train_seed)
        proposal = Proposal(trial, request, time.time() - outcome.wall_time_s)
        for rung, (score, examples) in enumerate(zip(outcome.scores, outcome.example_scores or
                                                     [None] * len(outcome.scores)), start=1):
            if score == score:
                self.report(proposal, rung, score, examples)
        self.finish(proposal, outcome, quiet=True)
        return self.study.trials[trial.number]

    def _spec_for(self, trial: optuna.trial.Trial) -> AllocationSpec:
        spec = self.space.suggest(trial, self.num_layers, self.budget)  # also records params for the sampler
        exact = forced_spec(trial)
        return AllocationSpec(exact.experts, exact.top_k, exact.rank, spec.source) if exact else spec

    def _twin(self, number: int, spec: AllocationSpec, train_seed: int) -> optuna.trial.FrozenTrial | None:
        """A trial that already trained (or is training) the same allocation with the same seed."""
        for t in self.study.get_trials(deepcopy=False):
            if t.number == number or DUPLICATE_OF in t.user_attrs:
                continue
            if t.state in (TrialState.FAIL, TrialState.WAITING):
                continue
            if (all(t.user_attrs.get(k) == v for k, v in spec_attrs(spec).items())
                    and trial_seed(t, self.config.seed) == train_seed):
                return t
        return None

    def _answer_from_cache(self, trial: optuna.trial.Trial, twin: optuna.trial.FrozenTrial) -> None:
        trial.set_user_attr(DUPLICATE_OF, twin.number)
        for key in (RUNG_SCORES, METRICS):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        for step, value in twin.intermediate_values.items():
            trial.report(value, step)
        if twin.state == TrialState.COMPLETE:
            self.study.tell(trial, twin.value)
        elif twin.state == TrialState.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:  # twin still running: nothing to copy yet; the sampler simply gets no signal from this one
            trial.set_user_attr(FAILURE, f"duplicate of trial {twin.number}, still running")
            self.study.tell(trial, state=TrialState.FAIL)
        self._write_csv()

    def report(self, proposal: Proposal, rung: int, score: float, per_example: list[float] | None = None) -> bool:
        """Record a rung's score (and its per-example values, for the Wilcoxon pruner); True when the
        study's pruner would stop the trial here. Reporting a rung twice records it once."""
        if score == score and rung not in proposal.reported:  # NaN: recorded as a failure by `finish`
            proposal.reported.add(rung)
            report_rung(proposal.trial, self.config.scheduler, rung, score, per_example)
            rungs = dict(proposal.trial.user_attrs.get(RUNG_SCORES) or {})
            rungs[str(rung)] = score
            proposal.trial.set_user_attr(RUNG_SCORES, rungs)
        return proposal.trial.should_prune()

    def finish(self, proposal: Proposal, outcome: TrialOutcome, quiet: bool = False) -> None:
        trial = proposal.trial
        trial.set_user_attr(WALL_TIME, round(outcome.wall_time_s or time.time() - proposal.started, 2))
        trial.set_user_attr(NODE, outcome.node)
        if outcome.peak_rss_mb:
            trial.set_user_attr(PEAK_RSS, round(outcome.peak_rss_mb, 1))
        if outcome.peak_gpu_mb:
            trial.set_user_attr(PEAK_GPU, round(outcome.peak_gpu_mb, 1))
        if outcome.metrics:
            trial.set_user_attr(METRICS, outcome.metrics)
        if outcome.failure:
            trial.set_user_attr(FAILURE, outcome.failure)
            state = TrialState.FAIL
            self.study.tell(trial, state=state)
        elif outcome.pruned or outcome.score is None:
            state = TrialState.PRUNED
            self.study.tell(trial, state=state)
        else:
            state = TrialState.COMPLETE
            self.study.tell(trial, outcome.score)
        self._write_csv()
        if quiet:
            return
        self.progress.trial_done(trial.number, proposal.request.origin, proposal.request.experts, state,
                                 outcome.score, outcome.failure, self._best())

    def _write_csv(self) -> None:
        if self.live_csv:
            self.folder.write_trials_csv(self.study)

    def _best(self) -> tuple[int, float] | None:
        best = best_search_trial(self.study, self.config.seed)  # compared under CRN: study-seed trials only
        return (best.number, best.value) if best is not None else None
