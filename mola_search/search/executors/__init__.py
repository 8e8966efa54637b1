"""Where trials run: `LocalExecutor` (in this process, one after another) and `RayExecutor` (Ray Tune
trials, on this machine or a cluster), behind one `Executor` interface (see `executors.base`)."""

from mola_search.search.executors.base import EXECUTORS, Executor, RunDone, make_executor, register_executor
from mola_search.search.executors.local import LocalExecutor
from mola_search.search.executors.ray import RayExecutor

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "RunDone", "make_executor", "register_executor"]
