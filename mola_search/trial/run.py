"""One trial: an allocation in, validation scores at each rung out (and, for a finalist, the test split).

The same function serves Ray Tune workers and the in-process executor; only the `report` callback
differs (tune.report + ASHA vs Optuna's pruner). Anything a trial raises becomes a failure *reason*,
never a crashed study.
"""

from __future__ import annotations

import math
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search.trial import _hooks
from mola_search.trial.fidelity import Fidelity
from mola_search.trial.objective import Report, TrialPruned, run_objective
from mola_search.trial.request import TrialOutcome, TrialRequest
from mola_search.trial.settings import TrialSettings
from mola_search.trial.synthetic import is_synthetic


def run_trial(settings: TrialSettings, fidelity: Fidelity, request: TrialRequest, report: Report,
              num_layers: int, objective: Callable[..., Any] | None = None) -> TrialOutcome:
    """Run one trial (search trial, pilot run or finalist) with the study's objective: the MoLA fine-tune,
    the synthetic model, or `objective` (a user function, see trial.objective)."""
    outcome = TrialOutcome(node=_node_name())
    start = time.perf_counter()
    try:
        _hooks.inject_fault(request.number, request.final)
        if objective is not None:
            run_objective(objective, request.spec, fidelity, (1.0,) if request.final else fidelity.rungs,
                          train_seed=request.train_seed, final=request.final, out=request.out,
                          metric=settings.metric, report=report, outcome=outcome)
        elif is_synthetic(settings.objective):
            from mola_search.trial.synthetic import synthetic_trial

            synthetic_trial(settings, fidelity, request, report, num_layers, outcome)
        else:
            from mola_search.trial.mola import mola_trial

            mola_trial(settings, fidelity, request, report, outcome)
        bad = [s for s in outcome.scores if not math.isfinite(s)]
        if bad and outcome.failure is None:
            outcome.failure = f"validation score is {bad[0]} (NaN or inf)"
    except TrialPruned:
        outcome.pruned = True
    except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason; the study goes on
        outcome.failure = _reason(exc)
    outcome.wall_time_s = time.perf_counter() - start
    outcome.peak_rss_mb = peak_rss_mb()
    outcome.peak_gpu_mb = _peak_gpu_mb()
    return outcome


def peak_rss_mb() -> float:
    """This process's peak resident memory (a Ray trial runs in a process of its own; in-process, the
    driver's peak, which includes more than the trial)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _peak_gpu_mb() -> float:
    """The peak CUDA memory this process allocated (a Ray trial's own; 0 where no GPU was used). Reset before
    each trial by the run (train.run), so in-process it is the last trial's."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reason(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    kind = "out of memory" if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() else type(exc).__name__
    return f"{kind}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"[:500]


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001
        pass
    return socket.gethostname()
