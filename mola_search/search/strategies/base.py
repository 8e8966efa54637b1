"""How a study proposes allocations: the `Strategy` interface and the registry of strategies by name.

Call order (search.runner), after the pilot has chosen the trial fidelity:

1. `queue(study)`: put first what must be trained first (the seeded shapes; a one-shot strategy trains and
   scores its supernet here and queues its standalone checks), and set how many trials the search trains;
2. the executor trains the queued and sampled trials (`study.driver.remaining()` of them);
3. `contenders(study)`: the allocations that go on to the final stage (finalists, or a race);
4. `conclude(study, finalists)`: after the final stage; returns Markdown lines for summary.md (a one-shot
   strategy measures there how far its ranking agreed with standalone training).

A new strategy is a new module with a subclass, registered with `register_strategy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from optuna.trial import TrialState

from mola_search.search.study import Contender, Finalist
from mola_search.search.study.records import DUPLICATE_OF, spec_key, trial_origin, trial_seed, trial_spec

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(cls: type["Strategy"]) -> type["Strategy"]:
    STRATEGIES[cls.name] = cls
    return cls


class Strategy(ABC):
    name: ClassVar[str]
    searched: ClassVar[str] = "trials"   # what the search phase trains, in the progress line

    def describe(self, study: "StudyContext") -> str:
        """The strategy's part of the study's first progress line."""
        driver = study.driver
        recovered = f", {driver.recovered} interrupted re-queued" if driver.recovered else ""
        return f"{study.config.trials} trials ({driver.remaining()} to run{recovered})"

    @abstractmethod
    def queue(self, study: "StudyContext") -> None:
        """Queue what the search trains first; may train other things first (a supernet)."""

    @abstractmethod
    def contenders(self, study: "StudyContext") -> list[Contender]:
        """The allocations that go on to the final stage."""

    def conclude(self, study: "StudyContext", finalists: Sequence[Finalist]) -> list[str]:
        """After the final stage: Markdown lines for summary.md (none by default)."""
        return []


def candidates(study: "StudyContext", top_n: int, origins: Collection[str] = ()) -> list[Contender]:
    """The seeds that trained (those in `finalist_shapes` when set), the trials whose origin is in `origins`
    (a one-shot study's top-N), and the `top_n` best allocations by search score not chosen yet, whatever
    their origin (a seeded shape outside `finalist_shapes` that the search ranked first is one). Distinct
    allocations only; only study-seed trials count: they are the ones compared under common random numbers."""
    config = study.config
    trials = [t for t in study.driver.study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and DUPLICATE_OF not in t.user_attrs
              and trial_seed(t, config.seed) == config.seed]
    chosen: dict[tuple, Contender] = {}

    def add(t) -> bool:
        origin = trial_origin(t)
        key = spec_key(trial_spec(t))
        if key in chosen:
            return False
        chosen[key] = Contender(t.number, origin.text, replace(trial_spec(t), source=origin.text))
        return True

    for t in trials:
        origin = trial_origin(t)
        if origin.is_seed and (config.finalist_shapes is None or origin.name in config.finalist_shapes):
            add(t)
        elif origin.text in origins:
            add(t)
    # the best by search score, whatever their origin: a seeded shape the search ranked first is a contender
    searched = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    added = 0
    for t in searched:
        if added >= top_n:
            break
        if add(t):
            added += 1
    return list(chosen.values())
