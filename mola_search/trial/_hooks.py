"""Test and benchmark hooks, read from the environment so they reach Ray workers and subprocesses too.

* ``MOLA_SEARCH_FAULTS="raise@3,nan@5,oom@7,kill@9,final@2"``: trial number -> the fault it suffers (an
  exception, a NaN score, a MemoryError, SIGKILL of its process; ``final``: an exception in its finalist runs
  only): how the tests check that a failing trial or finalist run is recorded with its reason and the study
  goes on.
* ``MOLA_SYNTHETIC_DELAY=0.3``: seconds a synthetic rung takes (lets tests see trials overlap).
* ``MOLA_SYNTHETIC_NOISE="noise=0.02,seed_sd=0.05,example_sd=0.1"``: the synthetic objective's noise sizes.

Nothing in a real study sets them; `init_ray` forwards every ``MOLA_*`` variable to the workers.
"""

from __future__ import annotations

import os
import signal

FAULTS_ENV = "MOLA_SEARCH_FAULTS"
DELAY_ENV = "MOLA_SYNTHETIC_DELAY"
NOISE_ENV = "MOLA_SYNTHETIC_NOISE"


def faults() -> dict[int, str]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(FAULTS_ENV, "").split(","))):
        kind, _, number = item.partition("@")
        out[int(number)] = kind
    return out


def inject_fault(number: int, final: bool = False) -> None:
    kind = faults().get(number)
    if kind == "raise" or (kind == "final" and final):
        raise RuntimeError(f"injected failure in trial {number}")
    if kind == "oom":
        raise MemoryError(f"injected out-of-memory in trial {number}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def nan_fault(number: int, score: float) -> float:
    return float("nan") if faults().get(number) == "nan" else score


def synthetic_delay() -> float:
    return float(os.environ.get(DELAY_ENV, "0"))


def synthetic_noise() -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in os.environ.get(NOISE_ENV, "").split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = float(value)
    return out
