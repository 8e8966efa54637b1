"""What one trial needs to know of the study it belongs to (`TrialSettings`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialSettings:
    """The task, model and objective a trial trains and scores, and what it runs on.

    Made by `StudyConfig.trial_settings()`; travels to Ray workers as `to_dict()`. `train` holds
    `TrainConfig` overrides; `final_train_examples` / `final_eval_examples` replace the fidelity's limits
    for finalist runs (None: the fidelity's); `cpus` is the trial's thread count, `gpus` its GPU share.
    """

    task: str
    model: str
    objective: str = "mola"
    metric: str = "gold_logprob"
    dtype: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    balance_loss: str = "per-module"
    aux_loss_coef: float | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    final_train_examples: int | None = None
    final_eval_examples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrialSettings":
        return cls(**raw)
