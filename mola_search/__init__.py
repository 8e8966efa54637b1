"""mola-search: find where a fine-tuned LLM needs its LoRA experts.

Data flow, one sub-package per stage:
allocation (pure Python spec) -> mola (adapter) -> train (trainer/evaluator)
-> search (trial, Optuna + Ray Tune) -> analysis (report).

As a library, the names in `__all__` are the front door (`from mola_search import get_mola_model`).
All but `AllocationSpec` are imported when first used: every sub-package imports this file first,
and `mola_search.allocation` must stay free of torch, as a training script that never searches
should stay free of Optuna, Ray and SciPy.
"""

import os
from typing import Any

from mola_search.allocation import AllocationSpec

# On a CPU torch runs bf16 matmuls through oneDNN, which keeps what it builds for each new matmul shape for the
# rest of the process: ideep's cache of matmul set-ups and oneDNN's primitive cache, up to 1024 entries each, and
# a SmolLM2 training step builds ~140 primitives per batch width (0.3 MB each). Every new width of training and
# scoring added ~80 MB, so a run's memory grew with the work done (issue 22). ideep's cache is not needed (a miss
# is served by oneDNN's cache); oneDNN's is bounded to ~2 widths (~75 MB): a primitive costs ~1-6 ms to build and
# 0 (no cache) made a step 4x slower. Both read these variables when the first matmul runs, so they are set here,
# on import; a value the user sets wins. Measured: docs/performance.md, "Memory over a whole run";
# tests/test_memory.py fails without it.
for _name, _value in (("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256"), ("LRU_CACHE_CAPACITY", "1")):
    os.environ.setdefault(_name, _value)

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
