"""Turn real-valued per-layer weights into integer expert counts with an exact total.

The search space encodes an allocation as a point on the simplex and every such
point must decode to a *feasible* allocation, so rounding has to hit the budget
exactly, honour the per-layer bounds and never depend on float noise. The
arithmetic is therefore done in `fractions.Fraction`: a float weight is exact in
binary, and so is every step after it.

Two stages:
1. Water-filling: find the level `lam` with sum(clip(lam * w_j, lo_j, hi_j)) == budget.
   The left side is piecewise linear and non-decreasing in `lam`, so the level is
   found exactly by walking its breakpoints.
2. Largest remainder: floor every real target, then hand the missing units to the
   largest fractional parts. A layer with a fractional part lies strictly below its
   upper bound, so the extra unit never breaks a bound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

from mola_search.errors import UserError

Bound = int | Sequence[int]


def round_to_budget(
    weights: Sequence[float],
    budget: int,
    min_count: Bound = 1,
    max_count: Bound | None = None,
    *,
    priority: Sequence[float] | None = None,
) -> list[int]:
    """Integer counts proportional to `weights`, summing exactly to `budget`, within [min, max].

    Bounds are a scalar (same for every layer) or one value per layer; `max_count=None`
    means unbounded above. All-zero weights give an allocation as even as possible.
    If the layers with positive weight are all at their maximum and budget is still
    left, the rest is spread evenly over the zero-weight layers: a zero weight means
    "no preference", not "forbidden".

    Equal fractional parts are settled by the higher `priority` (when given), then by
    the lower layer index, so the result is a pure function of the inputs. Callers
    that round a shaped profile pass its trend as `priority` to keep the shape.
    """
    num_layers = len(weights)
    if num_layers == 0:
        raise UserError("cannot allocate experts over zero layers: pass at least one weight")
    exact_weights = [_exact_weight(w, j) for j, w in enumerate(weights)]
    if as_count(budget) is None:
        raise UserError(f"budget must be an integer number of experts, got {budget!r}")
    budget = int(budget)
    lows = expand_bound(min_count, num_layers, "min_count")
    highs = None if max_count is None else expand_bound(max_count, num_layers, "max_count")
    _check_bounds(lows, highs)
    _check_feasible(budget, lows, highs, min_count, max_count)
    ranks = _priorities(priority, num_layers)

    targets = _real_targets(exact_weights, budget, lows, highs)
    return _largest_remainder(targets, budget, ranks)


def _exact_weight(weight: float, layer: int) -> Fraction:
    # numbers.Real admits numpy scalars too: weight vectors often come out of numpy.
    valid = isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight)
    if not valid or weight < 0:
        raise UserError(f"weight {layer} is {weight!r}: weights must be non-negative finite numbers")
    return Fraction(weight)


def as_count(value: object) -> int | None:
    """`value` as a plain int if it is an integer (numpy integers included, bools not), else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def expand_bound(bound: Bound, num_layers: int, name: str) -> list[int]:
    """One validated bound per layer from a scalar or a per-layer sequence."""
    if as_count(bound) is not None:
        values = [bound] * num_layers
    elif isinstance(bound, Sequence) and not isinstance(bound, str):
        values = list(bound)
    else:
        raise UserError(f"{name} is {bound!r}: pass one non-negative integer or one per layer")
    if len(values) != num_layers:
        raise UserError(f"{name} has {len(values)} values for {num_layers} layers: "
                        f"pass one integer or one per layer")
    counts = [as_count(value) for value in values]
    for j, (value, count) in enumerate(zip(values, counts)):
        if count is None or count < 0:
            raise UserError(f"{name} for layer {j} is {value!r}: use a non-negative integer")
    return counts


def _check_bounds(lows: list[int], highs: list[int] | None) -> None:
    if highs is None:
        return
    for j, (low, high) in enumerate(zip(lows, highs)):
        if low > high:
            raise UserError(f"layer {j}: min_count {low} exceeds max_count {high}; "
                            f"use min_count <= max_count")


def _check_feasible(budget: int, lows: list[int], highs: list[int] | None,
                    min_count: Bound, max_count: Bound | None) -> None:
    least = sum(lows)
    most = None if highs is None else sum(highs)
    if least <= budget and (most is None or budget <= most):
        return
    scalar_bounds = as_count(min_count) is not None and (max_count is None or as_count(max_count) is not None)
    if not scalar_bounds:
        bounds = "the given per-layer bounds"
    elif max_count is None:
        bounds = f"at least {min_count} expert(s) per layer"
    else:
        bounds = f"{min_count}..{max_count} experts per layer"
    accepted = f"a budget >= {least}" if most is None else f"a budget in [{least}, {most}]"
    raise UserError(f"budget {budget} is infeasible for {len(lows)} layers with {bounds}: "
                    f"choose {accepted}")


def _priorities(priority: Sequence[float] | None, num_layers: int) -> list[Fraction]:
    if priority is None:
        return [Fraction(0)] * num_layers
    if len(priority) != num_layers:
        raise UserError(f"priority has {len(priority)} values for {num_layers} layers: pass one per layer")
    return [Fraction(p) for p in priority]


def _real_targets(weights: list[Fraction], budget: int, lows: list[int],
                  highs: list[int] | None) -> list[Fraction]:
    """Exact real-valued counts before rounding; they sum to `budget` and respect the bounds."""
    if not any(weights):
        weights = [Fraction(1)] * len(weights)
    positive = [j for j, w in enumerate(weights) if w > 0]
    if highs is not None:
        ceiling = sum(highs[j] for j in positive) + sum(lows[j] for j, w in enumerate(weights) if w == 0)
        if budget > ceiling:
            return _spill_to_zero_weights(weights, budget, lows, highs)
    level = _water_level(weights, budget, lows, highs)
    return [_clip(level * w, lows[j], None if highs is None else highs[j]) for j, w in enumerate(weights)]


def _spill_to_zero_weights(weights: list[Fraction], budget: int, lows: list[int],
                           highs: list[int]) -> list[Fraction]:
    """Positive-weight layers are saturated: fill them and share the rest evenly among the others."""
    zero = [j for j, w in enumerate(weights) if w == 0]
    targets = [Fraction(highs[j]) for j in range(len(weights))]
    rest = budget - sum(highs[j] for j, w in enumerate(weights) if w > 0)
    spread = _real_targets([Fraction(0)] * len(zero), rest,
                           [lows[j] for j in zero], [highs[j] for j in zero])
    for j, value in zip(zero, spread):
        targets[j] = value
    return targets


def _water_level(weights: list[Fraction], budget: int, lows: list[int],
                 highs: list[int] | None) -> Fraction:
    """Smallest level `lam` with filled(lam) == budget, where filled(lam) = sum(clip(lam * w_j))."""

    def filled(level: Fraction) -> Fraction:
        return sum((_clip(level * w, lows[j], None if highs is None else highs[j])
                    for j, w in enumerate(weights)), Fraction(0))

    breakpoints = {Fraction(0)}
    for j, w in enumerate(weights):
        if w > 0:
            breakpoints.add(lows[j] / w)
            if highs is not None:
                breakpoints.add(highs[j] / w)
    points = sorted(breakpoints)
    if filled(points[0]) >= budget:
        return points[0]
    # Binary search for the first breakpoint where the budget is reached.
    below, above = 0, len(points)
    while above - below > 1:
        middle = (below + above) // 2
        if filled(points[middle]) >= budget:
            above = middle
        else:
            below = middle
    end = points[above] if above < len(points) else None
    # Past the last breakpoint (end=None) only unbounded layers still grow.
    return _solve_segment(weights, budget, lows, highs, points[below], end, filled(points[below]))


def _solve_segment(weights: list[Fraction], budget: int, lows: list[int], highs: list[int] | None,
                   start: Fraction, end: Fraction | None, filled_at_start: Fraction) -> Fraction:
    """On [start, end] filled() is linear; its slope is the total weight of the layers not clipped there.

    `end=None` is the open segment past the last breakpoint, reached only when no layer
    has an upper bound (a bounded budget overflow is handled by the caller).
    """

    def grows(j: int, w: Fraction) -> bool:
        if w == 0 or lows[j] / w > start:
            return False
        return highs is None or (end is not None and highs[j] / w >= end)

    slope = sum((w for j, w in enumerate(weights) if grows(j, w)), Fraction(0))
    return start + (budget - filled_at_start) / slope


def _clip(value: Fraction, low: int, high: int | None) -> Fraction:
    if value < low:
        return Fraction(low)
    if high is not None and value > high:
        return Fraction(high)
    return value


def _largest_remainder(targets: list[Fraction], budget: int, priority: list[Fraction]) -> list[int]:
    counts = [math.floor(t) for t in targets]
    missing = budget - sum(counts)
    order = sorted(range(len(targets)), key=lambda j: (-(targets[j] - counts[j]), -priority[j], j))
    for j in order[:missing]:
        counts[j] += 1
    return counts
