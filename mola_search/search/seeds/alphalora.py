"""Training-free allocation from weight spectra, after AlphaLoRA (heavy-tailed self-regularisation).

The eigenvalues of WᵀW of a trained weight matrix have a power-law tail p(λ) ∝ λ^-α;
a smaller α means a heavier tail, which heavy-tailed self-regularisation theory reads
as a better-trained layer. AlphaLoRA gives the *less* trained layers (larger α) more
LoRA experts: counts ∝ α^β. No training run is needed, so it makes a cheap seed for
the search and a baseline to beat.

α is fitted as WeightWatcher / the ``powerlaw`` package do: the Hill (maximum
likelihood) estimate α = 1 + n / Σ ln(λ_i / λ_min) over the tail λ_i ≥ λ_min, with
λ_min chosen among the eigenvalues by the smallest Kolmogorov–Smirnov distance
between the tail's empirical CDF and the fitted power law.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mola_search._io import write_json
from mola_search.allocation import round_to_budget
from mola_search.allocation.rounding import Bound
from mola_search.errors import UserError
from mola_search.mola.config import DEFAULT_TARGETS
from mola_search.models import decoder_layers

DEFAULT_BETA = 2.5
MIN_TAIL = 10
"""Fewest eigenvalues a fitted tail may have (fewer if the matrix has few): tiny tails fit anything."""

_CANDIDATE_CHUNK = 256  # xmin candidates evaluated per vectorised block (bounds memory at chunk x n)
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# The estimator


def hill_alpha(eigenvalues: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Power-law exponent α of the tail of `eigenvalues`, and the tail's start xmin.

    Every eigenvalue leaving at least `MIN_TAIL` points in the tail is an xmin
    candidate; the one whose fitted power law is closest to the tail's empirical
    distribution (Kolmogorov–Smirnov distance) wins. Non-positive and non-finite
    values are ignored (numerical zeros of a rank-deficient matrix have no tail).
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 2 or values[0] == values[-1]:
        raise UserError(f"cannot fit a power law to {values.size} positive eigenvalue(s) with "
                        f"{np.unique(values).size} distinct value(s): need at least 2 distinct ones")
    logs = np.log(values)
    n = values.size
    last = n - min(MIN_TAIL, max(2, n // 2))  # last candidate index: the tail keeps >= that many points
    # suffix[i] = sum_{k >= i} ln(λ_k): the Hill denominator of every candidate in O(1).
    suffix = np.cumsum(logs[::-1])[::-1]
    best = (math.inf, math.nan, math.nan)  # (ks distance, alpha, xmin)
    for start in range(0, last + 1, _CANDIDATE_CHUNK):
        candidates = np.arange(start, min(start + _CANDIDATE_CHUNK, last + 1))
        distance, alpha = _ks_distances(values, logs, suffix, candidates)
        if np.all(np.isnan(distance)):
            continue
        i = int(np.nanargmin(distance))
        if distance[i] < best[0]:
            best = (float(distance[i]), float(alpha[i]), float(values[candidates[i]]))
    if not math.isfinite(best[1]):
        raise UserError(f"cannot fit a power law to these {n} eigenvalues: every candidate tail is "
                        f"constant; need eigenvalues that spread out")
    return best[1], best[2]


def _ks_distances(values: np.ndarray, logs: np.ndarray, suffix: np.ndarray,
                  candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KS distance and Hill α for each candidate xmin index, all at once (NaN where undefined).

    Row r describes the tail values[candidates[r]:]; entries before the tail are masked.
    """
    n = values.size
    tail_sizes = n - candidates
    log_sums = suffix[candidates] - tail_sizes * logs[candidates]  # Σ ln(λ_k / λ_min) over the tail
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(log_sums > 0, 1.0 + tail_sizes / log_sums, np.nan)
    columns = np.arange(n)
    in_tail = columns[None, :] >= candidates[:, None]
    position = columns[None, :] - candidates[:, None]  # rank of a point inside its tail
    log_ratio = logs[None, :] - logs[candidates][:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = 1.0 - np.exp((1.0 - alpha)[:, None] * log_ratio)  # power-law CDF at each tail point
        below = np.abs(position / tail_sizes[:, None] - fitted)  # empirical CDF just before the point
        above = np.abs((position + 1) / tail_sizes[:, None] - fitted)  # and just after it
    gaps = np.where(in_tail, np.maximum(below, above), -np.inf)
    distance = np.where(np.isnan(alpha), np.nan, gaps.max(axis=1))
    return distance, alpha


# --------------------------------------------------------------------------------------------------
# Per-layer alphas of a model


def target_weights(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS
                   ) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(layer index, module name, weight) of every target projection, layer by layer.

    A target is matched by its last name component (``self_attn.q_proj``). A wrapped
    projection (MoLA's or PEFT's ``q_proj.base_layer``) contributes its frozen base weight,
    so the spectra are the same before and after adapters are attached.
    """
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] not in target_modules:
                continue
            weight = _dense_weight(module)
            if weight is not None:
                yield index, name, weight


def _dense_weight(module: nn.Module) -> torch.Tensor | None:
    for candidate in (module, getattr(module, "base_layer", None)):
        weight = getattr(candidate, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
            return weight
    return None


def matrix_alpha(weight: torch.Tensor) -> float:
    """α of one weight matrix: the eigenvalues of WᵀW are its squared singular values (fp32)."""
    with torch.no_grad():
        singular = torch.linalg.svdvals(weight.detach().to(torch.float32))
    return hill_alpha(singular.double().cpu().numpy() ** 2)[0]


def layer_alphas(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> list[float]:
    """One α per decoder layer: the mean over its target projections."""
    per_layer: list[list[float]] = [[] for _ in decoder_layers(model)]
    for index, name, weight in target_weights(model, target_modules):
        try:
            per_layer[index].append(matrix_alpha(weight))
        except UserError as error:
            raise UserError(f"layer {index} {name}: {error}") from None
    empty = [j for j, alphas in enumerate(per_layer) if not alphas]
    if empty:
        raise UserError(f"decoder layer {empty[0]} has no linear module named "
                        f"{', '.join(target_modules)}: pass the model's projection names as targets")
    return [float(np.mean(alphas)) for alphas in per_layer]


def cached_layer_alphas(model: nn.Module, cache_file: str | os.PathLike[str],
                        target_modules: Sequence[str] = DEFAULT_TARGETS) -> list[float]:
    """`layer_alphas`, remembered in a JSON file: the SVDs are the slow part on large models.

    The file stores a fingerprint of the model (name, depth, targets, and each target
    weight's sum and norm), so a cache written for other weights is recomputed, not reused.
    """
    path = Path(cache_file)
    fingerprint = _fingerprint(model, target_modules)
    cached = _read_cache(path)
    if cached is not None and cached.get("fingerprint") == fingerprint:
        return [float(a) for a in cached["alphas"]]
    alphas = layer_alphas(model, target_modules)
    write_json(path, {"version": _CACHE_VERSION, "fingerprint": fingerprint, "alphas": alphas})
    return alphas


def _fingerprint(model: nn.Module, target_modules: Sequence[str]) -> str:
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(str(getattr(config, "name_or_path", "")).encode())
    digest.update(json.dumps(list(target_modules)).encode())
    with torch.no_grad():
        for index, name, weight in target_weights(model, target_modules):
            w = weight.detach().double()
            # 6 significant digits: stable across devices' summation order, changed by any real edit.
            digest.update(f"{index}|{name}|{tuple(w.shape)}|{w.sum().item():.6e}|{w.norm().item():.6e}".encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cache's content, or None when it is missing or unusable (it is only ever a shortcut)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("alphas"), list):
        return None
    return data


# --------------------------------------------------------------------------------------------------
# Allocation


def alphalora_allocation(alphas: Sequence[float], budget: int, beta: float = DEFAULT_BETA,
                         min_count: Bound = 1, max_count: Bound | None = None) -> list[int]:
    """Expert counts ∝ α^β, exact to the budget and within bounds; ties go to the larger α.

    β sharpens (β > 1) or flattens (β < 1) the allocation; β = 0 is an even split.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise UserError(f"beta is {beta!r}: use a finite number >= 0")
    for j, alpha in enumerate(alphas):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise UserError(f"alpha of layer {j} is {alpha!r}: alphas must be finite numbers > 0")
    if not alphas:
        raise UserError("no alphas given: pass one per decoder layer")
    top = max(alphas)
    weights = [(alpha / top) ** beta for alpha in alphas]  # scaled first: α^β can overflow for large β
    return round_to_budget(weights, budget, min_count, max_count, priority=list(alphas))
