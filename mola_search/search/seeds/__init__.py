"""The seeded baselines: allocations every search evaluates first.

Enqueuing the paper's shapes (and the training-free AlphaLoRA allocation) as the
first trials gives the sampler good starting points and, more importantly, makes
every search report how much it gained over the known baselines on the same
budget, data and fidelity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mola_search.allocation import AllocationSpec, shape_allocation
from mola_search.allocation.rounding import Bound
from mola_search.errors import UserError
from mola_search.search.space import per_layer_top_k

if TYPE_CHECKING:  # torch is only needed when an AlphaLoRA seed is asked for
    from torch import nn

SEED_SHAPES: tuple[str, ...] = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")
"""The MoLA paper's four shapes, plus diamond (hourglass mirrored, 'the middle needs more')."""

ALPHALORA_SEED = "alphalora"


@dataclass(frozen=True)
class Seed:
    """A named allocation to evaluate before the sampler takes over."""

    name: str
    spec: AllocationSpec
    origin: str = ""   # how the study records it; default "seed:<name>" (a one-shot check: "oneshot:top1", ..)

    @property
    def label(self) -> str:
        return self.origin or f"seed:{self.name}"


def paper_seeds(num_layers: int, budget: int, min_experts: Bound = 1, max_experts: Bound | None = None,
                top_k: int = 2, rank: int = 8) -> list[Seed]:
    """The paper shapes scaled to this depth and budget, in `SEED_SHAPES` order.

    Each respects the expert bounds and sums exactly to `budget`; a layer's top-k is
    capped by its expert count, as in the search space.
    """
    return [_seed(shape, shape_allocation(shape, num_layers, budget, min_experts, max_experts), top_k, rank)
            for shape in SEED_SHAPES]


def alphalora_seed(model: "nn.Module", num_layers: int, budget: int, min_experts: Bound = 1,
                   max_experts: Bound | None = None, top_k: int = 2, rank: int = 8, beta: float = 2.5,
                   cache_file: str | os.PathLike[str] | None = None) -> Seed:
    """The AlphaLoRA allocation of `model` (counts ∝ α^β of each layer's weight spectra)."""
    from mola_search.search.seeds.alphalora import alphalora_allocation, cached_layer_alphas, layer_alphas

    alphas = layer_alphas(model) if cache_file is None else cached_layer_alphas(model, cache_file)
    _check_depth(alphas, num_layers)
    experts = alphalora_allocation(alphas, budget, beta, min_experts, max_experts)
    return _seed(ALPHALORA_SEED, experts, top_k, rank)


def all_seeds(model: "nn.Module | None", num_layers: int, budget: int, min_experts: Bound = 1,
              max_experts: Bound | None = None, top_k: int = 2, rank: int = 8, alphalora_beta: float = 2.5,
              alpha_cache: str | os.PathLike[str] | None = None) -> list[Seed]:
    """Paper seeds, then the AlphaLoRA seed when a model is given (its spectra are needed).

    Different seeds can coincide on small budgets (e.g. when the bounds leave one feasible
    allocation); enqueue them with ``skip_if_exists=True`` to evaluate each allocation once.
    """
    seeds = paper_seeds(num_layers, budget, min_experts, max_experts, top_k, rank)
    if model is not None:
        seeds.append(alphalora_seed(model, num_layers, budget, min_experts, max_experts, top_k, rank,
                                    alphalora_beta, alpha_cache))
    return seeds


def _seed(name: str, experts: Sequence[int], top_k: int, rank: int) -> Seed:
    spec = AllocationSpec.build(experts, per_layer_top_k(experts, top_k), rank, source=f"seed:{name}")
    return Seed(name, spec)


def _check_depth(alphas: Sequence[float], num_layers: int) -> None:
    if len(alphas) != num_layers:
        raise UserError(f"the model has {len(alphas)} decoder layers but the search is for {num_layers}: "
                        f"pass the same model the search trains")
