"""What becomes of a strategy's contenders: `FixedFinalists` (a fixed block of fresh seeds each), behind one
`FinalStage` interface (see `final.base`)."""

from mola_search.search.final.base import FINAL_STAGES, FinalStage, register_stage
from mola_search.search.final.fixed import FixedFinalists

__all__ = ["FINAL_STAGES", "FinalStage", "FixedFinalists", "register_stage"]
