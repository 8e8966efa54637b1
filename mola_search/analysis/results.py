"""The result table: every finalist on the held-out test split, against the best seeded baseline.

Finalists are retrained with training seeds 0..k-1, so two finalists' runs pair by
seed: the comparison with the best seed uses the per-seed differences (a paired
t-test, `scipy.stats.ttest_rel`, and a percentile bootstrap CI of the mean
difference). With the usual k = 3 both are weak: the t-test has 2 degrees of
freedom and the bootstrap only 10 distinct resamples; the table says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mola_search.analysis.studydata import FinalistRecord, StudyData


@dataclass
class Paired:
    n: int
    mean_diff: float
    lo: float
    hi: float
    p_value: float


def paired_comparison(a: dict[int, float], b: dict[int, float], *, n_boot: int = 5000, level: float = 0.95,
                      seed: int = 0) -> Paired | None:
    """Compare `a` with `b` on the seeds both have: mean(a - b), bootstrap CI, paired t-test p-value."""
    from scipy import stats

    common = sorted(set(a) & set(b))
    if not common:
        return None
    d = np.array([a[s] - b[s] for s in common], dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return Paired(len(d), mean, math.nan, math.nan, math.nan)
    if np.ptp(d) == 0:  # identical differences: the t statistic is undefined, the bootstrap degenerate
        return Paired(len(d), mean, mean, mean, math.nan)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    tail = 100 * (1 - level) / 2
    p = float(stats.ttest_rel([a[s] for s in common], [b[s] for s in common]).pvalue)
    return Paired(len(d), mean, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail)), p)


@dataclass
class ResultRow:
    name: str
    origin: str
    number: int
    allocation: tuple[int, ...] | None
    scores: dict[int, float]            # seed -> test accuracy (or one validation score)
    validation: float | None
    trainable_params: int | None
    role: str = ""                      # "best", "best searched", "best seed", ""
    vs_best_seed: Paired | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values()) if self.scores else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores.values()) if len(self.scores) > 1 else 0.0

    @property
    def is_seed(self) -> bool:
        return self.origin.startswith("seed:")


@dataclass
class ResultTable:
    rows: list[ResultRow]
    metric: str                         # what the scores are
    best_seed: str | None
    notes: list[str] = field(default_factory=list)
    majority: float | None = None       # always answering the most frequent train label, same test examples

    def row(self, role: str) -> ResultRow | None:
        return next((r for r in self.rows if role in r.role.split(", ")), None)

    def below_majority(self) -> list[ResultRow]:
        """Rows whose mean does not beat always answering the majority label (none when it is unknown)."""
        return [] if self.majority is None else [r for r in self.rows if r.mean <= self.majority]

    @property
    def nothing_learned(self) -> bool:
        return bool(self.rows) and len(self.below_majority()) == len(self.rows)


def result_table(data: StudyData) -> ResultTable:
    finalists = [f for f in data.finalists if f.test]
    if finalists:
        return _from_finalists(data, finalists)
    return _from_trials(data)


def _from_finalists(data: StudyData, finalists: Sequence[FinalistRecord]) -> ResultTable:
    rows = [ResultRow(f.name, f.origin, f.number, f.allocation, dict(f.test),
                      statistics.fmean(f.validation.values()) if f.validation else None, f.trainable_params)
            for f in finalists]
    table = ResultTable(rows, "test accuracy (held-out test split), mean ± std over training seeds", None,
                        majority=_majority(finalists))
    best = data.best_finalist()
    _mark(table, best.number if best else None)
    _check_against_majority(table)
    if not _compare_to_best_seed(table):
        table.notes.append("no seeded baseline has finished as a finalist: nothing to test against")
    k = max(len(r.scores) for r in rows)
    if k < 2:
        table.notes.append("one training seed per finalist: no spread, no test; retrain with --finalist-seeds >= 3")
    elif k <= 5:
        distinct = math.comb(2 * k - 1, k)
        table.notes.append(f"n = {k} paired seeds: the paired t-test has {k - 1} degree(s) of freedom and the "
                           f"bootstrap only {distinct} distinct resamples, so p-values and CIs are rough; "
                           "a difference smaller than the seed-to-seed spread is not evidence")
    return table


def _majority(finalists: Sequence[FinalistRecord]) -> float | None:
    values = {round(float(m["test"]["majority_baseline"]), 6) for f in finalists for m in f.metrics.values()
              if (m.get("test") or {}).get("majority_baseline") is not None}
    return values.pop() if len(values) == 1 else None  # one test sample for every finalist, else no reference


def _check_against_majority(table: ResultTable) -> None:
    """A fine-tune that does not beat always answering the majority label has not learned the task:
    ranking such runs ranks seed noise, and the reader must be told before reading the table."""
    below = table.below_majority()
    if table.nothing_learned:
        table.notes.append(f"every finalist's mean is at or below the majority-class baseline ({table.majority:.4f} "
                           "on the same test examples): at this fidelity the fine-tunes did not learn the task, so "
                           "this table ranks seed noise; train trials on more data (--max-train-examples, --epochs)")
    elif below:
        table.notes.append(f"{len(below)} of {len(table.rows)} finalists are at or below the majority-class "
                           f"baseline ({table.majority:.4f}): {', '.join(r.name for r in below)}")


def _from_trials(data: StudyData) -> ResultTable:
    """No finalists: the seeds' and the best searched trial's single validation scores."""
    done = data.completed(unique=True)
    rows = []
    for t in done:
        if t.is_seed:
            rows.append(ResultRow(t.seed_name, t.origin, t.number, t.allocation, {0: t.value}, t.value, None))
    searched = [t for t in done if not t.is_seed]
    if searched:
        t = max(searched, key=lambda t: t.value)
        rows.append(ResultRow(f"trial {t.number} ({t.origin})", t.origin, t.number, t.allocation, {0: t.value},
                              t.value, None))
    table = ResultTable(rows, "validation score of one search trial (no finalist retrained on the test split)",
                        None, ["no finalists: these are single search-fidelity validation scores, with no seeds to "
                               "pair and no test split; run finalists (--finalist-seeds 3) for the real comparison"])
    best = max(rows, key=lambda r: r.mean) if rows else None
    _mark(table, best.number if best else None)
    _compare_to_best_seed(table)  # single runs: one pair, the plain difference
    return table


def _compare_to_best_seed(table: ResultTable) -> bool:
    """Pair every row with the best seeded baseline by training seed; False when no seed finished."""
    seeds = [r for r in table.rows if r.is_seed]
    if not seeds:
        return False
    ref = max(seeds, key=lambda r: r.mean)
    table.best_seed = ref.name
    for r in table.rows:
        if r is not ref:
            r.vs_best_seed = paired_comparison(r.scores, ref.scores)
    return True


def _mark(table: ResultTable, best_number: int | None) -> None:
    rows = table.rows
    searched = [r for r in rows if not r.is_seed]
    seeds = [r for r in rows if r.is_seed]
    roles: dict[int, list[str]] = {}
    if best_number is not None:
        roles.setdefault(best_number, []).append("best")
    if searched:
        roles.setdefault(max(searched, key=lambda r: r.mean).number, []).append("best searched")
    if seeds:
        roles.setdefault(max(seeds, key=lambda r: r.mean).number, []).append("best seed")
    for r in rows:
        r.role = ", ".join(roles.get(r.number, []))
    rows.sort(key=lambda r: -r.mean if r.mean == r.mean else math.inf)
