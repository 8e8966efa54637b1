"""Expert redundancy (MoLA paper, Figure 3): how different a layer's experts are from each other.

For every adapted module with N experts, the mean over the N(N-1)/2 pairs i < j of

* ``delta``: ||s B_i A_i - s B_j A_j||_F, the distance between the experts' weight updates
  (s = lora_alpha / rank, the LoRA scaling the layer applies),
* ``A``: ||A_i - A_j||_F and ``B``: ||B_i - B_j||_F, the paper's per-matrix distances.

A small mean distance means redundant (similar) experts. Tensors use the adapter's
layout: A is (N, r, d_in), B is (d_out, N, r). The weight updates are never
materialised: <B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T)), so the cost is
O(N^2 r^2 d) and a 7B model's adapter is analysed in seconds. Everything runs in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

QUANTITIES: tuple[str, ...] = ("delta", "A", "B")
QUANTITY_LABELS = {"delta": "weight update ||B_iA_i - B_jA_j||", "A": "||A_i - A_j||", "B": "||B_i - B_j||"}


def _f64(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def _distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    d = d2.sqrt()
    d.fill_diagonal_(0.0)
    return d


def pairwise_distances(x: Any) -> torch.Tensor:
    """(N, N) Frobenius distances between the N items of `x` (first axis = item, the rest flattened)."""
    flat = _f64(x).reshape(len(x), -1)
    diff = flat[:, None, :] - flat[None, :, :] if flat.shape[1] * len(flat) ** 2 <= 10_000_000 else None
    if diff is not None:  # exact (no cancellation) when it fits in memory
        return diff.pow(2).sum(-1).sqrt()
    return _distances_from_gram(flat @ flat.T)


def split_experts(lora_a: Any, lora_b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert matrices from the stacked layout: A_i (N, r, d_in) and B_i (N, d_out, r)."""
    a, b = _f64(lora_a), _f64(lora_b)
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[1] or a.shape[1] != b.shape[2]:
        raise ValueError(f"expected lora_A (N, r, d_in) and lora_B (d_out, N, r), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return a, b.permute(1, 0, 2)


def pairwise_delta_distances(lora_a: Any, lora_b: Any, scaling: float = 1.0) -> torch.Tensor:
    """(N, N) distances ||s B_i A_i - s B_j A_j||_F without forming the d_out x d_in products."""
    a, b = split_experts(lora_a, lora_b)
    btb = torch.einsum("ior,jos->ijrs", b, b)     # B_i^T B_j
    aat = torch.einsum("ird,jsd->ijrs", a, a)     # A_i A_j^T
    gram = (btb * aat).sum((2, 3)) * scaling ** 2
    return _distances_from_gram(gram)


def mean_offdiagonal(d: torch.Tensor) -> float:
    """Mean over the pairs i < j; NaN for a single expert (no pair to compare)."""
    n = d.shape[0]
    if n < 2:
        return math.nan
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def module_redundancy(lora_a: Any, lora_b: Any, scaling: float = 1.0) -> dict[str, float]:
    """{"delta", "A", "B"}: mean pairwise Frobenius distance of one module's experts."""
    a, b = split_experts(lora_a, lora_b)
    return {"delta": mean_offdiagonal(pairwise_delta_distances(lora_a, lora_b, scaling)),
            "A": mean_offdiagonal(pairwise_distances(a)), "B": mean_offdiagonal(pairwise_distances(b))}


@dataclass(frozen=True)
class ModuleRedundancy:
    module: str
    layer: int
    kind: str
    experts: int
    delta: float
    A: float
    B: float

    def get(self, quantity: str) -> float:
        return getattr(self, quantity)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(module: str) -> int:
    """Decoder layer index in a module name (model.layers.12.mlp.up_proj -> 12)."""
    m = _LAYER.search(module) or re.search(r"\.(\d+)\.", module)
    if not m:
        raise ValueError(f"cannot find a layer index in module name '{module}'")
    return int(m.group(1))


def adapter_redundancy(tensors: Mapping[str, Any], scaling: float | Sequence[float] = 1.0,
                       layers: Mapping[str, int] | None = None) -> list[ModuleRedundancy]:
    """Redundancy of every module of an adapter state dict (`<module>.lora_A` / `.lora_B` keys).

    `scaling` is one LoRA scaling for all layers or one per layer; `layers` maps module
    names to layer indices when the names carry none.
    """
    rows = []
    modules = sorted({k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A")})
    for module in modules:
        if f"{module}.lora_B" not in tensors:
            raise ValueError(f"{module} has lora_A but no lora_B")
        j = layers[module] if layers is not None and module in layers else layer_of(module)
        s = scaling if isinstance(scaling, (int, float)) else scaling[j]
        a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        r = module_redundancy(a, b, float(s))
        rows.append(ModuleRedundancy(module, j, module.rsplit(".", 1)[-1], int(torch.as_tensor(a).shape[0]), **r))
    return sorted(rows, key=lambda r: (r.layer, _kind_rank(r.kind), r.module))


def per_layer(rows: Iterable[ModuleRedundancy], quantity: str, num_layers: int,
              kind: str | None = None) -> list[float]:
    """Mean of `quantity` per layer (over module kinds, or only `kind`); NaN where no pair exists."""
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity '{quantity}': use one of {QUANTITIES}")
    sums = [0.0] * num_layers
    counts = [0] * num_layers
    for r in rows:
        v = r.get(quantity)
        if (kind is None or r.kind == kind) and 0 <= r.layer < num_layers and math.isfinite(v):
            sums[r.layer] += v
            counts[r.layer] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind_rank(kind: str) -> int:
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)


def kinds(rows: Iterable[ModuleRedundancy]) -> list[str]:
    """Module types present, in the decoder's order (attention, then MLP), unknown ones last."""
    return sorted({r.kind for r in rows}, key=lambda k: (_kind_rank(k), k))
