"""The MoLA adapter: config (what), layer (one adapted linear), model (injection and I/O)."""

from mola_search.mola.config import DEFAULT_TARGETS, MoLAConfig
from mola_search.mola.layer import MoLALinear, load_balancing_loss
from mola_search.mola.model import MoLAModel

__all__ = ["DEFAULT_TARGETS", "MoLAConfig", "MoLALinear", "MoLAModel", "load_balancing_loss"]
