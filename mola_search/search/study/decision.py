"""The study's answer (`Decision`): winner, equivalent or undecided, with the effect size, the level, the
contenders still in the race and the fine-tunes spent. This module owns the format of racing.json (written
by `StudyFolder.write_racing`) and the words every output uses for the decision.

The exported allocation (best_allocation.json) follows from it: the winner; for "equivalent" or
"undecided", the tie set's member chosen by the tie-break rule (the paper's inverted triangle when it is in
the set, otherwise the leader on validation), and the file says that it is a tie-break, not a best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mola_search.search.study.origin import Origin
from mola_search.stats.race import DECISIONS, EQUIVALENT, UNDECIDED, WINNER

LIVE, DROPPED, FAILED = "live", "dropped", "failed"
__all__ = ["DECISIONS", "DROPPED", "EQUIVALENT", "FAILED", "LIVE", "TIE_BREAK", "UNDECIDED", "WINNER", "Decision", "Entry",
           "tie_break"]
PREFERRED_TIE = "inverted_triangle"
TIE_BREAK = (f"the paper's {PREFERRED_TIE.replace('_', ' ')} when it is in the tie set, otherwise the leader "
             "on mean validation score")


@dataclass
class Entry:
    """One contender's record in the race: its runs' scores by seed, and whether it is still in."""

    label: str
    number: int
    origin: str
    experts: list[int]
    top_k: list[int]
    rank: list[int]
    status: str = LIVE
    reason: str = ""                                            # why it was dropped or failed
    dropped_at: int | None = None                               # the round after which it left the race
    validation: dict[int, float] = field(default_factory=dict)  # seed -> validation score (the metric)
    test: dict[int, float] = field(default_factory=dict)        # seed -> test score, reported once
    test_accuracy: dict[int, float] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)      # seed -> why its last attempt failed
    attempts: dict[int, int] = field(default_factory=dict)      # seed -> failed attempts
    wall_s: dict[int, float] = field(default_factory=dict)      # seed -> the run's wall time
    peak_mb: dict[int, float] = field(default_factory=dict)     # seed -> the run process's peak resident memory

    @property
    def name(self) -> str:
        origin = Origin(self.origin)
        return origin.name if origin.is_seed else f"trial {self.number} ({self.origin})"

    @property
    def val_mean(self) -> float:
        return math.fsum(self.validation.values()) / len(self.validation) if self.validation else math.nan

    @property
    def test_mean(self) -> float:
        return math.fsum(self.test.values()) / len(self.test) if self.test else math.nan


@dataclass
class Decision:
    """What the study can say: `decision` is "winner", "equivalent" or "undecided"."""

    decision: str
    metric: str
    min_effect: float                      # delta, in the metric's units
    level: float                           # family-wise error rate of the race's claims
    max_runs: int                          # the race's budget of fine-tunes
    runs: int                              # fine-tunes spent on finalists (failed attempts included)
    rounds: int                            # seeds every live contender got
    live: list[str]                        # labels still in the race: the winner, or the tie set
    chosen: str | None                     # the exported allocation's label
    stopped: str                           # why the race stopped, in words
    contenders: list[Entry] = field(default_factory=list)
    looks: list[dict[str, Any]] = field(default_factory=list)
    more_seeds: dict[str, float] = field(default_factory=dict)   # undecided: seeds per contender to settle it
    stage: str = "racing"                  # or "finalists" (the fixed block, one look at the end)
    failed_runs: int = 0                   # of `runs`, the attempts that failed (the budget counts the rest)
    alpha_spent: float = 0.0
    segment_start: int = 0                 # runs when the current error-budget segment began
    segment_base: float = 0.0              # error budget spent before it

    # --- reading it ---------------------------------------------------------------------------------
    def contender(self, label: str | None) -> Entry | None:
        return next((c for c in self.contenders if c.label == label), None)

    @property
    def is_winner(self) -> bool:
        return self.decision == WINNER

    def words(self) -> str:
        """The decision in one sentence, as the last printed line and summary.md say it."""
        chosen = self.contender(self.chosen)
        names = ", ".join(c.name for c in self.contenders if c.label in self.live)
        spent = f"{self.runs} finalist fine-tunes, {self.rounds} seeds each"
        if self.failed_runs:
            spent = f"{self.runs} finalist fine-tunes of which {self.failed_runs} failed, {self.rounds} seeds each"
        if not self.live:
            return (f"decision: undecided: every contender failed ({spent}); the failed runs run again on "
                    f"`--resume` or `mola-search decide`")
        if self.decision == WINNER and chosen is not None:
            gap = self._gap_to_next()
            return (f"decision: winner {chosen.name} ({_experts(chosen)}): better than every other contender on "
                    f"validation {self.metric}{gap} at family-wise level {self.level:g} ({spent})")
        if self.decision == EQUIVALENT:
            return (f"decision: equivalent: {names} are within ±{self.min_effect:g} validation {self.metric} of each "
                    f"other's leader at level {self.level:g} ({spent}); exported {chosen.name if chosen else '-'} by "
                    f"the tie-break ({TIE_BREAK}), not as a best")
        return (f"decision: undecided between {names} ({self.stopped}; {spent}); "
                + self._more_text() + (f"; exported {chosen.name} by the tie-break, not as a best" if chosen else ""))

    def spending_words(self) -> str:
        """How the race spent its error budget over its looks, in words (summary.md and the report)."""
        scored = self.runs - self.failed_runs
        if self.stage == "finalists":
            return f"the whole error budget spent at one look after the fixed block's {scored} scored fine-tunes"
        return (f"the error budget spent as the cube of the share of the budget used: {scored} of {self.max_runs} "
                f"scored fine-tunes")

    def _gap_to_next(self) -> str:
        if not self.looks:
            return ""
        last = self.looks[-1]
        means = last.get("means") or {}
        if self.chosen not in means or len(means) < 2:
            return ""
        runner = max((v for k, v in means.items() if k != self.chosen), default=math.nan)
        return f" (by {means[self.chosen] - runner:+.3g} over the runner-up at the last look)"

    def _more_text(self) -> str:
        finite = {k: v for k, v in self.more_seeds.items() if math.isfinite(v)}
        if not finite:
            return "the observed differences give no estimate of how many more seeds would settle it"
        what, n = min(finite.items(), key=lambda kv: kv[1])
        extra = max(1, math.ceil(n) - self.rounds)
        shown = "a winner" if what == WINNER else f"equivalence within ±{self.min_effect:g}"
        return (f"about {extra} more seed{'s' if extra != 1 else ''} per contender ({extra * len(self.live)} "
                f"fine-tunes) would likely show {shown}")

    def next_command(self, folder: str) -> str:
        """The command that would move the decision on (none for a winner)."""
        if self.decision == WINNER:
            return f"mola-search export {folder}"
        if self.decision == EQUIVALENT:
            return (f"mola-search decide {folder} --min-effect {self.min_effect / 2:g}   # a finer question: "
                    f"is any of them better by half the effect?")
        finite = [v for v in self.more_seeds.values() if math.isfinite(v)]
        if not self.live:
            return f"mola-search decide {folder}"
        extra = (max(1, math.ceil(min(finite)) - self.rounds) * len(self.live)) if finite else 2 * len(self.live)
        return f"mola-search decide {folder} --max-finalist-runs {self.runs - self.failed_runs + extra}"

    # --- the file -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for c in out["contenders"]:
            for key in ("validation", "test", "test_accuracy", "failures", "attempts", "wall_s", "peak_mb"):
                c[key] = {str(k): v for k, v in c[key].items()}
        out["words"] = self.words()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Decision":
        raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        contenders = []
        for c in raw.pop("contenders", []):
            c = {k: v for k, v in c.items() if k in Entry.__dataclass_fields__}
            for key in ("validation", "test", "test_accuracy", "wall_s", "peak_mb"):
                c[key] = {int(k): (math.nan if v is None else float(v)) for k, v in (c.get(key) or {}).items()}
            c["failures"] = {int(k): str(v) for k, v in (c.get("failures") or {}).items()}
            c["attempts"] = {int(k): int(v) for k, v in (c.get("attempts") or {}).items()}
            contenders.append(Entry(**c))
        return cls(**raw, contenders=contenders)


def tie_break(live: list[Entry]) -> Entry | None:
    """The member of a tie set the study exports: the paper's inverted triangle when it is in the set, else
    the leader on mean validation score."""
    preferred = [c for c in live if Origin(c.origin).is_seed and Origin(c.origin).name == PREFERRED_TIE]
    if preferred:
        return preferred[0]
    return max(live, key=lambda c: (c.val_mean if c.val_mean == c.val_mean else -math.inf, -c.number), default=None)


def _experts(c: Entry) -> str:
    from mola_search.allocation import run_length

    return run_length(c.experts)


