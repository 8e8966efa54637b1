"""``blocks``: K contiguous blocks of layers, one weight per block (the paper's granularity).

Blocks are split with the same rule as the paper shapes (`block_sizes`) and rounded with the same
tie-break, so the paper shapes are points of this space and `encode` finds them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mola_search._checks import check_int
from mola_search.allocation import block_sizes
from mola_search.errors import UserError
from mola_search.search.space.base import SearchSpace, indexed, register_encoding, unit_scale


@register_encoding
@dataclass(frozen=True)
class BlocksSpace(SearchSpace):
    encoding = "blocks"
    blocks: int = 4

    def __post_init__(self) -> None:
        check_int(self.blocks, "blocks", low=1)
        super().__post_init__()

    def check_depth(self, num_layers: int) -> None:
        if self.blocks > num_layers:
            raise UserError(f"search space '{self.name}' has {self.blocks} blocks but the model has "
                            f"{num_layers} layers: use blocks <= {num_layers}")

    def weight_names(self, num_layers: int) -> list[str]:
        return indexed("w_block", self.blocks)

    def layer_weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        values = self._weights(params, num_layers)
        return [v for v, size in zip(values, block_sizes(num_layers, self.blocks)) for _ in range(size)]

    def candidate_weights(self, experts: Sequence[int]) -> list[list[float]]:
        counts = np.asarray(experts, dtype=float)
        groups = np.split(counts, np.cumsum(block_sizes(len(experts), self.blocks))[:-1])
        # The block mean is exact for rounded shapes; min/max cover blocks whose rounding spilled.
        return [unit_scale(np.array([reduce(g) for g in groups])) for reduce in (np.mean, np.max, np.min)]
