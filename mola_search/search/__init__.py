"""The search: space (encodings) -> seeds -> study (Optuna) -> executors (Ray Tune / local) -> outputs.

Public entry points: `StudyConfig`, `run_study`, `SearchSpace`, `load_space`.
"""

from mola_search.search.config import PRESETS, StudyConfig
from mola_search.search.space import SearchSpace, load_space

__all__ = ["PRESETS", "SearchSpace", "StudyConfig", "load_space"]
