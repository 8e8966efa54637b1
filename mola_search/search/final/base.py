"""What becomes of the contenders: the `FinalStage` interface and the registry of stages by name.

Call order (search.runner): the strategy names its contenders -> `FinalStage.run(study, contenders)` retrains
them at finalist fidelity with seeds no search or pilot trial used, scores validation and test, and returns a
`FinalResult`: the decision (`search.study.decision.Decision`: winner, equivalent or undecided) and one
`Finalist` per contender (failed runs carried with their reasons) -> the study's outputs export the decided
allocation and report test once. A stage must be resumable: a run whose metrics.json exists is never
trained again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mola_search.search.study import Contender, Finalist
from mola_search.search.study.decision import Decision

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext

FINAL_STAGES: dict[str, type["FinalStage"]] = {}


def register_stage(cls: type["FinalStage"]) -> type["FinalStage"]:
    FINAL_STAGES[cls.name] = cls
    return cls


@dataclass
class FinalResult:
    decision: Decision | None          # None when the stage trained nothing (no finalist seeds)
    finalists: list[Finalist]


class FinalStage(ABC):
    name: ClassVar[str]

    @abstractmethod
    def run(self, study: "StudyContext", contenders: Sequence[Contender]) -> FinalResult:
        """Retrain and score the contenders; decide."""
