"""The noise floor: can a search at this fidelity tell allocations apart at all?

Before the search, a pilot trains a few fixed allocations (the paper's shapes) with a
few training seeds each, at the fidelity the search trials get. `estimate_noise`
splits the spread of those scores into an allocation part, a seed part and the rest,
and says how large a difference between two search trials is just noise.

Model (two-way ANOVA without replication, the seed as a blocking factor)::

    y[i, j] = mu + alpha_i + beta_j + e[i, j],     i = 1..a allocations, j = 1..b seeds

``alpha_i`` are the (fixed) allocation effects, ``beta_j`` the seed effects (one seed
means one training subset and order, whatever the allocation: shared by every
allocation trained with it), ``e ~ N(0, var_E)`` the allocation x seed residual.
With MS_A, MS_S, MS_E the mean squares on a-1, b-1, (a-1)(b-1) degrees of freedom,
the expected-mean-squares estimates are::

    var_A = max(0, (MS_A - MS_E) / b)     # estimates sum_i (alpha_i - mean alpha)^2 / (a - 1)
    var_S = max(0, (MS_S - MS_E) / a)
    var_E = MS_E

    allocation_share = var_A / (var_A + var_E)
    seed_share       = var_S / (var_A + var_S + var_E)
    min_detectable_difference = z_{(1+level)/2} * sqrt(2 * var_E)

Search trials all train with the same seed, so they are compared *seed-paired*: the
seed effect cancels and only var_E blurs a comparison. That is why the share that
matters is var_A / (var_A + var_E), and why two trials whose scores differ by less
than `min_detectable_difference` cannot be told apart at this fidelity.

Interval for the share. The pilot's allocations are fixed, named shapes, so
F = MS_A / MS_E follows a *noncentral* F(a-1, (a-1)(b-1)) distribution with
noncentrality lambda = b (a-1) theta, theta = var_A / var_E. The equal-tailed interval
inverts it in lambda (exact under normal residuals; scipy.stats.ncf)::

    ncf.cdf(F; a-1, (a-1)(b-1), lambda_low)  = (1 + level) / 2    (lambda_low = 0 if impossible)
    ncf.cdf(F; a-1, (a-1)(b-1), lambda_high) = (1 - level) / 2    (lambda_high = 0 if impossible)
    share_ci = [theta_low / (1 + theta_low), theta_high / (1 + theta_high)]

(The random-effects interval, F / (1 + b theta) ~ F(a-1, (a-1)(b-1)), treats the
allocations as a random sample from a population; for a fixed set of shapes it covers
far more often than `level`, e.g. 99% instead of 95%.)

``can_separate`` is ``share_ci[0] > 0``, i.e. the F-test rejects "no allocation effect"
at p < (1 - level) / 2 (the lower tail of the same two-sided interval), so the verdict
and the printed interval never disagree.

Call order: pilot scores -> `estimate_noise` -> `NoiseFloor.to_dict` (the study folder keeps it as
noise.json with the auto-fidelity rounds: `mola_search.search.study.StudyFolder.write_noise`) ->
`NoiseFloor.from_dict` when a report reads it back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import optimize, stats

from mola_search.errors import UserError

DEFAULT_METRIC = "gold_logprob"
_MAX_EXACT_SUBSETS = 12  # allocations; above this the complete sub-table is found greedily
_FLOAT_FIELDS = ("allocation_share", "seed_share", "allocation_var", "seed_var", "residual_var",
                 "f_statistic", "p_value", "min_detectable_difference")


@dataclass(frozen=True)
class NoiseFloor:
    """The noise-floor estimate of one pilot (see the module docstring for the formulas).

    Numbers are NaN when the pilot had fewer than 2 allocations x 2 seeds of usable scores.
    `scores` holds the complete sub-table that was analysed; `notes` say what was dropped.
    """

    metric: str
    fidelity: dict[str, Any] | None
    allocations: tuple[str, ...]
    seeds: tuple[int, ...]
    scores: dict[str, dict[int, float]]
    allocation_share: float
    share_ci: tuple[float, float]
    level: float
    seed_share: float
    allocation_var: float
    seed_var: float
    residual_var: float
    f_statistic: float
    p_value: float
    min_detectable_difference: float
    can_separate: bool
    notes: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """One sentence for logs and reports: how much of the score variance is the allocation."""
        a, b = len(self.allocations), len(self.seeds)
        if math.isnan(self.allocation_share):
            why = "; ".join(self.notes) or "not enough scores"
            return (f"noise floor: not estimated ({why}); the search runs without knowing whether "
                    f"it can separate allocations at this fidelity")
        low, high = self.share_ci
        verdict = "can" if self.can_separate else "cannot"
        # An upper bound of 0 is no certainty that the share is 0: the allocations' means agree more closely than
        # seed noise alone would make them, and the inverted F test has no larger share left to admit.
        degenerate = ": the allocations agree more closely than seed noise alone would make them" if high <= 0 else ""
        return (f"noise floor: allocations explain {_pct(self.allocation_share)} of score variance "
                f"({_pct(self.level)} CI {_pct(low, sign=False)}-{_pct(high)}{degenerate}) "
                f"over {a} allocations x {b} seeds, seed-paired residual sd {math.sqrt(self.residual_var):.2g} {self.metric} "
                f"(differences below {self.min_detectable_difference:.2g} are noise); "
                f"at this fidelity the search {verdict} separate them")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: inner score keys become str(seed); NaN and inf become null."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "fidelity": self.fidelity,
            "allocations": list(self.allocations),
            "seeds": list(self.seeds),
            "scores": {name: {str(seed): value for seed, value in row.items()} for name, row in self.scores.items()},
            "share_ci": [_json_float(v) for v in self.share_ci],
            "level": self.level,
            "can_separate": self.can_separate,
            "line": self.line(),
            "notes": list(self.notes),
        }
        out.update({key: _json_float(getattr(self, key)) for key in _FLOAT_FIELDS})
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> "NoiseFloor":
        """Inverse of `to_dict` (extra keys such as "line" and "rounds" are ignored)."""
        if not isinstance(raw, Mapping):
            raise UserError(f"noise estimate is a {type(raw).__name__}: expected a JSON object with the keys "
                            f"of NoiseFloor.to_dict()")
        missing = [f.name for f in fields(cls) if f.name not in raw and f.name != "notes"]
        if missing:
            raise UserError(f"noise estimate lacks {', '.join(missing)}: expected the keys of NoiseFloor.to_dict()")
        try:
            values = {key: _read_float(raw[key]) for key in _FLOAT_FIELDS}
            if (values["f_statistic"] != values["f_statistic"] and values["residual_var"] == 0
                    and values["allocation_var"] > 0):
                values["f_statistic"] = math.inf  # written as null; zero residual and a real effect means F = inf
            low, high = raw["share_ci"]
            return cls(
                metric=str(raw["metric"]),
                fidelity=dict(raw["fidelity"]) if raw["fidelity"] is not None else None,
                allocations=tuple(str(a) for a in raw["allocations"]),
                seeds=tuple(int(s) for s in raw["seeds"]),
                scores={str(name): {int(seed): float(v) for seed, v in row.items()}
                        for name, row in raw["scores"].items()},
                share_ci=(_read_float(low), _read_float(high)),
                level=float(raw["level"]),
                can_separate=bool(raw["can_separate"]),
                notes=tuple(str(n) for n in raw.get("notes", ())),
                **values,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"noise estimate has a malformed value ({exc}): expected the types of "
                            f"NoiseFloor.to_dict()") from None


def estimate_noise(scores: Mapping[str, Mapping[int, float]], *, metric: str = DEFAULT_METRIC,
                   level: float = 0.95, fidelity: dict[str, Any] | None = None) -> NoiseFloor:
    """Variance components of pilot scores ``scores[allocation][seed]`` (higher is better or not: no matter).

    Missing or non-finite cells (a failed pilot run) are handled by analysing the largest
    complete allocation x seed sub-table (ties keep more allocations, i.e. seeds are
    dropped first); what was dropped goes to `notes`. With fewer than 2 allocations or
    2 seeds left the numbers are NaN and ``can_separate`` is False; this never raises for
    that. Malformed input (non-integer seeds, a level outside (0, 1)) raises UserError.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise UserError(f"level is {level!r}: use a confidence level in (0, 1), e.g. 0.95")
    if not isinstance(scores, Mapping):
        raise UserError(f"scores is a {type(scores).__name__}: use a mapping allocation -> {{seed: score}}")
    table, notes = _clean(scores)
    names, seeds, kept_notes = _complete_subtable(table)
    notes += kept_notes
    base = dict(metric=metric, fidelity=dict(fidelity) if fidelity is not None else None, level=float(level))
    kept = {n: {s: table[n][s] for s in seeds} for n in names}
    if len(names) < 2 or len(seeds) < 2:
        notes.append(f"need >= 2 allocations x 2 seeds with scores, have {len(names)} x {len(seeds)}")
        return _not_estimated(names, seeds, kept, notes, base)

    v = _anova(np.array([[table[n][s] for s in seeds] for n in names], dtype=float))
    z = float(stats.norm.ppf((1 + level) / 2))
    f_stat, p_value, share, share_ci = _allocation_test(v, level, notes)
    total = v.var_a + v.var_s + v.var_e
    return NoiseFloor(
        allocations=tuple(names), seeds=tuple(seeds), scores=kept,
        allocation_share=share, share_ci=share_ci, seed_share=v.var_s / total if total > 0 else math.nan,
        allocation_var=v.var_a, seed_var=v.var_s, residual_var=v.var_e, f_statistic=f_stat, p_value=p_value,
        min_detectable_difference=z * math.sqrt(2 * v.var_e), can_separate=bool(share_ci[0] > 0),
        notes=tuple(notes), **base)


# ------------------------------------------------------------------------------------------ internals


@dataclass(frozen=True)
class _Anova:
    """Two-way ANOVA without replication of a complete a x b table (allocations x seeds): the mean squares
    MS_A, MS_E and the variance components var_A, var_S, var_E of the module docstring."""

    b: int  # seeds
    df_a: int  # a - 1
    df_e: int  # (a - 1)(b - 1)
    ms_a: float
    ms_e: float
    var_a: float
    var_s: float
    var_e: float


def _anova(y: np.ndarray) -> _Anova:
    """Sums of squares of y[i, j] = mu + alpha_i + beta_j + e[i, j], and the expected-mean-squares estimates."""
    a, b = y.shape
    df_a, df_s, df_e = a - 1, b - 1, (a - 1) * (b - 1)
    centred = y - y.mean()
    rows, cols = centred.mean(axis=1), centred.mean(axis=0)
    residual = centred - rows[:, None] - cols[None, :]
    ss_a, ss_s, ss_e = b * float(rows @ rows), a * float(cols @ cols), float((residual ** 2).sum())
    ss_total = float((centred ** 2).sum())
    # Sums of squares at rounding level (relative 1e-24, i.e. sd ratios of 1e-12) are exact zeros:
    # an additive table or identical rows must not become F = 1e17 or a share of 100%.
    ss_a, ss_s, ss_e = (0.0 if ss <= 1e-24 * ss_total else ss for ss in (ss_a, ss_s, ss_e))
    ms_a, ms_s, ms_e = ss_a / df_a, ss_s / df_s, ss_e / df_e
    return _Anova(b=b, df_a=df_a, df_e=df_e, ms_a=ms_a, ms_e=ms_e, var_a=max(0.0, (ms_a - ms_e) / b),
                  var_s=max(0.0, (ms_s - ms_e) / a), var_e=ms_e)


def _allocation_test(v: _Anova, level: float, notes: list[str]) -> tuple[float, float, float, tuple[float, float]]:
    """(F, p-value, allocation share, share interval). A zero residual (MS_E = 0) has no F distribution:
    the answer is then certain (a real effect, or nothing to separate) and a note says which."""
    if v.ms_e > 0:
        f_stat = v.ms_a / v.ms_e
        p_value = float(stats.f.sf(f_stat, v.df_a, v.df_e))
        theta_low, theta_high = _theta_interval(f_stat, v.df_a, v.df_e, v.b, level)
        share_ci = (_share_of_theta(theta_low), _share_of_theta(theta_high))
        return f_stat, p_value, v.var_a / (v.var_a + v.var_e), share_ci
    if v.ms_a > 0:
        notes.append("residual variance is exactly zero: scores are additive in allocation and seed, "
                     "every allocation difference is real")
        return math.inf, 0.0, 1.0, (1.0, 1.0)
    notes.append("residual and allocation variance are both exactly zero: every allocation scored "
                 "the same at each seed, there is nothing to separate")
    return math.nan, 1.0, math.nan, (math.nan, math.nan)


def _not_estimated(names: list[str], seeds: list[int], kept: dict[str, dict[int, float]], notes: list[str],
                   base: dict[str, Any]) -> NoiseFloor:
    """The NoiseFloor of a table too small to analyse (< 2 allocations or < 2 seeds): NaN numbers, no verdict."""
    nan = math.nan
    return NoiseFloor(allocations=tuple(names), seeds=tuple(seeds), scores=kept, allocation_share=nan,
                      share_ci=(nan, nan), seed_share=nan, allocation_var=nan, seed_var=nan, residual_var=nan,
                      f_statistic=nan, p_value=nan, min_detectable_difference=nan, can_separate=False,
                      notes=tuple(notes), **base)


def _theta_interval(f_stat: float, df_a: int, df_e: int, b: int, level: float) -> tuple[float, float]:
    """Equal-tailed interval for theta = var_A / var_E by inverting the noncentral F in lambda = b df_a theta."""
    def cdf(lam: float) -> float:
        return float(stats.ncf.cdf(f_stat, df_a, df_e, lam)) if lam > 0 else float(stats.f.cdf(f_stat, df_a, df_e))

    def solve(target: float) -> float:  # cdf falls from cdf(0) towards 0 as lambda grows
        if cdf(0.0) <= target:
            return 0.0
        high = max(1.0, 2.0 * df_a * f_stat)
        while cdf(high) > target:
            high *= 2.0
            if high > 1e12:
                return math.inf
        return float(optimize.brentq(lambda lam: cdf(lam) - target, 0.0, high, xtol=1e-10, rtol=1e-10))

    scale = b * df_a
    return solve((1 + level) / 2) / scale, solve((1 - level) / 2) / scale


def _share_of_theta(theta: float) -> float:
    return 1.0 if math.isinf(theta) else theta / (1 + theta)


def _clean(scores: Mapping[str, Mapping[int, float]]) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Finite scores only, seeds as ints; non-finite cells are noted and treated as missing."""
    table: dict[str, dict[int, float]] = {}
    notes: list[str] = []
    for name, row in scores.items():
        if not isinstance(row, Mapping):
            raise UserError(f"scores['{name}'] is a {type(row).__name__}: use a mapping seed -> score")
        clean: dict[int, float] = {}
        for seed, value in row.items():
            try:
                key = int(seed)
            except (TypeError, ValueError):
                raise UserError(f"seed {seed!r} of allocation '{name}' is not an integer: use training seeds "
                                f"such as 0, 1, 2") from None
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise UserError(f"score of '{name}' at seed {key} is {value!r}: use a number (NaN for a failed run)")
            if math.isfinite(value):
                clean[key] = float(value)
            else:
                notes.append(f"'{name}' seed {key} scored {value}: treated as missing")
        table[str(name)] = clean
    return table, notes


def _complete_subtable(table: dict[str, dict[int, float]]) -> tuple[list[str], list[int], list[str]]:
    """The largest complete allocation x seed sub-table (a*b, ties: more allocations), with notes on drops."""
    names = list(table)
    all_seeds = sorted(set().union(*(set(row) for row in table.values()))) if table else []

    def seeds_of(group: Sequence[str]) -> list[int]:
        return sorted(set.intersection(*(set(table[n]) for n in group))) if group else []

    best: tuple[int, int, list[str], list[int]] = (-1, -1, [], [])
    if len(names) <= _MAX_EXACT_SUBSETS:
        candidates: Any = (list(group) for size in range(len(names), 0, -1)
                           for group in itertools.combinations(names, size))
    else:  # drop the allocation with the fewest scores until the rest share >= 2 seeds
        group = sorted(names, key=lambda n: -len(table[n]))
        candidates = (group[:k] for k in range(len(group), 0, -1))
    for group in candidates:
        common = seeds_of(group)
        usable = len(group) >= 2 and len(common) >= 2
        key = (int(usable) * len(group) * len(common), len(group))
        if key > best[:2]:
            best = (key[0], key[1], group, common)
    _, _, kept, seeds = best
    if best[0] == 0:  # no usable table: report every allocation, their common seeds
        kept, seeds = names, seeds_of(names)
    notes = []
    dropped_seeds = [s for s in all_seeds if s not in seeds]
    dropped_names = [n for n in names if n not in kept]
    if dropped_seeds and best[0] > 0:
        notes.append(f"dropped seed(s) {', '.join(map(str, dropped_seeds))}: not scored for every allocation")
    if dropped_names and best[0] > 0:
        notes.append(f"dropped allocation(s) {', '.join(dropped_names)}: missing scores at the kept seeds")
    return kept, seeds, notes


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _read_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _pct(value: float, sign: bool = True) -> str:
    text = f"{100 * value:.0f}"
    return f"{text}%" if sign else text
