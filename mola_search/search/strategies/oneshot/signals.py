"""Cheap per-layer signals of where experts pay off, each turned into an allocation at the study's budget.

* ``router_usage``: how many experts the one-shot supernet's routers actually use in each layer (with
  every expert active): per module, exp(entropy) of its top-k selection shares, the "effective number
  of experts", averaged over the layer's modules. A layer whose routers spread their tokens over many
  experts gets more.
* ``redundancy``: the MoLA paper's expert-redundancy measure on the supernet, the mean pairwise distance
  of the experts' weight updates B_i A_i (analysis.redundancy). Layers whose experts learned similar
  updates (small distance, redundant) get fewer; layers with diverse experts get more.
* ``saliency``: first-order Taylor saliency of the frozen base's adapted linears, sum |W * dL/dW| over a
  few training batches of the task loss, per layer: where a change of the weights moves the loss most.

Each signal is a list of non-negative per-layer weights; `signal_spec` rounds it to the budget with the
same rounding (`round_to_budget`) the search space uses, so every signal is a feasible allocation the
search can evaluate as a seed (`oneshot.rank_agreement` compares a signal with an allocation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from mola_search.allocation import AllocationSpec, round_to_budget
from mola_search.search.space import per_layer_top_k

SIGNALS: tuple[str, ...] = ("router_usage", "redundancy", "saliency")


def router_usage(stats: Sequence[dict[str, Any]], num_layers: int) -> list[float]:
    """Per layer: the mean over its modules of exp(entropy) of the top-k selection shares
    (`MoLAModel.router_stats()` rows, collected with every expert active)."""
    per_layer: dict[int, list[float]] = defaultdict(list)
    for row in stats:
        shares = [s for s in row["share"] if s > 0]
        total = sum(shares)
        if not total:
            continue
        entropy = -sum((s / total) * math.log(s / total) for s in shares)
        per_layer[int(row["layer"])].append(math.exp(entropy))
    return [sum(v) / len(v) if (v := per_layer.get(j)) else 0.0 for j in range(num_layers)]


def redundancy(model: torch.nn.Module, num_layers: int) -> list[float]:
    """Per layer: the mean over its modules of the mean pairwise distance of the experts' updates
    (higher = more diverse experts = less redundant)."""
    from mola_search.mola.redundancy import mean_offdiagonal, pairwise_delta_distances

    per_layer: dict[int, list[float]] = defaultdict(list)
    for layer in model.mola_layers.values():
        if layer.num_experts < 2:
            continue
        d = pairwise_delta_distances(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
        per_layer[layer.layer_index].append(mean_offdiagonal(d))
    return [sum(v) / len(v) if (v := per_layer.get(j)) else 0.0 for j in range(num_layers)]


def saliency(model: torch.nn.Module, tokenizer, examples: Sequence[Any], *, cutoff_len: int,
             batches: int = 4, batch_size: int = 8) -> list[float]:
    """Per layer: sum over the adapted linears' frozen weights of |W * dL/dW| (first-order Taylor saliency),
    summed over `batches` training batches of the answer-only loss, taken with the adapters switched off
    (so it is the base model's own signal). Gradients are freed and requires_grad restored afterwards."""
    from mola_search.train.batching import answer_span, collate, encode_example, model_device, tail_logits, to_device
    from mola_search.train.trainer import answer_loss

    layers = list(model.mola_layers.values())
    weights = [layer.base_layer.weight for layer in layers]
    adapter = [p for p in model.parameters() if p.requires_grad]
    scores = [0.0] * (1 + max(layer.layer_index for layer in layers))
    saved = [layer.scaling for layer in layers]
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    try:
        for p in adapter:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for layer in layers:
            layer.scaling = 0.0  # the adapter adds exactly 0: the base model's gradients
        model.eval()  # no dropout
        encoded = [encode_example(tokenizer, ex, cutoff_len) for ex in examples[:batches * batch_size]]
        for start in range(0, len(encoded), batch_size):
            inputs = to_device(collate(encoded[start:start + batch_size], pad_id), device)
            keep = answer_span(inputs)
            loss = answer_loss(tail_logits(model, inputs, keep), inputs["labels"][:, -keep:])
            loss.backward()
        for layer, w in zip(layers, weights):
            if w.grad is not None:
                scores[layer.layer_index] += float((w.detach().float() * w.grad.float()).abs().sum())
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
        for p in adapter:
            p.requires_grad_(True)
        for layer, s in zip(layers, saved):
            layer.scaling = s
        model.train(was_training)
    return scores


def signal_spec(name: str, weights: Sequence[float], budget: int, min_experts: int, max_experts: int | None,
                top_k: int, rank: int) -> AllocationSpec:
    """The allocation of `budget` experts proportional to a signal's per-layer weights."""
    clean = [w if math.isfinite(w) and w > 0 else 0.0 for w in weights]
    experts = round_to_budget(clean, budget, min_experts, max_experts)
    return AllocationSpec.build(experts, per_layer_top_k(experts, top_k), rank, source=f"signal:{name}")
