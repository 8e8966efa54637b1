"""``standalone``: every trial is a short fine-tune of its own; the seeded shapes first, then the sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mola_search.search.strategies.base import Strategy, candidates, register_strategy
from mola_search.search.study import Contender

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext


@register_strategy
class Standalone(Strategy):
    name = "standalone"

    def queue(self, study: "StudyContext") -> None:
        study.driver.enqueue_seeds(study.seeds)

    def contenders(self, study: "StudyContext") -> list[Contender]:
        """The configured seeded shapes and the `finalist_top_n` best searched allocations."""
        return candidates(study, study.config.finalist_top_n)
