"""Deciding between contenders trained on shared seeds: who is worse, who wins, which are equivalent.

Data. ``scores[c][s]``: the validation score of contender c trained with seed s. A race gives every live
contender the same seeds (one round = one fresh seed for all), so the table is complete and every
comparison is paired by seed.

Model (two-way, the seed as a block, as for the noise floor)::

    y[c, s] = mu + a_c + b_s + e[c, s],   e ~ N(0, var_E),   m contenders x n seeds

var_E is estimated by the residual mean square MSE on df = (m - 1)(n - 1) degrees of freedom (pooled over
all pairs, so four contenders and three seeds give 6 df where one pair alone has 2). The difference of two
contenders' means has standard error SE = sqrt(2 MSE / n) and (ybar_a - ybar_b - true) / SE ~ t(df).

One look, at level alpha_k:

* **superiority**: every pair is tested two-sided; Holm over the m(m-1)/2 pairs controls the probability
  of any false claim "a > b" (directional errors included) at alpha_k;
* **dropping**: a contender is dropped when the leader (highest mean) beats it in that family;
* **winner**: the leader beats every other live contender (then all the others are dropped);
* **equivalent**: every live contender is within +-delta of the leader by a two one-sided test (TOST):
  p = max(P(t <= (d - delta)/SE), P(t >= (d + delta)/SE)) with d = ybar_leader - ybar_c; the leader is
  equivalent to all when every p <= alpha_k (an intersection-union test: no multiplicity adjustment is
  needed for "all of them").

Across looks. The race looks after every round, and each look spends part of the error budget: once R_k of
the race's R_max fine-tunes are spent, alpha * (R_k / R_max) ** SPENDING_POWER may have been spent in all
(`spent_by`), so a look spends the increase since the last one: little at the first looks (a clear loser
still drops: a large difference passes a small level), most towards the end. By the union bound, the
probability of any false superiority claim (a false drop or a false winner) over the whole race is at most
alpha whatever the stopping, and so is that of a false equivalence claim. Runs that were never spent (a race
that stops early) leave their alpha unused: the bound is conservative.

`seeds_to_decide` says how many seeds per contender would likely settle an undecided race, from the
observed residual variance: the n at which a test at the given level has 80% power for the observed gap
(winner) or for the room between the observed gap and delta (equivalence).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scipy import stats

from mola_search.stats.family import holm

WINNER, EQUIVALENT, UNDECIDED = "winner", "equivalent", "undecided"
DECISIONS = (WINNER, EQUIVALENT, UNDECIDED)


@dataclass(frozen=True)
class Pair:
    """ybar_a - ybar_b over the shared seeds, its standard error, the t statistic and two-sided p."""

    a: str
    b: str
    diff: float
    se: float
    df: int
    p: float


@dataclass
class Look:
    """What one look at the table decided."""

    alpha: float
    seeds: tuple[int, ...]
    means: dict[str, float]
    mse: float
    df: int
    leader: str
    pairs: list[Pair] = field(default_factory=list)
    beaten: list[tuple[str, str]] = field(default_factory=list)   # (better, worse), Holm-rejected at alpha
    dropped: list[str] = field(default_factory=list)               # worse than the leader
    tost: dict[str, float] = field(default_factory=dict)          # contender -> TOST p against the leader
    decision: str = UNDECIDED

    @property
    def se(self) -> float:
        """The standard error of a difference of two contenders' means."""
        n = len(self.seeds)
        return math.sqrt(2 * self.mse / n) if n and self.mse == self.mse else math.nan


def two_way(scores: Mapping[str, Mapping[int, float]], seeds: Sequence[int]) -> tuple[dict[str, float], float, int]:
    """Contender means over `seeds`, and the residual mean square of the contender x seed table with its df."""
    names = list(scores)
    m, n = len(names), len(seeds)
    means = {c: math.fsum(scores[c][s] for s in seeds) / n for c in names}
    df = (m - 1) * (n - 1)
    if df <= 0:
        return means, math.nan, 0
    grand = math.fsum(means.values()) / m
    seed_means = {s: math.fsum(scores[c][s] for c in names) / m for s in seeds}
    ss = math.fsum((scores[c][s] - means[c] - seed_means[s] + grand) ** 2 for c in names for s in seeds)
    return means, ss / df, df


def pairwise(means: Mapping[str, float], mse: float, df: int, n: int) -> list[Pair]:
    """Every pair (a, b) with a before b in `means`' order: the t test of a - b on the pooled residual."""
    names = list(means)
    se = math.sqrt(2 * mse / n) if df > 0 and mse == mse else math.nan
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = means[a] - means[b]
            if se > 0:
                p = float(2 * stats.t.sf(abs(diff) / se, df))
            elif se == 0:  # no residual noise at all: any difference is real, none is a tie
                p = 0.0 if diff != 0 else 1.0
            else:
                p = math.nan
            out.append(Pair(a, b, diff, se, df, p))
    return out


def tost_p(diff: float, se: float, df: int, delta: float) -> float:
    """The TOST p-value of |true difference| < delta given an observed `diff` with standard error `se`."""
    if not se == se or df <= 0:
        return math.nan
    if se == 0:
        return 0.0 if abs(diff) < delta else 1.0
    lower = stats.t.sf((diff + delta) / se, df)   # H0: true <= -delta
    upper = stats.t.cdf((diff - delta) / se, df)  # H0: true >= +delta
    return float(max(lower, upper))


def look(scores: Mapping[str, Mapping[int, float]], seeds: Sequence[int], *, alpha: float, delta: float) -> Look:
    """One look at the live contenders' table (every contender scored at every seed of `seeds`)."""
    means, mse, df = two_way(scores, seeds)
    leader = max(means, key=lambda c: (means[c], c))
    result = Look(alpha, tuple(seeds), means, mse, df, leader)
    if len(means) < 2 or df <= 0:
        return result
    result.pairs = pairwise(means, mse, df, len(seeds))
    for pair, rejected in zip(result.pairs, holm([p.p for p in result.pairs], alpha)):
        if rejected:
            result.beaten.append((pair.a, pair.b) if pair.diff > 0 else (pair.b, pair.a))
    result.dropped = sorted(worse for better, worse in result.beaten if better == leader)
    others = [c for c in means if c != leader]
    result.tost = {c: tost_p(means[leader] - means[c], result.se, df, delta) for c in others}
    if set(result.dropped) == set(others):
        result.decision = WINNER
    elif all(p == p and p <= alpha for p in result.tost.values()):
        result.decision = EQUIVALENT
    return result


SPENDING_POWER = 3.0  # docs/strategies.md: at MRPC's noise, 3 decided 82% of 2-delta races of 40 runs, 2 only 74%


def spent_by(runs: int, max_runs: int, power: float | None = None) -> float:
    """The share of a race's error budget spent once `runs` of its `max_runs` fine-tunes are spent:
    (runs / max_runs) ** power, capped at 1. Power 1 spends evenly per fine-tune; power 2 keeps little for the
    first looks (a clear loser still drops: a large difference passes a small level) and most for the end."""
    if max_runs <= 0:
        return 1.0
    return min(1.0, max(0.0, runs / max_runs)) ** (SPENDING_POWER if power is None else power)


def spend(alpha: float, runs: int, max_runs: int) -> float:
    """The error budget a look after `runs` more fine-tunes may spend under even spending: alpha * runs / max_runs."""
    return alpha * runs / max_runs if max_runs > 0 else 0.0


def seeds_to_decide(mse: float, gap: float, delta: float, alpha: float, power: float = 0.8) -> dict[str, float]:
    """Seeds per contender at which a test at level `alpha` would have `power` to show a winner for a true
    difference of `gap`, and equivalence within `delta` when the true difference is `gap` (< delta).
    Normal approximation to the t test; inf where it cannot be shown (a gap of 0 for a winner, a gap of
    delta or more for equivalence)."""
    z_b = stats.norm.ppf(power)
    out = {WINNER: math.inf, EQUIVALENT: math.inf}
    if not mse == mse or mse < 0:
        return out
    if abs(gap) > 0:
        out[WINNER] = 2 * mse * (stats.norm.ppf(1 - alpha / 2) + z_b) ** 2 / gap ** 2
    if abs(gap) < delta:
        out[EQUIVALENT] = 2 * mse * (stats.norm.ppf(1 - alpha) + z_b) ** 2 / (delta - abs(gap)) ** 2
    return out
