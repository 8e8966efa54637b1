"""A trial's request (which allocation, which seed, how final) and its outcome (scores, metrics, failure)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mola_search.allocation import AllocationSpec


@dataclass(frozen=True)
class TrialRequest:
    number: int
    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    rank: tuple[int, ...]
    origin: str                        # "seed:<name>" or the sampler's name (search.study.Origin)
    train_seed: int = 0
    min_experts: int = 1               # the space's bounds (the synthetic objective is defined over them)
    max_experts: int | None = None
    final: bool = False                # finalists: full fidelity, test split scored, run folder saved
    out: str | None = None

    @property
    def spec(self) -> AllocationSpec:
        return AllocationSpec(self.experts, self.top_k, self.rank, self.origin)

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "TrialRequest":
        d = dict(payload)
        for key in ("experts", "top_k", "rank"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class TrialOutcome:
    scores: list[float] = field(default_factory=list)      # validation score per reported rung
    example_scores: list[list[float] | None] = field(default_factory=list)  # per rung: per-example values
    metrics: dict[str, Any] = field(default_factory=dict)  # last rung's summary (accuracy, gold_logprob, ...)
    test_score: float | None = None
    pruned: bool = False
    failure: str | None = None
    wall_time_s: float = 0.0
    node: str = ""
    peak_rss_mb: float = 0.0                               # the trial process's peak resident memory
    peak_gpu_mb: float = 0.0                               # the trial's peak CUDA memory allocated (0: no GPU)

    @property
    def score(self) -> float | None:
        return self.scores[-1] if self.scores else None

    @property
    def usable(self) -> bool:
        """Finished with a finite score: neither failed nor pruned."""
        return self.failure is None and not self.pruned and self.score is not None and self.score == self.score

    def to_payload(self) -> str:
        """The outcome as one JSON string in Ray's result dict: Tune flattens nested dicts in results (and drops
        or coerces some values); a string reaches the driver exactly as it was sent. NaN stays NaN here (a
        failed score must arrive as it was), which is why this is not a file format."""
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_payload(cls, payload: str) -> "TrialOutcome":
        return cls(**json.loads(payload))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrialOutcome":
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
