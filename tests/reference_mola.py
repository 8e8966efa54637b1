"""The naive per-expert loop MoLA forward: the reference the vectorised layer must match.

Lives in tests on purpose: it is the readable definition, not something to run in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mola_search.mola.layer import MoLALinear


def reference_forward(layer: MoLALinear, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer(x)
    xa = x.to(layer.lora_A.dtype)
    probs = F.linear(xa, layer.router).float().softmax(-1)
    top_w, top_i = probs.topk(layer.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros(*x.shape[:-1], layer.base_layer.out_features, dtype=xa.dtype)
    for e in range(layer.num_experts):
        weight = (top_w * (top_i == e)).sum(-1)          # this expert's routing weight per token, 0 if unchosen
        chosen = weight > 0
        expert_out = (xa[chosen] @ layer.lora_A[e].T) @ layer.lora_B[:, e, :].T * layer.scaling
        out = out.index_put((chosen,), out[chosen] + weight[chosen].unsqueeze(-1).to(xa.dtype) * expert_out)
    return base + out.to(base.dtype)
