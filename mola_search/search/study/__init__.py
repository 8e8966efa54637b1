"""The study handle's parts: the folder and every file in it (`StudyFolder`), the origin format (`Origin`),
the Optuna records (`records`), the rule for the exported best (`best`) and the Optuna driver
(`StudyDriver`). `mola_search.search.context.StudyContext` bundles them for the phases of a study.
"""

from mola_search.search.study.best import choose_best
from mola_search.search.study.driver import Proposal, StudyDriver
from mola_search.search.study.finalist import Contender, Finalist, finalist_label
from mola_search.search.study.folder import StudyFolder
from mola_search.search.study.origin import HasOrigin, Origin

__all__ = ["Contender", "Finalist", "HasOrigin", "Origin", "Proposal", "StudyDriver", "StudyFolder", "choose_best", "finalist_label"]
