"""The MoLA adapter: config (what), layer (one adapted linear), model (injection and I/O), official (GCYZSL/MoLA).

`MoLAConfig` and the balance-loss names import without torch (a study's settings validate them); the layer and
the model are imported on first use."""

from typing import Any

from mola_search.mola.config import BALANCE_LOSSES, DEFAULT_TARGETS, MoLAConfig

__all__ = ["BALANCE_LOSSES", "DEFAULT_TARGETS", "MoLAConfig", "MoLALinear", "MoLAModel", "get_mola_model",
           "load_balancing_loss"]

_LAZY = {"MoLALinear": "layer", "load_balancing_loss": "layer", "MoLAModel": "model", "get_mola_model": "model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
