"""What becomes of a strategy's contenders: `Racing` (the default: rounds of shared fresh seeds until a
winner, equivalence or the budget) or `FixedFinalists` (a fixed block of seeds, one look), behind one
`FinalStage` interface (see `final.base`)."""

from mola_search.search.final.base import FINAL_STAGES, FinalResult, FinalStage, register_stage
from mola_search.search.final.racing import FixedFinalists, Race, Racing

__all__ = ["FINAL_STAGES", "FinalResult", "FinalStage", "FixedFinalists", "Race", "Racing", "register_stage"]
