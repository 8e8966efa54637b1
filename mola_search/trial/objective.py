"""Your own objective: what a trial runs in place of the built-in MoLA fine-tune.

A search proposes allocations; how one is scored is up to the objective. The default
(``objective: mola``) fine-tunes MoLA with the allocation and scores the validation split.
A user's objective is a plain function, Optuna-style::

    def objective(trial: ObjectiveTrial) -> float | dict:
        model = get_mola_model(base, trial.spec)          # the allocation to score
        for fraction in trial.rungs[:-1]:                 # optional: intermediate rungs for the pruner
            ...train to `fraction` of the run...
            trial.report(validation_score)                # raises TrialPruned when the pruner stops it
        ...finish training...
        if trial.final:                                   # finalists: fresh seed, held-out test split too
            return {"validation": val_score, "test": test_score}
        return val_score                                  # higher is better (or {"validation": v,
                                                          #   "per_example": [...]} for the wilcoxon pruner)

and `run_study(config, folder, objective=objective)` runs it in every trial, pilot run and
finalist, on the local executor or on Ray workers (the function is pickled by value, so a
function from your script or notebook reaches the workers). The study records it as
``objective: python:<module>:<name>``; `mola-search --objective python:<module>:<name>` imports
it by that name (and `--resume` of such a study imports it again).

Call order inside a trial: the function is called once; `report` at most ``len(rungs) - 1``
times (never for finalists); the return value is the last rung's score. Anything it raises,
and a NaN/inf score, makes the trial FAILED with the reason; the study goes on.
"""

from __future__ import annotations

import importlib
import math
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError

PYTHON_PREFIX = "python:"

# report(rung index starting at 1, score, is_last, per-example scores or None) -> True when the trial
# should stop (pruned). The score is the study metric's mean over the validation examples.
Report = Callable[[int, float, bool, "list[float] | None"], bool]


class TrialPruned(Exception):
    """Raised out of a trial (by `ObjectiveTrial.report`, or the built-in trainer) when the pruner stops it."""


@dataclass
class ObjectiveTrial:
    """What a user objective is given: the allocation to score and how hard to try.

    `spec` is the allocation (experts, top-k and rank per layer); `fidelity` the study's trial
    fidelity (training examples, epochs or steps, validation examples); `rungs` the fractions of
    the run at which the pruner wants a score (``(1.0,)`` for finalists); `train_seed` the seed to
    train with (the study seed for search trials: keep everything else fixed by it, so trials are
    compared under common random numbers); `final` is True for finalist runs, which must also
    score a held-out test split; `out` is a folder the run may write into (finalists), or None.
    """

    spec: AllocationSpec
    fidelity: Any
    rungs: tuple[float, ...]
    train_seed: int
    final: bool
    out: str | None
    metric: str
    _report: Report = field(repr=False, default=lambda *_: False)
    _reported: list[float] = field(repr=False, default_factory=list)
    _examples: list[list[float] | None] = field(repr=False, default_factory=list)

    def report(self, score: float, per_example: Sequence[float] | None = None) -> None:
        """Report the validation score at the next rung; raises `TrialPruned` when the pruner stops the trial.

        `per_example` (one value per validation example, the same examples in the same order in every
        trial) is needed by the wilcoxon pruner only."""
        if self.final:
            raise UserError("report() is for search trials: a finalist returns its validation and test scores")
        if len(self._reported) >= len(self.rungs) - 1:
            raise UserError(f"report() called {len(self._reported) + 1} times but the study has {len(self.rungs)} "
                            f"rungs: report the first {len(self.rungs) - 1}, return the last")
        value = float(score)
        examples = [float(v) for v in per_example] if per_example is not None else None
        self._reported.append(value)
        self._examples.append(examples)
        if not math.isfinite(value):
            raise FloatingPointError(f"reported {self.metric} is {value} at rung {len(self._reported)}")
        if self._report(len(self._reported), value, False, examples):
            raise TrialPruned


def objective_name(fn: Callable[..., Any]) -> str:
    """``python:<module>:<qualified name>``: how a study records the function it was run with."""
    return f"{PYTHON_PREFIX}{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def is_python_objective(objective: str) -> bool:
    return str(objective).startswith(PYTHON_PREFIX)


def import_objective(objective: str) -> Callable[..., Any]:
    """The function a ``python:<module>:<name>`` objective names; a one-line UserError when it cannot be had."""
    module_name, _, name = str(objective)[len(PYTHON_PREFIX):].partition(":")
    if not module_name or not name:
        raise UserError(f"objective {objective!r}: use python:<module>:<function>, e.g. python:my_objectives:score")
    if module_name == "__main__" or "<locals>" in name:
        raise UserError(f"objective {objective!r} was defined in a script or inside a function and cannot be "
                        f"imported: pass it again (run_study(..., objective=fn)) or move it into a module")
    try:
        target: Any = importlib.import_module(module_name)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"objective {objective!r} cannot be imported ({type(exc).__name__}: {exc}); "
                        f"check the module is on PYTHONPATH") from None
    if not callable(target):
        raise UserError(f"objective {objective!r} is not a function")
    return target


def ship_by_value(fn: Callable[..., Any]) -> None:
    """Let Ray pickle `fn` (and its module's functions) by value, so workers need not import the module.

    Ray workers see the driver's working directory, not its sys.path (a test folder, a notebook's
    folder); a function from an installed package is left to be imported by reference."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or path is None:
        return  # __main__ is pickled by value anyway
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    if any(parent in installed for parent in Path(path).resolve().parents):
        return
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def run_objective(fn: Callable[..., Any], spec: AllocationSpec, fidelity: Any, rungs: Sequence[float], *,
                  train_seed: int, final: bool, out: str | None, metric: str, report: Report,
                  outcome: Any) -> None:
    """Call a user objective for one trial and fill `outcome` (a TrialOutcome) from what it reported and returned."""
    trial = ObjectiveTrial(spec, fidelity, tuple(rungs), train_seed, final, out, metric, report)
    try:
        returned = fn(trial)
    finally:
        outcome.scores.extend(trial._reported)
        outcome.example_scores.extend(trial._examples)
    if final:
        if not isinstance(returned, Mapping) or not {"validation", "test"} <= set(returned):
            raise TypeError("a finalist run must return {'validation': score, 'test': score} "
                            f"(got {type(returned).__name__})")
        validation, test = float(returned["validation"]), float(returned["test"])
        outcome.scores.append(validation)
        outcome.example_scores.append(None)
        outcome.test_score = test
        outcome.metrics = {"validation": {metric: validation}, "test": {metric: test},
                           "allocation": list(spec.experts), "train_seed": train_seed}
        return
    examples = None
    if isinstance(returned, Mapping) and "validation" in returned:
        examples = returned.get("per_example")
        examples = [float(v) for v in examples] if examples is not None else None
        returned = returned["validation"]
    if isinstance(returned, bool) or not isinstance(returned, (int, float)):
        raise TypeError(f"the objective must return a number (the validation {metric}) or "
                        f"{{'validation': score, 'per_example': [...]}}, got {type(returned).__name__}")
    score = float(returned)
    outcome.scores.append(score)
    outcome.example_scores.append(examples)
    outcome.metrics = {metric: score}
    if math.isfinite(score):
        report(len(outcome.scores), score, True, examples)
