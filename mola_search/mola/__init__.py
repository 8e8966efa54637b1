"""The MoLA adapter: config (what), layer (one adapted linear), model (injection and I/O), official (GCYZSL/MoLA)."""

from mola_search.mola.config import BALANCE_LOSSES, DEFAULT_TARGETS, MoLAConfig
from mola_search.mola.layer import MoLALinear, load_balancing_loss
from mola_search.mola.model import MoLAModel, get_mola_model

__all__ = ["BALANCE_LOSSES", "DEFAULT_TARGETS", "MoLAConfig", "MoLALinear", "MoLAModel", "get_mola_model",
           "load_balancing_loss"]
