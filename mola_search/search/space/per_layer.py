"""``per_layer``: one weight per layer. Every feasible allocation is a point of it (weights = counts /
max(counts)), at the price of a d = L dimensional search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mola_search.search.space.base import SearchSpace, indexed, register_encoding, unit_scale


@register_encoding
@dataclass(frozen=True)
class PerLayerSpace(SearchSpace):
    encoding = "per_layer"

    def weight_names(self, num_layers: int) -> list[str]:
        return indexed("w_layer", num_layers, min_width=2)

    def layer_weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        return self._weights(params, num_layers)

    def candidate_weights(self, experts: Sequence[int]) -> list[list[float]]:
        return [unit_scale(experts)]
