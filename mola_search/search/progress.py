"""One line per finished trial: what ran, its score, best so far, counts and ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from optuna.trial import TrialState

from mola_search.allocation import run_length


class Progress:
    def __init__(self, total: int, concurrency: int = 1, stream: TextIO | None = None) -> None:
        self.total, self.concurrency = total, max(1, concurrency)
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.done_before = 0

    def resume_from(self, finished: Sequence) -> None:
        """Counts start from the trials already finished (a resumed study, or the pilot's runs)."""
        self.done_before = len(finished)
        self.start = time.time()  # the ETA extrapolates from the trials run from here on
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        for t in finished:
            self.counts[_label(t.state)] += 1

    def trial_done(self, number: int, origin: str, experts: Sequence[int], state: TrialState,
                   score: float | None, failure: str | None, best: tuple[int, float] | None) -> None:
        self.counts[_label(state)] += 1
        done = sum(self.counts.values())
        ran_now = done - self.done_before
        elapsed = time.time() - self.start
        remaining = max(0, self.total - done)
        eta = elapsed / ran_now * remaining if ran_now else 0.0
        shown = f"{score:.4f}" if score is not None and state == TrialState.COMPLETE else _label(state)
        best_txt = f"best {best[1]:.4f} (#{best[0]})" if best else "best -"
        line = (f"[{done}/{self.total}] trial {number:>3} {origin:<24} {run_length(experts):<22} {shown:<9} "
                f"{best_txt}  done {self.counts['complete']} pruned {self.counts['pruned']} "
                f"failed {self.counts['failed']}  ETA {duration(eta)}")
        if failure:
            line += f"\n      failed: {failure}"
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RunProgress:
    """One line per finished independent run (the finalists): which, its score, how many left, ETA."""

    def __init__(self, total: int, stream: TextIO | None = None, what: str = "finalist") -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.done = 0
        self.what = what

    def run_done(self, label: str, seed: int, score: float | None, failure: str | None = None,
                 what: str = "score") -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        shown = f"{what} {score:.4f}" if score is not None and score == score else "failed"
        line = (f"  [{self.what} {self.done}/{self.total}] {label:<32} seed {seed}  {shown:<20} "
                f"ETA {duration(eta)}")
        if failure:
            line += f"\n      failed: {failure}"
        print(line, file=self.stream, flush=True)


def _label(state: TrialState) -> str:
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(state, "failed")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
