"""How much training one trial gets (`Fidelity`): a search ranks allocations, it need not converge them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from mola_search._checks import check_int, check_mapping, check_number
from mola_search.errors import UserError


@dataclass(frozen=True)
class Fidelity:
    """How much training one search trial gets.

    ``rungs`` are the fractions of the trial's training at which validation is scored and
    reported to the pruner (ASHA milestones); they increase and end at 1.0, the full trial.
    ``None`` for a limit means "no limit".
    """

    max_train_examples: int | None = 256
    max_eval_examples: int | None = 1000
    epochs: float = 1.0
    max_steps: int | None = None
    rungs: tuple[float, ...] = (0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        for key in ("max_train_examples", "max_eval_examples", "max_steps"):
            check_int(getattr(self, key), f"fidelity.{key}", low=1, optional=True)
        check_number(self.epochs, "fidelity.epochs")
        if self.epochs <= 0:
            raise UserError(f"fidelity.epochs is {self.epochs}: use a number > 0")
        object.__setattr__(self, "epochs", float(self.epochs))
        object.__setattr__(self, "rungs", _check_rungs(self.rungs))

    @classmethod
    def from_dict(cls, raw: Any) -> "Fidelity":
        return cls(**check_mapping(raw, "fidelity", cls))

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "rungs": list(self.rungs)}

    def describe(self) -> str:
        """One phrase for progress lines: "64 train examples x 1 epoch(s), 200 validation examples"."""
        steps = f"{self.max_steps} steps" if self.max_steps else f"{self.epochs:g} epoch(s)"
        train = self.max_train_examples if self.max_train_examples is not None else "all"
        evals = self.max_eval_examples if self.max_eval_examples is not None else "all"
        return f"{train} train examples x {steps}, {evals} validation examples"

    def doubled(self, train_size: int | None) -> "Fidelity":
        """Twice the training of one trial: more examples while the split (`train_size`) has them, else more
        epochs or steps."""
        if self.max_steps:
            more = self.max_train_examples
            if more is not None and train_size is not None:
                more = min(2 * more, train_size)
            return replace(self, max_steps=2 * self.max_steps, max_train_examples=more)
        n = self.max_train_examples
        if n is not None and (train_size is None or n < train_size):
            return replace(self, max_train_examples=2 * n if train_size is None else min(2 * n, train_size))
        return replace(self, epochs=2 * self.epochs)


def _check_rungs(rungs: Any) -> tuple[float, ...]:
    accepted = "a list of increasing fractions in (0, 1] ending at 1.0, e.g. [0.25, 0.5, 1.0]"
    if isinstance(rungs, (str, bytes)) or not isinstance(rungs, Sequence) or not rungs:
        raise UserError(f"fidelity.rungs is {rungs!r}: use {accepted}")
    for value in rungs:
        check_number(value, "fidelity.rungs")
    values = tuple(float(v) for v in rungs)
    increasing = all(a < b for a, b in zip(values, values[1:]))
    if not increasing or values[0] <= 0 or values[-1] != 1.0:
        raise UserError(f"fidelity.rungs is {list(rungs)}: use {accepted}")
    return values
