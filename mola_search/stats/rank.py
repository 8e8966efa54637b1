"""Rank agreement between two scorings of the same allocations.

`kendall_tau`: Kendall's tau-b with a percentile bootstrap interval over the pairs (how far one ranking,
e.g. a one-shot supernet's, agrees with another, e.g. standalone training). `rank_agreement`: Spearman's
rho between per-layer weights and an allocation's expert counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_PAIRS = 4  # fewer allocations than this cannot give a tau interval worth stating


def kendall_tau(x: Sequence[float], y: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                seed: int = 0) -> dict[str, float]:
    """Kendall's tau-b of paired scores, with a percentile bootstrap interval over the pairs.

    Returns {"tau", "low", "high", "n"}; tau is NaN below 2 pairs or when either side is constant, and
    the interval is NaN below `MIN_PAIRS` pairs. Resamples whose tau is undefined (all tied) are skipped.
    """
    import numpy as np
    from scipy.stats import kendalltau

    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a == a and b == b]
    n = len(pairs)
    out = {"tau": math.nan, "low": math.nan, "high": math.nan, "n": n, "level": level}
    if n < 2:
        return out
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    out["tau"] = float(kendalltau(xs, ys).statistic)
    if n < MIN_PAIRS:
        return out
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if len(set(xs[idx])) < 2 or len(set(ys[idx])) < 2:
            continue
        t = kendalltau(xs[idx], ys[idx]).statistic
        if t == t:
            taus.append(t)
    if taus:
        alpha = (1 - level) / 2
        out["low"], out["high"] = float(np.quantile(taus, alpha)), float(np.quantile(taus, 1 - alpha))
    return out


def rank_agreement(weights: Sequence[float], experts: Sequence[int]) -> float:
    """Spearman's rho between a signal's per-layer weights and an allocation's expert counts
    (NaN when either is constant)."""
    from scipy.stats import spearmanr

    if len(set(weights)) < 2 or len(set(experts)) < 2:
        return float("nan")
    return float(spearmanr(list(weights), list(experts)).statistic)
