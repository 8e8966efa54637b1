"""mola-search: find where a fine-tuned LLM needs its LoRA experts.

Data flow, one sub-package per stage:
allocation (pure Python spec) -> mola (adapter) -> train (trainer/evaluator)
-> search (trial, Optuna + Ray Tune) -> analysis (report).

As a library, the names in `__all__` are the front door (`from mola_search import get_mola_model`).
All but `AllocationSpec` are imported when first used: every sub-package imports this file first,
and `mola_search.allocation` must stay free of torch, as a training script that never searches
should stay free of Optuna, Ray and SciPy.
"""

from typing import Any

from mola_search.allocation import AllocationSpec

__version__ = "0.1.0"
__all__ = ["AllocationSpec", "MoLAConfig", "MoLAModel", "ObjectiveTrial", "StudyConfig", "get_mola_model",
           "run_study"]

_LAZY = {"MoLAConfig": "mola_search.mola", "MoLAModel": "mola_search.mola", "get_mola_model": "mola_search.mola",
         "StudyConfig": "mola_search.search.config", "run_study": "mola_search.search.runner",
         "ObjectiveTrial": "mola_search.trial.objective"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'mola_search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
