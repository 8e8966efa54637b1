"""The two value types every task produces: one scored/generated `Example`, one `TaskData`.

They live apart from the loaders so the trainer and the search can import them
without pulling in YAML, JSON or `datasets` code.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mola_search.errors import UserError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split keys every `TaskData` carries, in this order."""


@dataclass(frozen=True)
class Example:
    """One prompt with either scored candidate answers (classification) or a free target.

    Classification: `choices` are scored by log-likelihood after `prompt`, `label`
    indexes the gold one. Generative (instruction data): `choices == ()`,
    `label == -1` and `target` holds the text to learn. `meta` is excluded from the
    hash so examples stay hashable (e.g. for de-duplication) despite holding a dict.
    """

    prompt: str
    choices: tuple[str, ...]
    label: int
    target: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Invariants checked once here so the trainer never indexes out of range.
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.choices:
            if not 0 <= self.label < len(self.choices):
                raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")
            if self.target is not None:
                raise ValueError("a classification example has no free-form target")
        elif self.label != -1 or self.target is None:
            raise ValueError("a generative example needs label=-1 and a target")

    @property
    def answer(self) -> str:
        """The text the model is trained to produce right after `prompt`."""
        return self.choices[self.label] if self.choices else self.target  # type: ignore[return-value]

    @property
    def is_generative(self) -> bool:
        """True for instruction-style examples without candidate answers."""
        return not self.choices


@dataclass(frozen=True)
class TaskData:
    """All three splits of one task plus where they came from.

    `notes` records every non-obvious split decision (carved validation, official
    validation used as test, skipped rows) so a result can be traced to its data.
    """

    name: str
    splits: dict[str, list[Example]]
    notes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if tuple(self.splits) != SPLITS:
            raise ValueError(f"splits must be exactly {SPLITS}, got {tuple(self.splits)}")

    @property
    def is_generative(self) -> bool:
        """True when the task has free-form targets (instruction data), not labels."""
        return any(ex.is_generative for ex in self.splits["train"][:1])

    def majority_baseline(self, split: str, examples: Sequence[Example] | None = None) -> float:
        """Accuracy on `split` (or on `examples`, the subsample a run scored) of always answering
        the most frequent TRAIN label.

        The label comes from train (not from `split`) so the baseline is a fair
        reference a trained model must beat. Ties go to the smaller label. Returns NaN
        for generative tasks or an empty split: there is nothing to count.
        """
        if split not in self.splits:
            raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        train = [ex.label for ex in self.splits["train"] if not ex.is_generative]
        rows = [ex.label for ex in (self.splits[split] if examples is None else examples) if not ex.is_generative]
        if not train or not rows:
            return math.nan
        counts = Counter(train)
        majority = min(counts, key=lambda lab: (-counts[lab], lab))
        return sum(lab == majority for lab in rows) / len(rows)
