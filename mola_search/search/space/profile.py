"""``profile``: a few knot values at evenly spaced depths, linearly interpolated to the layers: a smooth
depth profile in few dimensions. Blocky allocations are only approximated; `encode` says whether its
point is exact."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

from mola_search._checks import check_int
from mola_search.search.space.base import SearchSpace, indexed, register_encoding, unit_scale


@register_encoding
@dataclass(frozen=True)
class ProfileSpace(SearchSpace):
    encoding = "profile"
    knots: int = 4

    def __post_init__(self) -> None:
        check_int(self.knots, "knots", low=2)
        super().__post_init__()

    def weight_names(self, num_layers: int) -> list[str]:
        return indexed("w_knot", self.knots)

    def layer_weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        values = self._weights(params, num_layers)
        return [float(w) for w in interpolation_matrix(num_layers, self.knots) @ np.asarray(values)]

    def candidate_weights(self, experts: Sequence[int]) -> list[list[float]]:
        counts = np.asarray(experts, dtype=float)
        fitted, _ = nnls(interpolation_matrix(len(experts), self.knots), counts)
        depths = np.linspace(0.0, len(experts) - 1, self.knots)
        sampled = np.interp(depths, np.arange(len(experts)), counts)
        return [unit_scale(fitted), unit_scale(sampled)]


def interpolation_matrix(num_layers: int, knots: int) -> np.ndarray:
    """(layers x knots) linear interpolation: knot k sits at depth k/(knots-1), layer j at j/(L-1).

    Both ends are pinned (first layer = first knot, last layer = last knot), so a knot's
    value is directly readable as "the weight at that depth".
    """
    depths = np.linspace(0.0, knots - 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    matrix = np.zeros((num_layers, knots))
    for j, position in enumerate(depths):
        below = min(int(math.floor(position)), knots - 2)
        share = position - below
        matrix[j, below] = 1.0 - share
        matrix[j, below + 1] = share
    return matrix
