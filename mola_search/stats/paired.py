"""Paired comparisons of two allocations trained with the same seeds and scored on the same examples.

`paired_comparison` pairs per-seed scores (a paired t-test and a percentile bootstrap over seeds);
`paired_examples` pairs per-example scores of every seed (a two-way bootstrap that resamples seeds and
examples independently, so seed-to-seed and example-to-example variation both count). Both return a
`Paired`: the mean difference a - b, its interval and a two-sided p-value. A family of such
comparisons needs family-wise control before any one of them is called a finding (`stats.family`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

EXAMPLES_X_SEEDS = "bootstrap over test examples x training seeds"
PER_SEED = "per-seed paired t-test (no per-example scores)"


@dataclass
class Paired:
    """mean(a - b) over paired observations, a percentile bootstrap CI and a two-sided p-value."""

    n: int                        # common training seeds
    mean_diff: float
    lo: float
    hi: float
    p_value: float
    n_examples: int = 0           # common test examples (0: per-seed means only)
    method: str = PER_SEED

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def text(self, digits: int = 4) -> str:
        ci = f" [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]" if self.lo == self.lo else ""
        return f"{self.mean_diff:+.{digits}f}{ci}"


def paired_comparison(a: Mapping[int, float], b: Mapping[int, float], *, n_boot: int = 5000, level: float = 0.95,
                      seed: int = 0) -> Paired | None:
    """Compare per-seed scores `a` with `b` on the seeds both have: mean(a - b), bootstrap CI, paired t-test."""
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


def paired_examples(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]], *,
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Paired | None:
    """Compare per-example scores (train seed -> example id -> value) of `a` and `b`.

    Pairs on the seeds both have and the example ids every one of those runs has. The
    statistic is the mean of the seeds x examples difference matrix; each bootstrap
    resample draws seeds and examples independently, with replacement (a two-way
    bootstrap: seed-to-seed and example-to-example variation both count). p-value:
    two-sided, from how often the resampled mean falls on the other side of 0.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    ids = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    if not ids:
        return None
    order = sorted(ids)
    d = np.array([[a[s][i] - b[s][i] for i in order] for s in seeds], dtype=float)
    k, n = d.shape
    mean = float(d.mean())
    if np.ptp(d) == 0:
        return Paired(k, mean, mean, mean, math.nan, n, EXAMPLES_X_SEEDS)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(n, k))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        w = rng.multinomial(k, np.full(k, 1.0 / k), size=m)       # how often each seed is drawn
        v = rng.multinomial(n, np.full(n, 1.0 / n), size=m)       # how often each example is drawn
        boots[start:start + m] = np.einsum("bs,si,bi->b", w, d, v) / (k * n)
    tail = 100 * (1 - level) / 2
    below, above = int((boots <= 0).sum()), int((boots >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (n_boot + 1))
    return Paired(k, mean, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail)), p, n,
                  EXAMPLES_X_SEEDS)
