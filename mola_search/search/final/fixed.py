"""``finalists``: a fixed block. Every contender is retrained with `finalist_seeds` fresh seeds (1000, 1001,
...: never a seed a search or pilot trial used, so no finalist run can reproduce the run that selected it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mola_search.search.final.base import FinalStage, collect, register_stage, report_finalist, train_runs
from mola_search.search.study import Contender, Finalist

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext


@register_stage
class FixedFinalists(FinalStage):
    name = "finalists"

    def run(self, study: "StudyContext", contenders: Sequence[Contender]) -> list[Finalist]:
        if study.config.finalist_seeds == 0:
            return []
        seeds = study.config.finalist_train_seeds()
        failures = train_runs(study, contenders, seeds,
                              f"finalists: {len(contenders)} allocations x {len(seeds)} fresh seeds "
                              f"({', '.join(map(str, seeds))}; {{runs}} runs to do), scored on validation and the "
                              "held-out test split")
        finalists = [collect(study, c, seeds, failures) for c in contenders]
        for fin in finalists:
            report_finalist(study, fin)
        return finalists
