"""How a study proposes allocations: `Standalone` (every trial a short fine-tune) and `OneShot` (a supernet
ranks hundreds, standalone trials check it), behind one `Strategy` interface (see `strategies.base`)."""

from mola_search.search.strategies.base import STRATEGIES, Strategy, candidates, register_strategy
from mola_search.search.strategies.oneshot import OneShot
from mola_search.search.strategies.standalone import Standalone

__all__ = ["STRATEGIES", "OneShot", "Standalone", "Strategy", "candidates", "register_strategy"]
