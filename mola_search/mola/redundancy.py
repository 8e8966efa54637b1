"""The MoLA paper's expert-redundancy arithmetic (Figure 3) on one module's stacked experts.

Pure tensor math on the adapter layout (A: (N, r, d_in), B: (d_out, N, r)), in float64, with no
d_out x d_in product ever formed: <B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T)). The report
(analysis.redundancy) and the one-shot search's redundancy signal (search.signals) both use it.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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
