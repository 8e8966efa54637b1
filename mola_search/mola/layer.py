"""One adapted linear: frozen base weight + N LoRA experts + a top-k router.

The experts are computed *densely and vectorised*: all N low-rank projections run
as one matmul with the stacked A (N*r x d_in), the router's renormalised top-k
weights (zero for unselected experts) scale each expert's r-dim slice, and one
matmul with the stacked B maps back.  For the small N and r MoLA uses this is the
same arithmetic as a single LoRA of rank N*r and beats gathering per-token expert
weights; it needs no Python loop over experts and no host synchronisation, and
gives exactly the top-k routed output (unselected experts get weight 0, hence
zero gradient).

The adapter computes in the dtype of its input (the frozen base's: bf16 on a GPU or a
CPU with bf16 matmuls), with fp32 master weights cast per forward, as autocast does: no
fp32 copy of every activation. Dropout masks come from a `DropoutPool` (one random draw per
forward, see there): on a CPU, one Bernoulli draw per adapted linear was a quarter of a step.

Two autograd functions carry a linear's work: `_InputSide` (base outputs, router logits and A
projections of everything reading one input, with one input-gradient buffer in backward) and
`_OutputSide` (the gated experts added into the base output in place). Their backward passes are
checked against numerical differentiation in `tests/test_mola_layer.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mola_search.mola.config import OFFICIAL, PER_MODULE, canonical_balance_loss


class BalanceTerm(NamedTuple):
    """What one adapted linear saw in one training forward, summed over tokens: enough for either
    balance-loss formulation, so the combination (per module, or pooled per decoder layer) happens once
    per forward in `balance_loss` instead of in the layers."""

    layer: int
    selected: torch.Tensor    # (experts,) top-k selections per expert
    prob_sum: torch.Tensor    # (experts,) summed router probabilities (full softmax)
    tokens: torch.Tensor      # () positions counted
    top_k: int


class DropoutPool:
    """Dropout for every adapted linear of one forward, cut from one random draw.

    `torch.nn.Dropout` draws a fresh Bernoulli mask per call; for SmolLM2 that is 210 masks of
    2048 x 576..1536 per step, a quarter of a CPU step. Here one draw per forward fills a pool of
    keep-multipliers (0 or 1/(1-p)); a linear's mask is a slice of it at an offset that is a hash of
    the forward's random key and the linear's `key` (its layer and kind). Within a slice every element
    is kept with probability 1-p, independently; two linears' masks are shifted slices of one sequence,
    so at any one position they are independent draws unless the offsets coincide. Linears that read
    the same tensor (q/k/v, gate/up) share one mask, as one dropout on their common input would
    (PEFT's LoRA draws one per linear, the official MoLA code one per expert).

    A mask depends only on the forward's draw and the key, not on the order of calls or on the global
    RNG afterwards, so activation checkpointing, which runs a decoder layer's forward again during
    backward, gets the very masks of the first pass. `new_forward()` (MoLAModel calls it before each
    forward) makes the next `apply` draw a new pool; `width` (the widest input of the adapted linears)
    sizes it so that it never has to grow within a forward.
    """

    def __init__(self, width: int = 0) -> None:
        self.width = width
        self._pool: torch.Tensor | None = None
        self._pool_p = 0.0
        self._key = 0
        self._fresh = True
        self._last: tuple[torch.Tensor, float, torch.Tensor] | None = None  # (input, p, its mask)

    def new_forward(self) -> None:
        self._fresh, self._last = True, None

    def mask(self, x: torch.Tensor, p: float, key: int = 0) -> torch.Tensor:
        """The keep-multipliers (0 or 1/(1-p), `x`'s shape and dtype) of dropout with probability `p` on
        `x`, as in training mode; `key` picks the slice. The same tensor `x` gets the same mask again."""
        if self._last is not None and self._last[0] is x and self._last[1] == p:
            return self._last[2]
        n = x.numel()
        pool = self._pool
        if (self._fresh or pool is None or pool.numel() < 2 * n or pool.dtype != x.dtype
                or pool.device != x.device or self._pool_p != p):
            rows = n // x.shape[-1] if x.dim() and x.shape[-1] else n
            size = max(2 * n, 2 * rows * self.width)  # every input of this forward fits: one draw per forward
            keep = torch.rand(size, device=x.device) >= p
            self._pool, self._pool_p, self._fresh = keep.to(x.dtype) * (1.0 / (1.0 - p)), p, False
            self._key = int(torch.randint(0, 2**62, ()))  # the CPU generator: no device sync
            pool = self._pool
        offset = _mix(self._key ^ key) % (pool.numel() - n + 1)
        mask = pool[offset:offset + n].view(x.shape)
        self._last = (x, p, mask)
        return mask

    def apply(self, x: torch.Tensor, p: float, key: int = 0) -> torch.Tensor:
        """`x` with dropout probability `p` (scaled by 1/(1-p)), as in training mode; `key` picks the slice."""
        return x * self.mask(x, p, key)


def _mix(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer."""
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


@dataclass
class RoutingState:
    """State shared by every MoLA layer of one model during a forward pass.

    `token_mask` (batch x seq of the positions this forward computes, 1 = real token) keeps padding out
    of the router statistics and of the per-module balance loss; `balance_loss` is the formulation
    (`MoLAConfig.balance_loss`); `balance_terms` collects what the layers recorded in the last training
    forward; `collect_stats` turns on per-expert counters; `fuse_groups` lets an `InputGroup` compute
    its members' input-side matmuls together (off: every linear computes its own, same numbers).
    `recording` is on while the base model's forward runs and off after it: activation checkpointing
    runs a layer's forward again during backward, and that replay must compute what the first pass did
    (the same operations, so the same tensors are saved) without adding balance terms or statistics twice.
    `keep_token_mask` (set while activation checkpointing is on) keeps `token_mask` past the forward for
    that replay; the next forward replaces it.
    """

    token_mask: torch.Tensor | None = None
    collect_stats: bool = False
    balance_loss: str = PER_MODULE
    balance_terms: list[BalanceTerm] = field(default_factory=list)
    dropout: DropoutPool = field(default_factory=DropoutPool)
    fuse_groups: bool = True  # linears that read one input compute their routers and A's as one matmul
    recording: bool = True
    keep_token_mask: bool = False

    def __post_init__(self) -> None:
        self.balance_loss = canonical_balance_loss(self.balance_loss)  # "mola-official" -> "official"


class _InputSide(torch.autograd.Function):
    """Everything that reads the input `x` of one adapted linear, or of a shared-input group, as one autograd
    node: each member's frozen base output x W^T + b, the router logits x R^T and the expert projections
    (x * mask) A^T, with R and A the members' weights stacked.

    These are the same products autograd would record one by one, but its backward would compute an input
    gradient per product (and the mask's multiply) and add them up pass by pass, keep the dropped input for
    the A's gradient, and form weight gradients as x^T g, a transposed operand CPU matmuls handle slowly.
    This backward accumulates the input gradient in one buffer (`addmm_`, `addcmul_`), recomputes x * mask
    instead of keeping it, and computes weight gradients as g^T x with the thin g^T made contiguous.

    apply(x (tokens x d_in), mask (x's shape: keep-multipliers) or None, routers, experts,
          W_1, b_1, ..., W_n, b_n) -> (base output 1, ..., base output n, logits, hidden)
    """

    @staticmethod
    def forward(ctx, x, mask, routers, experts, *bases):
        weights, biases = bases[0::2], bases[1::2]
        results = tuple(F.linear(x, w, b) for w, b in zip(weights, biases))
        if mask is None:  # routers and A's read the same tensor: one matmul
            both = F.linear(x, torch.cat((routers, experts)))
            logits, hidden = both.split((routers.shape[0], experts.shape[0]), dim=-1)
        else:
            logits, hidden = F.linear(x, routers), F.linear(x * mask, experts)
        ctx.save_for_backward(x, mask, routers, experts, *weights)
        ctx.has_bias = tuple(b is not None for b in biases)
        return (*results, logits, hidden)

    @staticmethod
    def backward(ctx, *grads):
        x, mask, routers, experts, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_results = grads[:-2]
        g_logits = grads[-2] if grads[-2] is not None else x.new_zeros(x.shape[0], routers.shape[0])
        g_hidden = grads[-1] if grads[-1] is not None else x.new_zeros(x.shape[0], experts.shape[0])
        g_adapter = torch.cat((g_logits, g_hidden), dim=-1) if mask is None else None
        grad_x = None
        if need[0]:
            for g, w in zip(g_results, weights):
                if g is not None:
                    grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            if mask is None:
                w = torch.cat((routers, experts))
                grad_x = g_adapter @ w if grad_x is None else grad_x.addmm_(g_adapter, w)
            else:
                grad_x = g_logits @ routers if grad_x is None else grad_x.addmm_(g_logits, routers)
                grad_x.addcmul_(g_hidden @ experts, mask)
        grad_routers = grad_experts = None
        if mask is None and (need[2] or need[3]):
            grad_routers, grad_experts = (g_adapter.t().contiguous() @ x).split((routers.shape[0], experts.shape[0]))
        else:
            if need[2]:
                grad_routers = g_logits.t().contiguous() @ x
            if need[3]:
                grad_experts = g_hidden.t().contiguous() @ (x * mask)
        grad_bases = []
        for i, (g, has_bias) in enumerate(zip(g_results, ctx.has_bias)):  # frozen in MoLA; trainable if unfrozen
            grad_w = g.t() @ x if need[4 + 2 * i] and g is not None else None
            grad_b = g.sum(0) if has_bias and need[5 + 2 * i] and g is not None else None
            grad_bases += [grad_w, grad_b]
        return (grad_x, None, grad_routers, grad_experts, *grad_bases)


def input_side(members: Sequence["MoLALinear"], x: torch.Tensor,
               mask: torch.Tensor | None) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """(base output or None, router logits, A projection) of each of `members` (linears reading `x`), all
    flattened to (tokens, features); `mask` is the dropout's keep-multipliers for `x` (None: no dropout).

    The base output is None where a member's base is not a plain `nn.Linear` (a quantised layer, say): that
    member calls its own base.
    """
    dtype = compute_dtype(x)  # the base's dtype, or autocast's; fp32 master weights are cast to it
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    mask2 = None if mask is None else mask.reshape(x2.shape).to(dtype)
    routers = [m.router[:m.active_experts] for m in members]
    experts = [m.lora_A[:m.active_experts].reshape(-1, m.lora_A.shape[-1]) for m in members]
    plain = all(type(m.base_layer) is nn.Linear for m in members)
    bases = [None if t is None else t.to(dtype)
             for m in members for t in (m.base_layer.weight, m.base_layer.bias)] if plain else []
    *results, logits, hidden = _InputSide.apply(
        x2, mask2, (torch.cat(routers) if len(members) > 1 else routers[0]).to(dtype),
        (torch.cat(experts) if len(members) > 1 else experts[0]).to(dtype), *bases)
    if len(members) > 1:
        logits = logits.split([r.shape[0] for r in routers], dim=-1)
        hidden = hidden.split([a.shape[0] for a in experts], dim=-1)
    else:
        logits, hidden = (logits,), (hidden,)
    return list(zip(results if plain else [None] * len(members), logits, hidden))


class _OutputSide(torch.autograd.Function):
    """The output side of one adapted linear, in place on its base output: result += (hidden * gates) B^T.

    `hidden` is the A projection (tokens, experts * rank), `weights` the scaled gates (tokens, experts), zero
    for unselected experts. Autograd would record the gating as a broadcast multiply, which a CPU runs on
    bf16 nearly three times slower than an elementwise one, and B's gradient as g^T (hidden * gates) with the
    large g transposed; here the gates are expanded to hidden's shape and the gradient is (hidden * gates)^T g
    with the thin operand made contiguous (both timed by benchmarks/bench_ops.py). The base output is this
    layer's own new tensor, which no backward needs, so the experts' sum is added inside the B matmul rather
    than as another pass over it.

    apply(result (tokens, d_out), hidden, weights, lora_b (d_out, experts * rank)) -> result, modified
    """

    @staticmethod
    def forward(ctx, result, hidden, weights, lora_b):
        gated = hidden * _expand_gates(weights, hidden.shape[1])
        result.addmm_(gated, lora_b.t())
        ctx.mark_dirty(result)
        ctx.save_for_backward(hidden, weights, lora_b, gated)
        return result

    @staticmethod
    def backward(ctx, g):
        hidden, weights, lora_b, gated = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_gated = g @ lora_b
        grad_hidden = g_gated * _expand_gates(weights, hidden.shape[1]) if need[1] else None
        grad_weights = (g_gated * hidden).view(*weights.shape, -1).sum(-1) if need[2] else None
        grad_b = (gated.t().contiguous() @ g).t() if need[3] else None
        return g, grad_hidden, grad_weights, grad_b


def _expand_gates(weights: torch.Tensor, width: int) -> torch.Tensor:
    """(tokens, experts) gates repeated over each expert's rank: (tokens, width), contiguous."""
    tokens, experts = weights.shape
    return weights.unsqueeze(-1).expand(tokens, experts, width // experts).reshape(tokens, width)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear computes in on `x`: autocast's where it is on (a CUDA forward of the trainer), else x's.

    The autograd functions above take their inputs already in this dtype: autocast would cast their forward's
    matmuls but not the in-place `addmm_`, nor anything in their backward."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class InputGroup:
    """Adapted linears of one decoder layer that read the same input tensor (q/k/v; gate/up).

    The first member called with a tensor computes for all (`input_side`: their base outputs, router logits
    and A projections as one autograd node, routers and A's stacked into one or two matmuls) and each
    member takes its part. Mathematically this is each member's own computation; on a CPU it replaces 4-6
    skinny matmuls, their backward and the accumulation of as many input gradients by one or two. A member
    called with another tensor than its group's (an architecture whose projections read different inputs)
    switches the group off for good and every member computes alone.
    """

    def __init__(self, members: Sequence["MoLALinear"]) -> None:
        self.members = list(members)
        self.enabled = len(self.members) > 1
        self._x: torch.Tensor | None = None
        self._parts: dict[int, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}

    def parts(self, member: "MoLALinear", x: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """`member`'s part of `input_side` for input `x`, or None when the group cannot serve."""
        if self._x is not x:
            if self._parts:  # members of the last input never came: they read other tensors
                self.enabled, self._x, self._parts = False, None, {}
                return None
            self._x = x
            self._parts = {id(m): part for m, part in zip(self.members, input_side(self.members, x, mask))}
        out = self._parts.pop(id(member), None)
        if out is None:  # the same member twice on one tensor: not a shared-input group
            self.enabled, self._x, self._parts = False, None, {}
            return None
        if not self._parts:
            self._x = None  # every member served: hold no activations past this forward
        return out


class MoLALinear(nn.Module):
    """A frozen `nn.Linear` plus a mixture of LoRA experts with a trainable router."""

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int, *, alpha: float,
                 dropout: float, layer_index: int, state: RoutingState, init: str = "kaiming",
                 adapter_dtype: torch.dtype = torch.float32, module_kind: str = "", init_seed: int = 0) -> None:
        super().__init__()
        self.base_layer = base
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.scaling = alpha / rank
        self.layer_index = layer_index
        self.module_kind, self.init_seed = module_kind, init_seed
        self.state = state
        d_in, d_out = base.in_features, base.out_features
        device = base.weight.device
        # A: (experts, r, d_in); B: (d_out, experts, r) so both flatten to matmul operands as views.
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, num_experts, rank, device=device, dtype=adapter_dtype))
        self.router = nn.Parameter(torch.empty(num_experts, d_in, device=device, dtype=adapter_dtype))
        self.dropout_p = float(dropout)
        self.register_buffer("stat_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_weights", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_probs", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.active_experts, self.active_top_k = num_experts, top_k
        self.group: InputGroup | None = None  # set by MoLAModel for q/k/v and gate/up
        self.dropout_key = _stable_key(f"{layer_index}|{module_kind}")  # which slice of the dropout pool
        self.reset_parameters(init)

    def activate(self, experts: int | None = None, top_k: int | None = None) -> None:
        """Use only the first `experts` experts (router softmax over their logits, top-`top_k` of them),
        as a one-shot supernet's sub-network does; None restores all experts and the module's own top-k.

        Expert e of this module is the same tensor whatever `experts` is, and a standalone layer with
        `experts` experts built from the same init seed starts from the very same weights, so a masked
        layer computes what that standalone layer would with these weights.
        """
        n = self.num_experts if experts is None else int(experts)
        k = min(self.top_k, n) if top_k is None else int(top_k)
        if not 1 <= n <= self.num_experts:
            raise ValueError(f"`experts` {n} is outside 1..{self.num_experts} (this module's experts)")
        if not 1 <= k <= n:
            raise ValueError(f"`top_k` {k} is outside 1..{n} (the active experts)")
        self.active_experts, self.active_top_k = n, k

    def reset_parameters(self, init: str = "kaiming") -> None:
        """LoRA's init: A random, B zero, so the adapted model starts equal to the base model.

        Expert e's A and its router row come from generators keyed by (init_seed, layer,
        module kind, e) and drawn on the CPU: the same expert starts the same whatever the
        layer's expert count, the global RNG state or the device.
        """
        with torch.no_grad():
            for e in range(self.num_experts):  # init only, not the hot path
                a = torch.empty(self.lora_A.shape[1:], dtype=torch.float32)
                gen = expert_generator(self.init_seed, self.layer_index, self.module_kind, e, "A")
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / self.rank, generator=gen)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                self.lora_A[e].copy_(a)
                row = torch.empty(1, self.router.shape[1], dtype=torch.float32)
                gen = expert_generator(self.init_seed, self.layer_index, self.module_kind, e, "router")
                nn.init.kaiming_uniform_(row, a=math.sqrt(5), generator=gen)
                self.router[e].copy_(row[0])
            self.lora_B.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities (fp32 softmax over the active experts) and dense gates with renormalised
        top-k weights."""
        return self._gates(F.linear(x, self.router[:self.active_experts].to(x.dtype)))

    def _gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In (experts, tokens) layout: a softmax over a short last dimension (N of 1-8 experts) runs an order of
        # magnitude slower on a CPU than over the first, with the tokens contiguous (benchmarks/bench_ops.py).
        probs = logits.reshape(-1, logits.shape[-1]).t().float().contiguous().softmax(dim=0)
        top_w, top_i = probs.topk(self.active_top_k, dim=0)
        top_w = top_w / top_w.sum(dim=0, keepdim=True)
        gates = torch.zeros_like(probs).scatter(0, top_i, top_w)
        return probs.t().reshape(logits.shape), gates.t().reshape(logits.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, r = self.active_experts, self.rank  # a supernet's sub-network uses the first e experts
        mask = (self.state.dropout.mask(x, self.dropout_p, self.dropout_key)
                if self.training and self.dropout_p > 0 else None)
        group = self.group if self.group is not None and self.group.enabled and self.state.fuse_groups else None
        parts = group.parts(self, x, mask) if group is not None else None
        result, logits, hidden = parts if parts is not None else input_side([self], x, mask)[0]
        probs, gates = self._gates(logits)
        if self.training or self.state.collect_stats:
            self._record(probs, gates)
        dtype = hidden.dtype  # what input_side computed in: compute_dtype(x)
        lora_b = (self.lora_B if e == self.num_experts else self.lora_B[:, :e]).reshape(-1, e * r).to(dtype)
        weights = (gates * self.scaling).to(dtype)  # the LoRA scaling folded into the (tokens x experts) gates
        if result is None:  # a base that is not a plain nn.Linear: its own forward, its output left untouched
            result = self.base_layer(x).reshape(-1, lora_b.shape[0]).to(dtype, copy=True)
        return _OutputSide.apply(result, hidden, weights, lora_b).view(*x.shape[:-1], lora_b.shape[0])

    def _record(self, probs: torch.Tensor, gates: torch.Tensor) -> None:
        """Balance-loss sums (training) and selection statistics (on demand), padding excluded.

        The one exception is the "official" balance loss, which counts every position as the
        official code does (it never sees the attention mask).
        """
        mask = self.state.token_mask
        e = self.active_experts  # balance and statistics over the active experts only
        all_p = probs.reshape(-1, e)
        chosen = (gates.reshape(-1, e) > 0).to(all_p.dtype)
        if mask is not None and mask.numel() == all_p.shape[0]:
            m = mask.reshape(-1, 1).to(all_p.dtype)
            flat_p = torch.where(m > 0, all_p, 0.0)  # padding rows must not leak NaN/inf into the sums
        else:  # no mask, or one that does not describe these positions: all are real tokens
            m = torch.ones_like(all_p[:, :1])
            flat_p = all_p
        if self.training:
            if self.state.balance_loss == OFFICIAL:
                term = BalanceTerm(self.layer_index, chosen.sum(0), all_p.sum(0),
                                   all_p.new_tensor(float(all_p.shape[0])), self.active_top_k)
            else:
                term = BalanceTerm(self.layer_index, (chosen * m).sum(0), flat_p.sum(0), m.sum(), self.active_top_k)
            if self.state.recording:
                self.state.balance_terms.append(term)
        if self.state.collect_stats and self.state.recording:
            with torch.no_grad():
                self.stat_counts[:e] += (chosen * m).sum(0).double()
                self.stat_weights[:e] += (gates.reshape(-1, e).float() * m).sum(0).double()
                self.stat_probs[:e] += (flat_p.float() * m).sum(0).double()  # full softmax: P_i of the balance loss
                self.stat_tokens += m.sum().double()

    def reset_stats(self) -> None:
        self.stat_counts.zero_()
        self.stat_weights.zero_()
        self.stat_probs.zero_()
        self.stat_tokens.zero_()

    def expert_deltas(self) -> torch.Tensor:
        """Each expert's weight update B_e A_e * scaling, shape (experts, d_out, d_in); for analysis."""
        b = self.lora_B.detach().permute(1, 0, 2)  # (experts, d_out, r)
        return torch.bmm(b, self.lora_A.detach()) * self.scaling

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, scaling={self.scaling:g}")


def expert_generator(seed: int, layer: int, module: str, expert: int, part: str) -> torch.Generator:
    """A CPU generator keyed by (seed, layer, module kind, expert, part), stable across processes."""
    return torch.Generator().manual_seed(_stable_key(f"{seed}|{layer}|{module}|{expert}|{part}"))


def _stable_key(text: str) -> int:
    """A 63-bit integer from `text`, the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss generalised to top-k: N * sum_i f_i * P_i.

    f_i is the fraction of (token, slot) assignments that went to expert i (so the
    f_i sum to 1 for any k) and P_i the mean router probability of expert i, both
    over real tokens.  A perfectly balanced router gives exactly 1.
    """
    return switch_loss((chosen * mask).sum(0), (probs * mask).sum(0), mask.sum(), top_k)


def switch_loss(selected: torch.Tensor, prob_sum: torch.Tensor, tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """`load_balancing_loss` from per-expert sums over `tokens` positions: f_i = selected_i / (tokens * k),
    P_i = prob_sum_i / tokens. Sums of several modules give the loss of their pooled tokens."""
    tokens = tokens.clamp_min(1.0)
    return selected.numel() * ((selected / (tokens * top_k)) * (prob_sum / tokens)).sum()


def balance_loss(terms: Sequence[BalanceTerm], formulation: str) -> torch.Tensor | None:
    """The load-balancing loss of one forward from its layers' `BalanceTerm`s (None when there are none).

    * "per-module": `switch_loss` of every adapted linear, averaged over the linears.
    * "official" (alias "mola-official"): as GCYZSL/MoLA's `load_balancing_loss_func`: the modules of one
      decoder layer pooled into one group (their selections and probabilities summed; they share the
      layer's expert count and top-k), one `switch_loss` per layer, summed over the layers.
    """
    if not terms:
        return None
    if canonical_balance_loss(formulation) == PER_MODULE:
        return torch.stack([switch_loss(t.selected, t.prob_sum, t.tokens, t.top_k) for t in terms]).mean()
    layers: dict[int, list[BalanceTerm]] = defaultdict(list)
    for t in terms:
        layers[t.layer].append(t)
    return torch.stack([switch_loss(torch.stack([t.selected for t in group]).sum(0),
                                    torch.stack([t.prob_sum for t in group]).sum(0),
                                    torch.stack([t.tokens for t in group]).sum(), group[0].top_k)
                        for group in layers.values()]).sum()
