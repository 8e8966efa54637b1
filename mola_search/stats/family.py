"""Family-wise control: Holm's step-down procedure and Bonferroni-adjusted intervals.

A family of claims (the best against every seeded shape, four blocks in two directions, every contender of
a race against the others) is controlled when the probability that *any* claim of it is false is at most
`alpha`. Holm (1979) does that for any dependence between the tests, and rejects at least what
Bonferroni rejects: sort the p-values, reject the i-th smallest (0-based) while p_(i) <= alpha / (m - i).
"""

from __future__ import annotations

from collections.abc import Sequence


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's procedure rejects at family-wise level `alpha` (in the input order). A NaN
    p-value (no test possible) is never rejected and does not count towards the family size."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    m = len(order)
    reject = [False] * len(p_values)
    for rank, (p, i) in enumerate(order):
        if p > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values: hypothesis i is rejected at family-wise level a exactly when its adjusted
    p-value is <= a. NaN stays NaN."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    m = len(order)
    out = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def bonferroni_level(level: float, family: int) -> float:
    """The per-interval confidence level that makes `family` intervals hold together with probability at
    least `level` (Bonferroni): 1 - (1 - level) / family."""
    return 1.0 - (1.0 - level) / max(1, family)
