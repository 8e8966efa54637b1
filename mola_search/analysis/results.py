"""The result table: finalists chosen on validation, reported on the held-out test split once.

Selection is honest: the roles "best", "best searched" and "best seed" go to the
finalists with the highest mean VALIDATION score of the study's metric over their
training seeds (ties: validation accuracy). The table then reports each
finalist's test scores (the metric, accuracy, and f1 / mcc where the task has
them); nothing is chosen by looking at them.

Comparisons pair the same test examples and the same training seeds: every
finalist is retrained with the same seeds and scored on the same test examples,
so the difference of two finalists is a seeds x examples matrix, and its mean is
bootstrapped by resampling seeds and examples (both with replacement). A study
written before per-example scores were recorded falls back to pairing per-seed
means (a paired t-test on a handful of seeds), and the table says so. The chosen
best is compared with every seeded paper shape, not only the best one, and the
table carries the study's noise-floor line.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mola_search.analysis.studydata import (EXTRA_METRICS, PAPER_SHAPES, FinalistRecord, StudyData,
                                            per_example_key)
from mola_search.search.study import HasOrigin
from mola_search.stats.family import holm_adjusted
from mola_search.stats.paired import EXAMPLES_X_SEEDS, PER_SEED, Paired, paired_comparison, paired_examples

FAMILY_ALPHA = 0.05  # each family of claims (verdicts, majority) holds at this family-wise error rate

@dataclass
class ResultRow(HasOrigin):
    name: str
    origin: str
    number: int
    allocation: tuple[int, ...] | None
    scores: dict[int, float]            # train seed -> test <metric> (or one search-fidelity validation score)
    validation: dict[int, float]        # train seed -> validation <metric>
    trainable_params: int | None
    accuracy: dict[int, float] = field(default_factory=dict)              # train seed -> test accuracy
    extra: dict[str, dict[int, float]] = field(default_factory=dict)      # f1 / mcc -> train seed -> test value
    examples: dict[int, dict[str, float]] = field(default_factory=dict)   # train seed -> id -> test <metric>
    correct: dict[int, dict[str, float]] = field(default_factory=dict)    # train seed -> id -> 0/1
    val_accuracy: dict[int, float] = field(default_factory=dict)
    role: str = ""                      # "best", "best searched", "best seed" (comma-joined), or ""
    vs_best_seed: Paired | None = None
    vs_best_seed_holm: float = math.nan  # its p-value, Holm-adjusted over the rows compared with the best seed
    vs_majority: Paired | None = None   # test accuracy minus the majority-class rate
    majority_claim: str = ""            # "above" | "below" | "not distinguishable" (Holm over the rows) | ""

    @property
    def mean(self) -> float:
        return _mean(self.scores)

    @property
    def std(self) -> float:
        return _std(self.scores)

    @property
    def val_mean(self) -> float:
        return _mean(self.validation)

    @property
    def acc_mean(self) -> float:
        return _mean(self.accuracy)

    @property
    def acc_std(self) -> float:
        return _std(self.accuracy)


@dataclass
class SeedComparison:
    """The chosen best against one seeded shape, on the study metric and on accuracy; the p-values Holm-adjusted
    over the family (the best against every seeded shape)."""

    seed: str
    metric: Paired | None
    accuracy: Paired | None
    metric_holm: float = math.nan
    accuracy_holm: float = math.nan

    @property
    def verdict(self) -> str:
        """"better" / "worse" only when the Holm-adjusted p-value is below 0.05."""
        p = self.metric
        if p is None:
            return "–"
        if p.lo == p.hi:
            return "no spread: identical on every example"
        if self.metric_holm <= FAMILY_ALPHA:
            return "better (Holm)" if p.mean_diff > 0 else "worse (Holm)"
        return "no difference shown (Holm)"


@dataclass
class ResultTable:
    rows: list[ResultRow]
    metric: str                         # what the scores are, in words
    best_seed: str | None
    notes: list[str] = field(default_factory=list)
    majority: float | None = None       # always answering the most frequent train label, same test examples
    metric_name: str = "accuracy"       # the study metric's name
    selected_on: str = "validation"
    vs_seeds: list[SeedComparison] = field(default_factory=list)   # the best vs every seeded shape
    noise_line: str = ""
    on_test: bool = True                # False: single search trials, no finalists

    def row(self, role: str) -> ResultRow | None:
        return next((r for r in self.rows if role in r.role.split(", ")), None)

    def below_majority(self) -> list[ResultRow]:
        """Rows not shown to beat always answering the majority label (the claim "above" needs its interval, with
        Holm over the rows, to exclude the majority rate)."""
        return [] if self.majority is None else [r for r in self.rows if r.majority_claim != "above"]

    @property
    def nothing_learned(self) -> bool:
        return bool(self.rows) and len(self.below_majority()) == len(self.rows)

    @property
    def extras(self) -> list[str]:
        return [k for k in EXTRA_METRICS if k != self.metric_name and any(k in r.extra for r in self.rows)]


def result_table(data: StudyData, *, n_boot: int = 2000) -> ResultTable:
    """The honest result table of a study: finalists if any finished, else single search trials."""
    finalists = [f for f in data.finalists if f.test]
    table = _from_finalists(data, finalists, n_boot=n_boot) if finalists else _from_trials(data)
    table.noise_line = data.noise_line()
    table.notes.insert(0, table.noise_line)
    if data.metric != data.configured_metric:
        table.notes.append(f"this study recorded accuracy only (it was written before the `{data.configured_metric}` "
                           "score existed): selection, scores and comparisons use accuracy")
    return table


def _row(f: FinalistRecord) -> ResultRow:
    return ResultRow(f.name, f.origin, f.number, f.allocation, dict(f.test), dict(f.validation), f.trainable_params,
                     dict(f.test_accuracy), {k: dict(v) for k, v in f.test_extra.items()}, f.per_example("test"),
                     f.per_example("test", per_example_key("accuracy")), dict(f.val_accuracy))


def _from_finalists(data: StudyData, finalists: Sequence[FinalistRecord], *, n_boot: int = 2000) -> ResultTable:
    rows = [_row(f) for f in finalists]
    on = data.selected_on()
    table = ResultTable(rows, f"test `{data.metric}` on the held-out test split, mean ± std over training seeds; "
                              f"rows ordered by mean validation `{data.metric}` (the selection)", None,
                        majority=_majority(finalists), metric_name=data.metric, selected_on=on)
    best = data.best_finalist()
    searched = data.best_finalist(searched_only=True)
    seed = data.best_finalist(seeds_only=True)
    _mark(table, {"best": best, "best searched": searched, "best seed": seed})
    table.best_seed = seed.name if seed is not None else None
    _selection_notes(data, table, best)
    _check_against_majority(table)
    if seed is None:
        table.notes.append("no seeded baseline has finished as a finalist: nothing to compare with")
    else:
        ref = next(r for r in rows if r.number == seed.number)
        for r in rows:
            if r is not ref:
                r.vs_best_seed = compare(r, ref, n_boot=n_boot)
        top = table.row("best")
        seeds = sorted((r for r in rows if r.is_seed and r is not top),
                       key=lambda r: (PAPER_SHAPES.index(r.seed_name) if r.seed_name in PAPER_SHAPES else 99, r.name))
        table.vs_seeds = [SeedComparison(r.seed_name, compare(top, r, n_boot=n_boot),
                                         compare(top, r, accuracy=True, n_boot=n_boot)) for r in seeds]
        _holm_families(table)
    _method_notes(table)
    return table


def _holm_families(table: ResultTable) -> None:
    """Holm over each family of claims the table makes: the best against every seeded shape (metric, and
    accuracy), and every row against the best seed."""
    for attr, out in (("metric", "metric_holm"), ("accuracy", "accuracy_holm")):
        adjusted = holm_adjusted([_p(getattr(c, attr)) for c in table.vs_seeds])
        for c, a in zip(table.vs_seeds, adjusted):
            setattr(c, out, a)
    compared = [r for r in table.rows if r.vs_best_seed is not None]
    for r, a in zip(compared, holm_adjusted([_p(r.vs_best_seed) for r in compared])):
        r.vs_best_seed_holm = a
    if len(table.vs_seeds) > 1:
        table.notes.append(f"the best is compared with {len(table.vs_seeds)} seeded shapes: verdicts use p-values "
                           f"Holm-adjusted over those {len(table.vs_seeds)} comparisons (family-wise 5%); each "
                           "interval shown is a 95% interval on its own")


def _p(paired: Paired | None) -> float:
    return paired.p_value if paired is not None else math.nan


def compare(a: ResultRow, b: ResultRow, *, accuracy: bool = False, n_boot: int = 2000) -> Paired | None:
    """a - b paired on the same test examples and seeds; per-seed means when per-example scores are missing."""
    ea, eb = (a.correct, b.correct) if accuracy else (a.examples, b.examples)
    if ea and eb:
        res = paired_examples(ea, eb, n_boot=n_boot)
        if res is not None:
            return res
    sa, sb = (a.accuracy, b.accuracy) if accuracy else (a.scores, b.scores)
    return paired_comparison(sa, sb, n_boot=n_boot)


def _selection_notes(data: StudyData, table: ResultTable, best: FinalistRecord | None) -> None:
    """Say in words wherever something was chosen on the test split."""
    if table.selected_on == "test":
        table.notes.append("some finalists recorded no validation score, so the best was chosen on the test split: "
                           "its test score is then optimistic (selected and measured on the same examples)")
    chosen_by = str((data.best or {}).get("chosen_by") or "")
    if data.best and "test" in chosen_by.lower() and "validation" not in chosen_by.lower():
        exported = data.exported_finalist()
        differs = exported is not None and best is not None and exported.number != best.number
        table.notes.append(f"best_allocation.json was chosen on the test split ({chosen_by}): choosing on test "
                           "makes that allocation's test score optimistic; this table chooses by mean validation "
                           f"`{data.metric}` instead"
                           + (f", which picks {best.name}, not the exported {exported.name}" if differs else
                              ", which picks the same allocation" if exported is not None and best is not None
                              else ""))


def _method_notes(table: ResultTable) -> None:
    comps = [r.vs_best_seed for r in table.rows if r.vs_best_seed is not None]
    comps += [c.metric for c in table.vs_seeds if c.metric is not None]
    if not comps:
        return
    per_seed = [c for c in comps if c.method == PER_SEED]
    if not per_seed:
        n_ex, k = min(c.n_examples for c in comps), min(c.n for c in comps)
        table.notes.append(f"Δ pairs the same test examples (at least {n_ex}) and training seeds; CIs and p-values "
                           "come from a bootstrap that resamples both examples and seeds"
                           + (f"; with {k} seed{'s' if k > 1 else ''} the seed part has only "
                              f"{math.comb(2 * k - 1, k)} distinct draws, so the intervals can understate "
                              "seed-to-seed variation (more --finalist-seeds narrow them honestly)" if k <= 5 else ""))
        return
    table.notes.append(f"no per-example test scores of `{table.metric_name}` (f1 and mcc are not per-example "
                       "scores, and studies written before this version did not record them): comparisons pair "
                       "per-seed means only")
    k = max(c.n for c in per_seed)
    if k < 2:
        table.notes.append("one training seed per finalist: no spread, no test; retrain with --finalist-seeds >= 3")
    elif k <= 5:
        distinct = math.comb(2 * k - 1, k)
        table.notes.append(f"n = {k} paired seeds: the paired t-test has {k - 1} degree(s) of freedom and the "
                           f"bootstrap only {distinct} distinct resamples, so p-values and CIs are rough; "
                           "a difference smaller than the seed-to-seed spread is not evidence")


def _majority(finalists: Sequence[FinalistRecord]) -> float | None:
    values = {round(float(m["test"]["majority_baseline"]), 6) for f in finalists for m in f.metrics.values()
              if (m.get("test") or {}).get("majority_baseline") is not None}
    return values.pop() if len(values) == 1 else None  # one test sample for every finalist, else no reference


def _check_against_majority(table: ResultTable, n_boot: int = 2000) -> None:
    """"Above the majority class" is a claim like any other: a row makes it only when its test accuracy's
    interval, Holm-adjusted over the rows, excludes the majority rate (accuracy minus that rate, bootstrapped over
    test examples x seeds; per-seed accuracies when the run kept no per-example scores). A fine-tune not shown
    to beat always answering the majority label may not have learned the task: ranking such runs ranks noise."""
    if table.majority is None:
        return
    p0 = table.majority
    for r in table.rows:
        if r.correct:
            r.vs_majority = paired_examples(r.correct, {s: {i: p0 for i in ids} for s, ids in r.correct.items()},
                                            n_boot=n_boot)
        elif r.accuracy:
            r.vs_majority = paired_comparison(r.accuracy, {s: p0 for s in r.accuracy}, n_boot=n_boot)
    adjusted = holm_adjusted([_p(r.vs_majority) for r in table.rows])
    for r, a in zip(table.rows, adjusted):
        if r.vs_majority is not None:
            r.majority_claim = ("above" if a <= FAMILY_ALPHA and r.vs_majority.mean_diff > 0 else
                                "below" if a <= FAMILY_ALPHA else "not distinguishable")
    above = [r for r in table.rows if r.majority_claim == "above"]
    how = (f"majority class {p0:.4f} on the same test examples; test accuracy's bootstrap interval over examples "
           f"x seeds, Holm over the {len(table.rows)} finalists")
    if table.nothing_learned:
        table.notes.append(f"no finalist is shown to beat the majority class ({how}): at this fidelity the fine-tunes "
                           "may not have learned the task, so this table may rank seed noise; train trials on more "
                           "data (--max-train-examples, --epochs)")
    else:
        table.notes.append(f"{len(above)} of {len(table.rows)} finalists are shown to beat the majority class ({how})"
                           + (": " + ", ".join(r.name for r in above) if above else ""))


def _from_trials(data: StudyData) -> ResultTable:
    """No finalists: the seeds' and the best searched trial's single validation scores."""
    done = data.completed(unique=True)
    rows = []
    for t in done:
        s = data.trial_seed(t)
        if t.is_seed:
            rows.append(ResultRow(t.seed_name, t.origin, t.number, t.allocation, {s: t.value}, {s: t.value}, None))
    searched = [t for t in done if not t.is_seed]
    if searched:
        t = max(searched, key=lambda t: t.value)
        s = data.trial_seed(t)
        rows.append(ResultRow(f"trial {t.number} ({t.origin})", t.origin, t.number, t.allocation, {s: t.value},
                              {s: t.value}, None))
    table = ResultTable(rows, f"validation `{data.metric}` of one search trial (no finalist retrained and scored "
                              "on the test split)", None,
                        ["no finalists: these are single search-fidelity validation scores, with no seeds to "
                         "pair and no test split; run finalists (--finalist-seeds 3) for the real comparison"],
                        metric_name=data.metric, on_test=False)
    by_value = {r.number: r for r in rows}

    def top(pool: list[ResultRow]) -> ResultRow | None:
        return max(pool, key=lambda r: (r.mean, -r.number)) if pool else None

    best, seed = top(rows), top([r for r in rows if r.is_seed])
    _mark(table, {"best": best, "best searched": top([r for r in rows if not r.is_seed]), "best seed": seed})
    if seed is not None:
        table.best_seed = seed.name
        for r in rows:
            if r is not seed:
                r.vs_best_seed = paired_comparison(r.scores, by_value[seed.number].scores)  # one pair: the difference
    return table


def _mark(table: ResultTable, chosen: Mapping[str, object]) -> None:
    """Give the roles to the chosen rows (by trial number) and order the rows by mean validation score."""
    roles: dict[int, list[str]] = {}
    for role, item in chosen.items():
        if item is not None:
            roles.setdefault(item.number, []).append(role)
    for r in table.rows:
        r.role = ", ".join(roles.get(r.number, []))
    table.rows.sort(key=lambda r: (-r.val_mean if r.val_mean == r.val_mean else math.inf, r.number))


def _mean(values: Mapping[int, float]) -> float:
    return statistics.fmean(values.values()) if values else math.nan


def _std(values: Mapping[int, float]) -> float:
    return statistics.stdev(values.values()) if len(values) > 1 else 0.0
