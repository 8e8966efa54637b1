"""Where a study's trials run: the `Executor` interface and the registry of executors by name.

Call order, per study: ``Executor.check(config)`` (a classmethod, before the study folder exists: refuse
settings under which no trial could ever start) -> ``EXECUTORS[name](config, folder, num_layers, objective)``
-> for each phase, `concurrency(trial_mb, measured)` -> `search(driver, fidelity, concurrency)` for the trials
the Optuna driver proposes (pruned at rungs), `run(requests, fidelity, on_done, ...)` for independent runs
(the pilot, finalists, racing rounds: never pruned; `on_done` is called in this process as each run
ends, with its `TrialOutcome`, also for a run whose worker died).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from mola_search.search.config import StudyConfig
from mola_search.search.study import StudyDriver, StudyFolder
from mola_search.trial import Fidelity, TrialOutcome, TrialRequest

RunDone = Callable[[TrialRequest, TrialOutcome], None]
"""on_done(request, outcome): called in the driver process as each independent run finishes."""

EXECUTORS: dict[str, type["Executor"]] = {}


def register_executor(cls: type["Executor"]) -> type["Executor"]:
    EXECUTORS[cls.name] = cls
    return cls


class Executor(ABC):
    """Moves `TrialRequest`s to where they run and their outcomes back; decides nothing about the study."""

    name: ClassVar[str]

    def __init__(self, config: StudyConfig, folder: StudyFolder, num_layers: int,
                 objective: Callable[..., Any] | None = None) -> None:
        self.config, self.folder, self.num_layers, self.objective = config, folder, num_layers, objective
        self.settings = config.trial_settings()
        self.say: Callable[[str], None] = _print  # progress lines of independent runs (the study sets its own)

    @classmethod
    def check(cls, config: StudyConfig) -> None:
        """Refuse (one-line UserError) settings under which no trial could ever be placed."""

    @abstractmethod
    def concurrency(self, trial_mb: float, measured: bool) -> tuple[int, str]:
        """Trials at once for the next phase, and a line saying why (for the progress output)."""

    @abstractmethod
    def search(self, driver: StudyDriver, fidelity: Fidelity, concurrency: int | None = None) -> None:
        """Train what `driver` proposes until `driver.remaining()` is 0 (or the sampler only repeats itself)."""

    @abstractmethod
    def run(self, requests: Sequence[TrialRequest], fidelity: Fidelity, on_done: RunDone, *, name: str = "runs",
            concurrency: int | None = None) -> None:
        """Run independent requests (never pruned); `on_done` gets every one's outcome."""


def _print(text: str) -> None:
    print(text, flush=True)


def make_executor(config: StudyConfig, folder: StudyFolder, num_layers: int,
                  objective: Callable[..., Any] | None = None) -> Executor:
    return EXECUTORS[config.executor](config, folder, num_layers, objective)
