"""Depth profiles of an allocation: the paper's shapes, its digit notation, and depth transfer.

The MoLA paper describes an allocation by four contiguous blocks of layers, e.g.
"2468" on 32 layers is 8 layers with 2 experts, then 8 with 4, 8 with 6, 8 with 8.
Everything here reduces a profile to per-layer weights and lets `round_to_budget`
make it exact, so shapes work for any depth and budget, not just 32 layers / 160.

Block split rule (used everywhere a profile has blocks): `numpy.array_split` style,
the first `num_layers % num_blocks` blocks get one layer more. 30 layers in 4
blocks are 8, 8, 7, 7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from mola_search.allocation.rounding import Bound, round_to_budget
from mola_search.errors import UserError

# Experts per layer of each block, lowest block first (paper Figure 1 / Table 1 notation).
_PROFILES: dict[str, tuple[int, ...]] = {
    "triangle": (8, 6, 4, 2),
    "inverted_triangle": (2, 4, 6, 8),
    "hourglass": (8, 2, 2, 8),
    "rectangle": (5, 5, 5, 5),
    # Not in the paper: the mirror of hourglass, to test "middle layers need more".
    "diamond": (2, 8, 8, 2),
}
SHAPES: tuple[str, ...] = tuple(_PROFILES)

DEFAULT_MAX_EXPERTS = 8
"""The most experts a layer gets unless told otherwise: the built-in search spaces' `max_experts`, and the
bound `mola-train` scales a shape under, so a shape is the same allocation in both (the paper's largest
count is 8 as well)."""


def default_max_experts(num_layers: int, budget: int) -> int | None:
    """`DEFAULT_MAX_EXPERTS` where the budget fits under it (budget <= 8 per layer), else no bound."""
    return DEFAULT_MAX_EXPERTS if budget <= DEFAULT_MAX_EXPERTS * num_layers else None


def block_sizes(num_layers: int, num_blocks: int) -> list[int]:
    """Near-equal contiguous block lengths; the first `num_layers % num_blocks` blocks get one more."""
    _check_layers(num_layers, at_least=num_blocks, why=f"one per block of a {num_blocks}-block profile")
    base, extra = divmod(num_layers, num_blocks)
    return [base + 1 if b < extra else base for b in range(num_blocks)]


def shape_allocation(shape: str, num_layers: int, budget: int,
                     min_count: Bound = 1, max_count: Bound | None = None) -> list[int]:
    """Per-layer expert counts of a named shape, scaled to `budget` over `num_layers` layers.

    At 32 layers and budget 160 this is exactly the paper's allocation. Elsewhere
    rounding leftovers inside a block go to the side the profile rises towards, so
    a monotone shape stays monotone (see `_trend`).
    """
    profile = _PROFILES.get(normalize_shape(shape))
    if profile is None:
        raise UserError(f"unknown shape '{shape}': use one of {', '.join(SHAPES)}")
    weights = _block_weights(profile, num_layers)
    return round_to_budget(weights, budget, min_count, max_count, priority=_trend(weights))


def normalize_shape(name: str) -> str:
    """Accept 'Inverted-Triangle' for 'inverted_triangle': shape names come from command lines."""
    return name.strip().lower().replace("-", "_")


def parse_digits(notation: str, num_layers: int) -> list[int]:
    """The paper's digit notation: each digit is the expert count of one contiguous block of layers."""
    digits = notation.strip()
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise UserError(f"digit notation '{notation}' is not a string of digits: "
                        f"write one digit 1-9 per block, e.g. 2468")
    if "0" in digits:
        raise UserError(f"digit notation '{notation}' has a 0: every layer needs at least 1 expert; "
                        f"use digits 1-9 (or a comma list for counts above 9)")
    _check_layers(num_layers, at_least=len(digits), why=f"one per digit of '{digits}'")
    return _block_weights(tuple(int(d) for d in digits), num_layers)


def parse_counts(text: str, num_layers: int) -> list[int]:
    """Per-layer counts from a comma list ("2,2,4,...", one per layer) or digit notation ("2468")."""
    stripped = text.strip()
    if "," not in stripped:
        return parse_digits(stripped, num_layers)
    parts = [part.strip() for part in stripped.split(",")]
    for j, part in enumerate(parts):
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise UserError(f"count {j} of '{text}' is '{part}': every count must be an integer >= 1")
    if len(parts) != num_layers:
        raise UserError(f"comma list has {len(parts)} counts but the model has {num_layers} layers: "
                        f"give exactly one count per layer")
    return [int(part) for part in parts]


def resample_depth(counts: Sequence[int], num_layers: int, budget: int | None = None,
                   min_count: Bound = 1, max_count: Bound | None = None) -> list[int]:
    """Move an allocation found on L layers to `num_layers` layers, keeping its profile.

    Each new layer reads the old profile, linearly interpolated, at the same relative
    depth (i + 0.5) / num_layers. The default budget keeps the experts-per-layer
    density: sum(counts) * num_layers / L, rounded half up.
    """
    source = [Fraction(c) for c in counts]
    if not source:
        raise UserError("cannot resample an empty allocation: pass at least one layer's count")
    _check_layers(num_layers, at_least=1, why="to resample onto")
    if budget is None:
        budget = math.floor(Fraction(sum(counts) * num_layers, len(source)) + Fraction(1, 2))
    weights = [_interpolate(source, Fraction(2 * i + 1, 2 * num_layers)) for i in range(num_layers)]
    return round_to_budget(weights, budget, min_count, max_count, priority=_trend(weights))


def _interpolate(values: list[Fraction], depth: Fraction) -> Fraction:
    """Value at relative depth in (0, 1), reading values[j] as sitting at depth (j + 0.5) / L."""
    position = min(max(depth * len(values) - Fraction(1, 2), Fraction(0)), Fraction(len(values) - 1))
    below = math.floor(position)
    above = min(below + 1, len(values) - 1)
    share = position - below
    return values[below] * (1 - share) + values[above] * share


def _block_weights(profile: tuple[int, ...], num_layers: int) -> list[int]:
    sizes = block_sizes(num_layers, len(profile))
    return [value for value, size in zip(profile, sizes) for _ in range(size)]


def _trend(weights: Sequence[Fraction | int]) -> list[Fraction]:
    """Rounding tie-break that keeps a blocky profile's shape.

    Inside a block every layer has the same remainder, so plain lowest-index ties
    would put the leftovers at the block's start even when the profile rises towards
    its end (a staircase would get a notch). This returns the profile drawn as
    straight lines between the centres of its runs of equal weight, extended past
    the ends, so layers nearer a heavier neighbour win ties.
    """
    runs: list[tuple[Fraction, Fraction]] = []  # (centre, value)
    start = 0
    for j in range(1, len(weights) + 1):
        if j == len(weights) or weights[j] != weights[start]:
            runs.append((Fraction(start + j - 1, 2), Fraction(weights[start])))
            start = j
    if len(runs) == 1:
        return [Fraction(0)] * len(weights)
    trend = []
    for i in range(len(weights)):
        k = 0
        while k < len(runs) - 2 and i > runs[k + 1][0]:
            k += 1
        (c0, v0), (c1, v1) = runs[k], runs[k + 1]
        trend.append(v0 + (v1 - v0) * (i - c0) / (c1 - c0))
    return trend


def _check_layers(num_layers: int, at_least: int, why: str) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < at_least:
        raise UserError(f"num_layers is {num_layers!r}: need an integer >= {at_least} ({why})")


def run_length(experts: Sequence[int]) -> str:
    """Compact form of an allocation for logs and tables, e.g. ``2x8,4x8,6x7,8x7``."""
    runs: list[list[int]] = []
    for e in experts:
        if runs and runs[-1][0] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return ",".join(f"{v}x{n}" if n > 1 else str(v) for v, n in runs)
