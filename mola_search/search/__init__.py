"""The search: space (encodings) -> seeds -> pilot (noise floor) -> study (Optuna) -> executors (Ray Tune /
local) -> outputs.

Public entry points: `StudyConfig`, `run_study` (in `runner`), `SearchSpace`, `load_space`, and the noise floor:
`estimate_noise`, `NoiseFloor`, `read_noise`.
"""

from mola_search.search.config import PRESETS, StudyConfig
from mola_search.search.noise import NoiseFloor, estimate_noise, read_noise
from mola_search.search.space import SearchSpace, load_space

__all__ = ["PRESETS", "NoiseFloor", "SearchSpace", "StudyConfig", "estimate_noise", "load_space", "read_noise"]
