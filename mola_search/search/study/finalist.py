"""One allocation retrained with fresh seeds at finalist fidelity, scored on validation and test."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from mola_search.allocation import AllocationSpec
from mola_search.search.study.origin import Origin


@dataclass
class Finalist:
    """`validation` / `test` hold the study metric per seed (same order as `seeds`)."""

    label: str
    number: int
    origin: str
    spec: AllocationSpec
    validation: list[float]
    test: list[float]
    seeds: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def origin_of(self) -> Origin:
        return Origin(self.origin)

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.test else float("nan")

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.validation) if self.validation else float("nan")

    @property
    def val_std(self) -> float:
        return statistics.stdev(self.validation) if len(self.validation) > 1 else 0.0

    @property
    def test_accuracy_mean(self) -> float:
        values = [v for v in self.test_accuracy if v == v]
        return statistics.fmean(values) if values else float("nan")


def finalist_label(number: int, origin: str) -> str:
    """`t007-seed_inverted_triangle`: the trial it came from and how that trial was proposed."""
    return f"t{number:03d}-{Origin(origin).label}"


@dataclass(frozen=True)
class Contender:
    """An allocation a strategy hands to the final stage: the trial it came from and how it was proposed."""

    number: int
    origin: str
    spec: AllocationSpec

    @property
    def label(self) -> str:
        return finalist_label(self.number, self.origin)
