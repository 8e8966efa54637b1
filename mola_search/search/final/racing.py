"""``racing`` (the default): race the contenders over seeds until the study can say "this one", "these are
equivalent" or "not yet, and what it would take".

In each round every live contender trains with one more fresh seed (FINALIST_SEED_BASE + study seed + round:
the seeds no search or pilot trial used), the same seed for all, so every comparison is paired. From round
`race_min_seeds` on, the race looks at the validation scores after every round (`stats.race.look`, at the
share of the error budget the round's fine-tunes buy): a contender worse than the leader is dropped; the race
stops at the first of a winner (the leader beats every other live contender), equivalence (every live
contender within +-`min_effect` of the leader) or undecided (the next round would pass
`max_finalist_runs` or the study's `time_budget`). A failed run is retried once; a contender whose run fails
twice leaves the race as failed, with the reason, until the study is resumed or continued: then it runs again.
The budget and the error spending count scored runs; failed attempts are reported beside them.

Everything is resumable: a run whose metrics.json exists is never trained again, and racing.json keeps the
looks already made (with the error budget each spent), so a resumed or continued race (`mola-search decide`)
spends only what is left.

``finalists`` (`--no-racing`) is the same engine with one look: every contender gets `finalist_seeds` seeds,
then the whole error budget is spent on that one look.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mola_search.allocation import run_length
from mola_search.search.config import FINALIST_SEED_BASE
from mola_search.search.final.base import FinalResult, FinalStage, register_stage
from mola_search.search.progress import RunProgress
from mola_search.search.study import Contender, Finalist
from mola_search.search.study.decision import (DROPPED, EQUIVALENT, FAILED, LIVE, UNDECIDED, WINNER, Decision, Entry,
                                               tie_break)
from mola_search.stats import race as stats
from mola_search.trial import TrialOutcome, TrialRequest

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext

MAX_ATTEMPTS = 2  # a failed run is retried once


@register_stage
class Racing(FinalStage):
    name = "racing"

    def run(self, study: "StudyContext", contenders: Sequence[Contender]) -> FinalResult:
        config = study.config
        return Race(study, contenders, first_look=config.race_min_seeds, max_runs=config.finalist_budget(),
                    stage=self.name).run()


@register_stage
class FixedFinalists(FinalStage):
    name = "finalists"

    def run(self, study: "StudyContext", contenders: Sequence[Contender]) -> FinalResult:
        seeds = study.config.finalist_seeds
        if seeds == 0 or not contenders:
            return FinalResult(None, [])
        return Race(study, contenders, first_look=seeds, max_runs=seeds * len(contenders), stage=self.name,
                    last_round=seeds).run()


class Race:
    """One race over `contenders`; `run` trains the rounds still missing and returns the decision."""

    def __init__(self, study: "StudyContext", contenders: Sequence[Contender], *, first_look: int, max_runs: int,
                 stage: str, last_round: int | None = None) -> None:
        self.study, self.config = study, study.config
        self.first_look, self.max_runs, self.stage, self.last_round = max(2, first_look), max_runs, stage, last_round
        self.delta, self.alpha = self.config.effect_size(), self.config.race_level
        self.specs = {c.label: c.spec for c in contenders}
        self.entries = {c.label: Entry(c.label, c.number, c.origin, list(c.spec.experts), list(c.spec.top_k),
                                       list(c.spec.rank)) for c in contenders}
        self.looks: list[dict[str, Any]] = []
        self.alpha_spent, self.looked_runs, self.same_question = 0.0, 0, True
        self.level = self.alpha  # the family-wise level of all the race's claims: alpha per segment
        # a segment spends level - segment_base over the runs from segment_start to max_runs (stats.race.spent_by)
        self.segment_start, self.segment_base = 0, 0.0
        self._restore()

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> FinalResult:
        self._read_runs()
        decision = self._replay() or self._race()
        self.study.folder.write_racing(decision.to_dict())
        return FinalResult(decision, self.finalists())

    def _race(self) -> Decision:
        while True:
            live = self.live()
            if len(live) < 2:
                return self._last_one(live)
            rounds = self.complete_rounds()
            stop = self._stop_before(rounds, live)
            if stop:
                return self._decide(UNDECIDED, stop)
            self._train_round(rounds)
            rounds = self.complete_rounds()
            if rounds >= self.first_look and (self.last_round is None or rounds >= self.last_round):
                verdict = self._look(rounds)
                if verdict != UNDECIDED or (self.last_round is not None and rounds >= self.last_round):
                    return self._decide(verdict, "decided" if verdict != UNDECIDED else "one look at the fixed block")
            self._save()

    def _last_one(self, live: list[Entry]) -> Decision:
        """One contender left: the winner when every other was shown worse; undecided when others failed (a
        failed run shows nothing) or there was nothing to race."""
        others = [e for e in self.entries.values() if e.status != LIVE]
        if len(live) == 1 and others and all(e.status == DROPPED for e in others):
            return self._decide(WINNER, "decided")
        why = ("only one contender: nothing to compare it with" if len(self.entries) == 1 else
               "every contender failed" if not live else "the other contenders failed")
        return self._decide(UNDECIDED, why)

    def _stop_before(self, rounds: int, live: list[Entry]) -> str:
        """Why the next round must not start ("" when it may)."""
        if self.last_round is not None:
            return "the fixed block is done" if rounds >= self.last_round else ""
        needed = sum(1 for e in live if self.seed(rounds) not in e.validation)  # fewer when one catches up
        if self.scored() + needed > self.max_runs:
            return f"the finalist budget of {self.max_runs} fine-tunes is spent"
        budget = self.config.time_budget
        if budget is not None and rounds >= self.first_look:
            per_run = self._seconds_per_run()
            waves = math.ceil(len(live) / max(1, self.study.progress.concurrency))
            if time.time() - self.study.started + per_run * waves > 60 * budget:
                return f"the next round would pass the time budget of {budget:g} min"
        return ""

    # --- training -----------------------------------------------------------------------------------
    def seed(self, round_index: int) -> int:
        return FINALIST_SEED_BASE + self.config.seed + round_index

    def _train_round(self, round_index: int) -> None:
        """Round `round_index`: every live contender without a score at its seed trains; failures once more."""
        seed = self.seed(round_index)
        for attempt in range(MAX_ATTEMPTS):
            todo = [e for e in self.live() if seed not in e.validation]
            if not todo:
                return
            word = "round" if attempt == 0 else "retry of the failed runs of round"
            self.study.message(f"{self.stage}: {word} {round_index + 1}: {len(todo)} contender(s) x seed {seed}, "
                               f"at finalist fidelity ({self._spent_text()})")
            self._train(todo, seed)
        for e in self.live():
            if seed not in e.validation:
                e.status, e.dropped_at = FAILED, round_index
                e.reason = f"seed {seed} failed {e.attempts.get(seed, 0)} times: {e.failures.get(seed, '')}"
                self.study.message(f"  {e.label}: FAILED ({e.reason}); it leaves the race")

    def _train(self, entries: list[Entry], seed: int) -> None:
        requests = [self._request(e, seed) for e in entries]
        by_number = {e.number: e for e in entries}
        runs = RunProgress(len(requests), self.study.progress.stream, what="race" if self.stage == "racing"
                           else "finalist")

        def on_done(r: TrialRequest, outcome: TrialOutcome) -> None:
            entry = by_number[r.number]
            entry.wall_s[r.train_seed] = round(outcome.wall_time_s, 2)
            entry.peak_mb[r.train_seed] = round(outcome.peak_rss_mb, 1)
            if outcome.failure is None and outcome.metrics:
                self.study.folder.write_run_metrics(r.out, outcome.metrics)
                self._record(entry, r.train_seed, outcome.metrics)
            if r.train_seed not in entry.validation:
                entry.attempts[r.train_seed] = entry.attempts.get(r.train_seed, 0) + 1
                entry.failures[r.train_seed] = outcome.failure or "the run produced no validation score"
            # the race decides on validation; test is read once, after it, for the report
            runs.run_done(entry.label, r.train_seed, entry.validation.get(r.train_seed), outcome.failure,
                          what=f"validation {self.config.metric}")

        self.study.executor.run(requests, self.study.fidelity, on_done, name=f"{self.stage}-seed{seed}",
                                concurrency=self.study.concurrency(self.stage))
        self._save()

    def _request(self, entry: Entry, seed: int) -> TrialRequest:
        spec = self.specs[entry.label]
        return TrialRequest(entry.number, spec.experts, spec.top_k, spec.rank, entry.origin, train_seed=seed,
                            min_experts=self.study.space.min_experts, max_experts=self.study.space.max_experts,
                            final=True, out=str(self.study.folder.finalist_run_dir(entry.label, seed)))

    def _record(self, entry: Entry, seed: int, metrics: dict[str, Any]) -> None:
        val, test = metrics.get("validation") or {}, metrics.get("test") or {}
        metric = self.config.metric
        if val.get(metric) is None or test.get(metric) is None:
            return
        entry.validation[seed], entry.test[seed] = float(val[metric]), float(test[metric])
        if test.get("accuracy") is not None:
            entry.test_accuracy[seed] = float(test["accuracy"])
        entry.failures.pop(seed, None)

    def _read_runs(self) -> None:
        """Runs that finished before (a resumed study, an old study's fixed block) count as they are."""
        scheduled = None if self.last_round is None else {self.seed(r) for r in range(self.last_round)}
        for label, runs in self.study.folder.finalist_runs():
            entry = self.entries.get(label)
            for seed, _, metrics in runs if entry is not None else ():
                if scheduled is None or seed in scheduled:  # a smaller fixed block reports its first seeds
                    self._record(entry, seed, metrics)
                    if seed not in entry.wall_s and metrics.get("wall_time_s") is not None:
                        entry.wall_s[seed] = round(float(metrics["wall_time_s"]), 2)  # a run racing.json missed

    # --- looking ------------------------------------------------------------------------------------
    def _look(self, rounds: int) -> str:
        live = self.live()
        seeds = [self.seed(r) for r in range(rounds)]
        # The error budget this look may spend (stats.race.spent_by): a fraction of the segment's budget that
        # grows with the fine-tunes spent since the segment began; a fixed block spends all of it at once.
        if self.last_round is not None:
            alpha = self.level - self.alpha_spent
        else:
            target = stats.spent_by(self.scored() - self.segment_start, self.max_runs - self.segment_start)
            alpha = max(0.0, self.segment_base + (self.level - self.segment_base) * target - self.alpha_spent)
        result = stats.look({e.label: e.validation for e in live}, seeds, alpha=alpha, delta=self.delta)
        self.alpha_spent += alpha
        self.looked_runs = self.scored()
        for label in result.dropped:
            entry = self.entries[label]
            gap = result.means[result.leader] - result.means[label]
            entry.status, entry.dropped_at = DROPPED, rounds
            entry.reason = (f"worse than {self.entries[result.leader].name} by {gap:.3g} validation "
                            f"{self.config.metric} after {rounds} seeds (Holm over {len(result.pairs)} pairs at "
                            f"{alpha:.2g})")
        self.looks.append(_look_record(result, rounds, self.scored()))
        self._print_look(result, rounds)
        return result.decision

    def _print_look(self, result: stats.Look, rounds: int) -> None:
        leader = self.entries[result.leader]
        text = (f"  look after {rounds} seeds (error budget {result.alpha:.2g} of {self.level:g}): leader "
                f"{leader.name} {result.means[result.leader]:.4f}, SE of a difference {result.se:.2g}")
        if result.dropped:
            text += "; dropped " + ", ".join(self.entries[c].name for c in result.dropped)
        if result.decision != UNDECIDED:
            text += f"; {result.decision}"
        self.study.message(text)

    def _decide(self, verdict: str, stopped: str) -> Decision:
        live = self.live()
        chosen = live[0] if verdict == WINNER else tie_break(live)
        decision = Decision(verdict, self.config.metric, self.delta, self.level, self.max_runs, self.runs(),
                            self.complete_rounds(), [e.label for e in live], chosen.label if chosen else None,
                            stopped, list(self.entries.values()), self.looks, stage=self.stage,
                            failed_runs=self.failed_runs(),
                            alpha_spent=self.alpha_spent, segment_start=self.segment_start,
                            segment_base=self.segment_base)
        if verdict == UNDECIDED and len(live) >= 2 and self.looks:
            last = self.looks[-1]
            means = sorted((last["means"][e.label] for e in live if e.label in last["means"]), reverse=True)
            if len(means) >= 2:
                per_round = stats.spend(self.alpha, len(live), self.max_runs)
                decision.more_seeds = stats.seeds_to_decide(last["mse"], means[0] - means[1], self.delta, per_round)
        return decision

    # --- bookkeeping --------------------------------------------------------------------------------
    def live(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.status == LIVE]

    def complete_rounds(self) -> int:
        """Rounds every live contender has a score for (the table a look reads)."""
        r = 0
        while self.live() and all(self.seed(r) in e.validation for e in self.live()):
            r += 1
        return r

    def runs(self) -> int:
        """Fine-tunes spent: every scored run and every failed attempt."""
        return self.scored() + self.failed_runs()

    def scored(self) -> int:
        """Runs with a score: what the budget (`max_runs`) and the error spending count."""
        return sum(len(e.validation) for e in self.entries.values())

    def failed_runs(self) -> int:
        return sum(sum(e.attempts.values()) for e in self.entries.values())

    def _spent_text(self) -> str:
        failed = self.failed_runs()
        return (f"{self.scored()} of {self.max_runs} fine-tunes spent"
                + (f", and {failed} failed attempt{'s' if failed != 1 else ''}" if failed else ""))

    def _seconds_per_run(self) -> float:
        times = [float(m.get("wall_time_s") or 0.0) for e in self.entries.values() for s in e.validation
                 if (m := self.study.folder.run_metrics(self.study.folder.finalist_run_dir(e.label, s)))]
        return sum(times) / len(times) if times else 0.0

    def finalists(self) -> list[Finalist]:
        """Every contender as a `Finalist` (its scored seeds in order), for finalists.csv and the summary."""
        out = []
        for e in self.entries.values():
            seeds = sorted(e.validation)
            fin = Finalist(e.label, e.number, e.origin, self.specs[e.label], [e.validation[s] for s in seeds],
                           [e.test[s] for s in seeds], seeds=seeds,
                           test_accuracy=[e.test_accuracy.get(s, math.nan) for s in seeds],
                           failures=[f"seed {s}: {why}" for s, why in sorted(e.failures.items())])
            out.append(fin)
            if fin.validation:
                self.study.message(f"  {e.label:<32} {run_length(e.experts):<22} validation {fin.val_mean:.4f} "
                                   f"± {fin.val_std:.4f} (n={len(seeds)}) {e.status}")
            else:
                self.study.message(f"  {e.label:<32} FAILED: {'; '.join(fin.failures) or e.reason}")
        return out

    def _save(self) -> None:
        """racing.json as it stands (an interrupted race resumes from it)."""
        state = Decision(UNDECIDED, self.config.metric, self.delta, self.level, self.max_runs, self.runs(),
                         self.complete_rounds(), [e.label for e in self.live()], None, "running",
                         list(self.entries.values()), self.looks, stage=self.stage, failed_runs=self.failed_runs(),
                         alpha_spent=self.alpha_spent,
                         segment_start=self.segment_start, segment_base=self.segment_base)
        self.study.folder.write_racing(state.to_dict())

    def _restore(self) -> None:
        """Statuses, looks and the error budget already spent, from racing.json (a resumed race, a continued
        one, or a fixed block a race now continues). A race whose looks spent its whole budget can only go on
        with a new one: the continuation opens a segment of `race_level` more, and the decision then states
        the level of all its claims together (the union bound), e.g. 0.1 after one continuation."""
        raw = self.study.folder.read_racing()
        if not raw:
            return
        before = Decision.from_dict(raw)
        for old in before.contenders:
            entry = self.entries.get(old.label)
            if entry is None:
                continue
            entry.status, entry.reason, entry.dropped_at = old.status, old.reason, old.dropped_at
            entry.failures, entry.attempts = dict(old.failures), dict(old.attempts)
            entry.wall_s, entry.peak_mb = dict(old.wall_s), dict(old.peak_mb)
            if entry.status == FAILED:  # a resumed or continued study runs a failed contender again
                self.study.message(f"{self.stage}: {entry.name} failed before ({entry.reason}); it runs again")
                entry.status, entry.reason, entry.dropped_at = LIVE, "", None
        self.looks, self.alpha_spent = list(before.looks), before.alpha_spent
        self.level = max(before.level, self.alpha)
        self.looked_runs = self.looks[-1]["runs"] if self.looks else 0
        self.segment_start, self.segment_base = before.segment_start, before.segment_base
        self.same_question = (before.min_effect, before.level, before.max_runs) == (self.delta, self.level,
                                                                                      self.max_runs)
        if self.same_question or not self.looks:
            return
        # another question or budget: what is left is spread over the runs from here on
        self.segment_start, self.segment_base = self.looked_runs, self.alpha_spent
        if self.level - self.alpha_spent < 1e-12:
            self.level += self.alpha
            self.study.message(f"{self.stage}: the earlier looks spent the error budget; this continuation opens a "
                               f"new one of {self.alpha:g}, so the race's claims together hold at family-wise level "
                               f"{self.level:g}")

    def _replay(self) -> Decision | None:
        """A race that already decided (racing.json says so) is not raced again."""
        if not self.looks or not self.same_question:
            return None
        last = self.looks[-1]
        if last["decision"] != UNDECIDED and set(last["live_after"]) == {e.label for e in self.live()}:
            return self._decide(last["decision"], "decided")
        return None


def _look_record(result: stats.Look, rounds: int, runs: int) -> dict[str, Any]:
    return {"rounds": rounds, "runs": runs, "seeds": list(result.seeds), "alpha": result.alpha,
            "leader": result.leader, "means": result.means, "mse": result.mse, "df": result.df, "se": result.se,
            "dropped": list(result.dropped), "tost": result.tost, "decision": result.decision,
            "live_after": [c for c in result.means if c not in result.dropped],
            "pairs": [{"a": p.a, "b": p.b, "diff": p.diff, "p": p.p} for p in result.pairs]}
