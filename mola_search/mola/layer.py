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

One autograd function carries the work of every adapted linear that reads one input (q/k/v; gate/up; o and
down alone): `_Adapters` (base outputs, routers and A's as one or two matmuls, the routing of the linears
together, the gated experts added in place, the balance loss's sums; one input-gradient buffer in backward).
Its backward is checked against numerical differentiation in `tests/test_mola_layer.py`.
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
    keep-bits (an integer as wide as the input's dtype: all bits set where an element is kept, none where
    it is dropped; `keep` applies them); a linear's mask is a slice of it at an offset that is a hash of
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

    Bits rather than keep-multipliers (0 or 1/(1-p)) because applying them is an integer AND: a bf16
    multiply runs at a third of the speed on a CPU (`benchmarks/bench_ops.py`), and the dropped input is
    formed three times a step (forward, and again in backward with the masked input gradient). The scale
    1/(1-p) is the caller's: MoLA folds it into the gates.
    """

    def __init__(self, width: int = 0) -> None:
        self.width = width
        self._pool: torch.Tensor | None = None
        self._pool_p = 0.0
        self._key = 0
        self._fresh = True
        self._last: tuple[torch.Tensor, float, torch.dtype, torch.Tensor] | None = None  # (input, p, dtype, mask)

    def new_forward(self) -> None:
        self._fresh, self._last = True, None

    def release(self) -> None:
        """Forget the last input a mask was cut for (MoLAModel calls it after each forward): the pool stays for a
        checkpointed layer's replay, the activation is not held until the next step."""
        self._last = None

    def mask(self, x: torch.Tensor, p: float, key: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The keep-bits of dropout with probability `p` on `x` (x's shape; an integer type as wide as `dtype`,
        by default x's), as in training mode; `key` picks the slice. The same tensor `x` gets the same mask again."""
        bits = _BITS[(dtype or x.dtype).itemsize]
        last = self._last
        if last is not None and last[0] is x and last[1] == p and last[2] == bits:
            return last[3]
        n = x.numel()
        pool = self._pool
        if (self._fresh or pool is None or pool.numel() < 2 * n or pool.dtype != bits
                or pool.device != x.device or self._pool_p != p):
            rows = n // x.shape[-1] if x.dim() and x.shape[-1] else n
            size = max(2 * n, 2 * rows * self.width)  # every input of this forward fits: one draw per forward
            self._pool, self._pool_p, self._fresh = _keep_bits(size, p, bits, x.device), p, False
            self._key = int(torch.randint(0, 2**62, ()))  # the CPU generator: no device sync
            pool = self._pool
        offset = _mix(self._key ^ key) % (pool.numel() - n + 1)
        mask = pool[offset:offset + n].view(x.shape)
        self._last = (x, p, bits, mask)
        return mask

    def apply(self, x: torch.Tensor, p: float, key: int = 0) -> torch.Tensor:
        """`x` with dropout probability `p` (scaled by 1/(1-p)), as in training mode; `key` picks the slice."""
        return keep(x, self.mask(x, p, key)) * (1.0 / (1.0 - p))


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_bits(size: int, p: float, bits: torch.dtype, device: torch.device) -> torch.Tensor:
    """`size` keep-bits of dropout probability `p`, each kept with probability 1 - p (p rounded to a multiple of
    2^-16), independently: four uniform 16-bit integers per 64-bit random draw, compared with a threshold (a
    quarter of the draws `torch.rand` would make, and integer work)."""
    draws = torch.randint(-2**63, 2**63 - 1, ((size + 3) // 4,), dtype=torch.int64, device=device)
    kept = draws.view(torch.int16)[:size] >= -2**15 + round(p * 2**16)
    return kept.to(bits).neg_()  # 1 -> -1: all bits set


def keep(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`x` where the keep-bits `bits` (a `DropoutPool.mask`, as wide as x's dtype) keep it, +0 where they drop
    it (unscaled): an integer AND of x's bits."""
    return torch.bitwise_and(x.view(bits.dtype), bits).view(x.dtype)


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

    _rows: tuple | None = field(default=None, repr=False)  # token_rows' last answer, with what it was for

    def __post_init__(self) -> None:
        self.balance_loss = canonical_balance_loss(self.balance_loss)  # "mola-official" -> "official"

    def token_rows(self, rows: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Which of a forward's `rows` flattened positions are real tokens, as a bool (1, 1, rows) row (None: all
        of them, when there is no token mask or it does not describe these positions), and their count (float32):
        worked out once per forward, not per adapted linear."""
        mask, last = self.token_mask, self._rows
        if last is not None and last[0] is mask and last[1] == rows and last[2] == device:
            return last[3], last[4]
        if mask is not None and mask.numel() == rows:
            keep = mask.reshape(1, 1, rows).to(device) > 0
            count = keep.sum(dtype=torch.float32)
        else:
            keep, count = None, torch.tensor(float(rows), device=device)
        self._rows = (mask, rows, device, keep, count)
        return keep, count


class _Plan:
    """What one `_Adapters` call computes besides its tensors, and what its forward counted (`selected`, `tallies`).

    Members sharing (active experts, top-k, rank, scaling), which a decoder layer's linears do, form one block:
    their routing runs as one softmax, top-k and scatter over an (members, experts, tokens) stack.
    """

    __slots__ = ("experts", "totals", "ranks", "top_k", "scaling", "blocks", "rows", "balance", "official",
                 "stats", "selected", "tallies")

    def __init__(self, members: Sequence["MoLALinear"], rows: torch.Tensor | None, balance: bool, stats: bool,
                 dropout: float = 0.0) -> None:
        self.experts = tuple(m.active_experts for m in members)
        self.totals = tuple(m.num_experts for m in members)
        self.ranks = tuple(m.rank for m in members)
        self.top_k = tuple(m.active_top_k for m in members)
        self.scaling = tuple(m.scaling / (1.0 - dropout) for m in members)  # dropout's 1/(1-p) folded into the gates
        self.blocks: list[tuple[int, int]] = []  # (first, last + 1) member of each block
        for i in range(len(members)):
            if self.blocks and self._key(i) == self._key(self.blocks[-1][0]):
                self.blocks[-1] = (self.blocks[-1][0], i + 1)
            else:
                self.blocks.append((i, i + 1))
        self.rows = rows  # bool (1, 1, tokens): the real tokens; None: all positions count
        self.balance = balance  # training: the balance loss's sums are outputs (its prob sums differentiable)
        self.official = balance and canonical_balance_loss(members[0].state.balance_loss) == OFFICIAL
        self.stats = stats
        self.selected: list[torch.Tensor] = []  # per member (experts,): selections for the balance loss
        self.tallies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per member, for the statistics

    def _key(self, i: int) -> tuple:
        return self.experts[i], self.ranks[i], self.top_k[i], self.scaling[i]


class _Adapters(torch.autograd.Function):
    """Every adapted linear that reads one input `x` (q/k/v, gate/up, or one linear alone), whole, as one autograd node:
    each member's frozen base output x W^T + b, its router's top-k routing and its gated experts added in place,
    result_i = x W_i^T + b_i + ((x * mask) A_i^T * gates_i) B_i^T, with every member's routers and A's stacked
    into one (or, with dropout, two) matmuls and the routing of a block of members run as one.

    Autograd would record some fifty small operations per linear (the master weights' casts and slices, softmax,
    top-k, scatter, gate expansion, the balance sums, and their backward nodes), each paying dispatch costs larger
    than its arithmetic on 2048 x 5 tensors; here the forward runs them unrecorded and the backward is written out.
    It also accumulates the input gradient in one buffer (`addmm_`, `addcmul_` for the masked part), recomputes
    x * mask instead of keeping it, forms weight gradients as g^T x with the thin g^T made contiguous (x^T g, the
    large x transposed, is slower on a CPU), multiplies gates expanded to the hidden width (a bf16 multiply
    broadcast over the rank is slower), routes over (experts, tokens) with the tokens contiguous (a softmax over a
    last dimension of 5 is slower; all timed by benchmarks/bench_ops.py), and adds the experts inside the B matmul.

    The fp32 master weights are cast to x's dtype here (routers and A's straight into the stacked operand), and the
    gradients returned in the masters' dtype, full size when a supernet's sub-network uses the first experts only.

    apply(x (tokens x d_in), mask (x's shape: `DropoutPool` keep-bits, the scale 1/(1-p) in the plan's scaling) or None,
          plan (`_Plan`),
          then per member: router, lora_A, lora_B, W, b, result)
      -> (output 1, ..., output n, and in training the balance loss's prob sums (experts,) 1, ..., n)
    `result` is None for a plain `nn.Linear` base (computed here from W and b); otherwise the base's own output,
    (tokens x d_out) in x's dtype, which is modified in place and returned.
    """

    @staticmethod
    def forward(ctx, x, mask, plan, *tensors):
        routers, lora_as, lora_bs, weights, biases, results = (tensors[i::6] for i in range(6))
        n, d, dtype = len(routers), x.shape[1], x.dtype
        es, rs = plan.experts, plan.ranks
        ne, widths = sum(es), [e * r for e, r in zip(es, rs)]
        w_in = torch.cat([p[:e] for p, e in zip(routers, es)] + [a[:e].reshape(-1, d) for a, e in zip(lora_as, es)],
                         out=x.new_empty(ne + sum(widths), d))  # cast straight into the stacked operand
        lora_b = [b[:, :e].to(dtype).view(b.shape[0], w) for b, e, w in zip(lora_bs, es, widths)]
        plain = results[0] is None
        outs = [F.linear(x, w, b) for w, b in zip(weights, biases)] if plain else list(results)
        if mask is None:  # routers and A's read the same tensor: one matmul
            both = F.linear(x, w_in)
            logits, hidden = both[:, :ne], both[:, ne:]
        else:
            logits, hidden = F.linear(x, w_in[:ne]), F.linear(keep(x, mask), w_in[ne:])
        tokens, fp = x.shape[0], torch.promote_types(dtype, torch.float32)  # routing in fp32 (fp64 for fp64)
        wexp = x.new_empty(tokens, sum(widths))  # each token's scaled gates repeated over each expert's rank
        routed, prob_sums = [], []
        plan.selected, plan.tallies = [], []
        for i0, i1 in plan.blocks:
            nb, e, r, k, scale = i1 - i0, es[i0], rs[i0], plan.top_k[i0], plan.scaling[i0]
            c0, w0 = sum(es[:i0]), sum(widths[:i0])
            probs, top_i, top_w, total, gates = _route(logits[:, c0:c0 + nb * e], nb, k, fp)
            wexp[:, w0:w0 + nb * e * r].view(tokens, nb, e, r).copy_(
                (gates * scale).permute(2, 0, 1).unsqueeze(-1).expand(tokens, nb, e, r))
            routed += [probs, top_i, top_w, total]
            _tally(plan, probs, gates, prob_sums)
        gated = hidden * wexp
        w0 = 0
        for out, b, w in zip(outs, lora_b, widths):
            out.addmm_(gated[:, w0:w0 + w], b.t())
            w0 += w
        if not plain:
            ctx.mark_dirty(*results)
        ctx.plan, ctx.plain = plan, plain
        ctx.masters = [tuple((p.shape, p.dtype) for p in ps) for ps in zip(routers, lora_as, lora_bs)]
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(x, mask, w_in, hidden, wexp, gated, *weights, *lora_b, *routed)
        return (*outs, *prob_sums)

    @staticmethod
    def backward(ctx, *grads):
        plan, plain = ctx.plan, ctx.plain
        x, mask, w_in, hidden, wexp, gated, *rest = ctx.saved_tensors
        n = len(plan.experts)
        weights, lora_b, routed = rest[:n], rest[n:2 * n], rest[2 * n:]
        need = ctx.needs_input_grad[3:]  # per member: router, lora_A, lora_B, W, b, result
        es, rs = plan.experts, plan.ranks
        ne, widths = sum(es), [e * r for e, r in zip(es, rs)]
        tokens = x.shape[0]
        g_outs = grads[:n]
        g_gated = [g @ b if g is not None else x.new_zeros(tokens, w) for g, b, w in zip(g_outs, lora_b, widths)]
        g_gated = torch.cat(g_gated, dim=1) if n > 1 else g_gated[0]
        gated_t = gated.t().contiguous()
        g_adapter = x.new_empty(tokens, ne + sum(widths))  # (router logits, hidden): both gradients, side by side
        g_logits, g_hidden = g_adapter[:, :ne], g_adapter[:, ne:]
        torch.mul(g_gated, wexp, out=g_hidden)
        g_prod = g_gated * hidden
        g_sums = grads[n:] if plan.balance else ()
        for j, (i0, i1) in enumerate(plan.blocks):
            nb, e, r, scale = i1 - i0, es[i0], rs[i0], plan.scaling[i0]
            c0, w0 = sum(es[:i0]), sum(widths[:i0])
            probs, top_i, top_w, total = routed[4 * j:4 * j + 4]
            g_w = g_prod[:, w0:w0 + nb * e * r].view(tokens, nb * e, r).sum(-1)  # d loss / d scaled gates
            g_sum = None
            if g_sums and any(g is not None for g in g_sums[i0:i1]):  # the balance loss's prob sums
                g_sum = torch.stack([g if g is not None else probs.new_zeros(e) for g in g_sums[i0:i1]]).unsqueeze(-1)
            rows = None if plan.official else plan.rows
            g_logit = _route_backward(g_w, g_sum, rows, probs, top_i, top_w, total, scale)
            g_logits[:, c0:c0 + nb * e].copy_(g_logit.view(nb * e, tokens).t())
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask is not None:  # the masked part first, masked in place: the buffer the rest is added into
                grad_x = g_hidden @ w_in[ne:]
                grad_x.view(mask.dtype).bitwise_and_(mask)
            for g, w in zip(g_outs, weights):
                if plain and g is not None:
                    grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            if mask is None:
                grad_x = g_adapter @ w_in if grad_x is None else grad_x.addmm_(g_adapter, w_in)
            else:
                grad_x.addmm_(g_logits, w_in[:ne])
        if mask is None:
            g_in = g_adapter.t().contiguous() @ x  # (routers and A's stacked, d_in)
        else:
            g_in = torch.cat((g_logits.t().contiguous() @ x, g_hidden.t().contiguous() @ keep(x, mask)))
        out = []
        c0, w0 = 0, ne
        for i, (e, w, g) in enumerate(zip(es, widths, g_outs)):
            need_r, need_a, need_b, need_w, need_bias, need_result = need[6 * i:6 * i + 6]
            (r_shape, r_dtype), (a_shape, a_dtype), (b_shape, b_dtype) = ctx.masters[i]
            grad_r = _master_grad(g_in[c0:c0 + e], r_shape, r_dtype) if need_r else None
            grad_a = _master_grad(g_in[w0:w0 + w].view(e, *a_shape[1:]), a_shape, a_dtype) if need_a else None
            grad_b = None
            if need_b:
                g_b = (gated_t[w0 - ne:w0 - ne + w] @ g).t() if g is not None else lora_b[i].new_zeros(lora_b[i].shape)
                grad_b = _master_grad(g_b.view(b_shape[0], e, b_shape[2]), b_shape, b_dtype, dim=1)
            grad_w = g.t() @ x if need_w and g is not None else None
            grad_bias = g.sum(0) if ctx.has_bias[i] and need_bias and g is not None else None
            out += [grad_r, grad_a, grad_b, grad_w, grad_bias, g if need_result else None]
            c0, w0 = c0 + e, w0 + w
        return (grad_x, None, None, *out)


def _route(logits: torch.Tensor, members: int, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Top-k routing of a block of members from their logits (tokens, members * experts), in `dtype`, over
    (members, experts, tokens) with the tokens contiguous: probabilities (full softmax), the top-k's indices,
    their renormalised weights and the sums they were divided by, and the dense gates (zero where unselected)."""
    tokens = logits.shape[0]
    probs = logits.t().to(dtype, memory_format=torch.contiguous_format).view(members, -1, tokens).softmax(1)
    top_w, top_i = probs.topk(top_k, dim=1)
    total = top_w.sum(1, keepdim=True)
    top_w.div_(total)
    gates = torch.zeros_like(probs).scatter_(1, top_i, top_w)
    return probs, top_i, top_w, total, gates


def _route_backward(g_weights: torch.Tensor, g_sum: torch.Tensor | None, rows: torch.Tensor | None,
                    probs: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, total: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """`_route`'s backward: the logits' gradient (members, experts, tokens) from the gradients of the scaled gates
    (`g_weights`: tokens, members * experts) and of the balance loss's prob sums (`g_sum`: members, experts, 1,
    summed over the `rows` that are real tokens; None: no gradient)."""
    g_gates = g_weights.t().to(probs.dtype, memory_format=torch.contiguous_format).view(probs.shape).mul_(scale)
    g_top = g_gates.gather(1, top_i)  # through the renormalised top-k weights w_i / sum_j w_j
    g_top = g_top.sub_((g_top * top_w).sum(1, keepdim=True)).div_(total)
    g_probs = torch.zeros_like(probs).scatter_(1, top_i, g_top)
    if g_sum is not None:
        g_probs.add_(g_sum if rows is None else torch.where(rows, g_sum, 0.0))
    return torch._softmax_backward_data(g_probs, probs, 1, probs.dtype)


def _tally(plan: _Plan, probs: torch.Tensor, gates: torch.Tensor, prob_sums: list[torch.Tensor]) -> None:
    """The balance loss's per-expert sums of one block (probs, gates: (members, experts, tokens)), and the
    statistics' when asked, each member's own: `plan.selected`, `plan.tallies` and `prob_sums` (differentiable)."""
    rows = plan.rows
    chosen = gates > 0
    if plan.balance:
        if plan.official or rows is None:  # the official code counts every position
            selected, prob_sum = chosen.sum(-1, dtype=probs.dtype), probs.sum(-1)
        else:  # padding rows must not leak NaN/inf into the sums
            selected, prob_sum = (chosen & rows).sum(-1, dtype=probs.dtype), torch.where(rows, probs, 0.0).sum(-1)
        plan.selected += selected.unbind(0)
        prob_sums += prob_sum.unbind(0)
    if plan.stats:
        kept = chosen if rows is None else chosen & rows
        masked_g, masked_p = (gates, probs) if rows is None else (torch.where(rows, gates, 0.0),
                                                                  torch.where(rows, probs, 0.0))
        plan.tallies += zip(kept.sum(-1, dtype=probs.dtype).unbind(0), masked_g.sum(-1).unbind(0),
                            masked_p.sum(-1).unbind(0))


def _master_grad(grad: torch.Tensor, shape: torch.Size, dtype: torch.dtype, dim: int = 0) -> torch.Tensor:
    """`grad`, the gradient of a master parameter's active experts (its first entries along `dim`), as the
    parameter's: its dtype, contiguous, full size with zeros for the experts a sub-network leaves out."""
    if grad.shape[dim] == shape[dim]:
        return grad.to(dtype, memory_format=torch.contiguous_format)
    full = grad.new_zeros(shape, dtype=dtype)
    full.narrow(dim, 0, grad.shape[dim]).copy_(grad)
    return full


def adapted(members: Sequence["MoLALinear"], x: torch.Tensor, mask: torch.Tensor | None,
            p: float = 0.0) -> list[torch.Tensor]:
    """The outputs of `members` (adapted linears that all read `x`), flattened to (tokens, d_out): one `_Adapters`
    call; `mask` is the keep-bits of a dropout with probability `p` on `x` (a `DropoutPool.mask` as wide as the
    compute dtype; None: no dropout). In training it records each member's `BalanceTerm`, and when asked, its
    selection statistics.

    A member whose base is not a plain `nn.Linear` (a quantised layer, say) calls its own base, here; then every
    member does.
    """
    state, lead = members[0].state, members[0]
    dtype = compute_dtype(x)  # the base's dtype, or autocast's; fp32 master weights are cast to it
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    mask2 = None if mask is None else mask.reshape(x2.shape)
    rows, tokens = state.token_rows(x2.shape[0], x2.device)
    recording = state.recording
    plan = _Plan(members, rows, balance=lead.training, stats=state.collect_stats and recording,
                 dropout=0.0 if mask is None else p)
    plain = all(type(m.base_layer) is nn.Linear for m in members)
    tensors = []
    for m in members:
        base = m.base_layer
        result = None if plain else base(x).reshape(-1, base.out_features).to(dtype, copy=True)
        weight = base.weight.to(dtype) if plain else None
        bias = base.bias.to(dtype) if plain and base.bias is not None else None
        tensors += [m.router, m.lora_A, m.lora_B, weight, bias, result]
    outs = _Adapters.apply(x2, mask2, plan, *tensors)
    n = len(members)
    if plan.balance and recording:
        counted = x2.new_tensor(float(x2.shape[0]), dtype=torch.float32) if plan.official else tokens
        state.balance_terms += [BalanceTerm(m.layer_index, s, p, counted, m.active_top_k)
                                for m, s, p in zip(members, plan.selected, outs[n:])]
    if plan.stats:
        with torch.no_grad():
            for m, (count, weight_sum, prob_sum) in zip(members, plan.tallies):
                e = m.active_experts
                m.stat_counts[:e] += count.double()
                m.stat_weights[:e] += weight_sum.double()
                m.stat_probs[:e] += prob_sum.double()  # full softmax: P_i of the balance loss
                m.stat_tokens += tokens.double()
    return list(outs[:n])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear computes in on `x`: autocast's where it is on (a CUDA forward of the trainer), else x's.

    The autograd functions above take their inputs already in this dtype: autocast would cast their forward's
    matmuls but not the in-place `addmm_`, nor anything in their backward."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class InputGroup:
    """Adapted linears of one decoder layer that read the same input tensor (q/k/v; gate/up).

    The first member called with a tensor computes for all (`adapted`: one `_Adapters` node, routers and A's
    stacked into one or two matmuls, the routing of all members at once) and each member takes its output.
    Mathematically this is each member's own computation; on a CPU it replaces 4-6 skinny matmuls, their backward
    and the accumulation of as many input gradients by one or two. A member called with another tensor than its
    group's (an architecture whose projections read different inputs) switches the group off for good and every
    member computes alone.
    """

    def __init__(self, members: Sequence["MoLALinear"]) -> None:
        self.members = list(members)
        self.enabled = len(self.members) > 1
        self._x: torch.Tensor | None = None
        self._outs: dict[int, torch.Tensor] = {}

    def output(self, member: "MoLALinear", x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """`member`'s output for input `x` (flattened to (tokens, d_out)), or None when the group cannot serve;
        `mask`: `member`'s dropout keep-bits for `x`, which all members use."""
        if self._x is not x:
            if self._outs:  # members of the last input never came: they read other tensors
                self.enabled, self._x, self._outs = False, None, {}
                return None
            self._x = x
            self._outs = {id(m): out for m, out in zip(self.members, adapted(self.members, x, mask, member.dropout_p))}
        out = self._outs.pop(id(member), None)
        if out is None:  # the same member twice on one tensor: not a shared-input group
            self.enabled, self._x, self._outs = False, None, {}
            return None
        if not self._outs:
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
        top-k weights, each shaped as x with the experts last: the training path's `_route`, for analysis."""
        logits = F.linear(x, self.router[:self.active_experts].to(x.dtype))
        flat = logits.reshape(-1, logits.shape[-1])
        probs, _, _, _, gates = _route(flat, 1, self.active_top_k, torch.float32)
        return probs[0].t().reshape(logits.shape), gates[0].t().reshape(logits.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (self.state.dropout.mask(x, self.dropout_p, self.dropout_key, compute_dtype(x))
                if self.training and self.dropout_p > 0 else None)
        group = self.group if self.group is not None and self.group.enabled and self.state.fuse_groups else None
        out = group.output(self, x, mask) if group is not None else None
        if out is None:
            out = adapted([self], x, mask, self.dropout_p)[0]
        return out.view(*x.shape[:-1], out.shape[-1])

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

    Terms of one expert count and top-k are stacked and computed together (a forward records 7 per decoder layer).
    """
    if not terms:
        return None
    stacks: dict[tuple[int, int], list[BalanceTerm]] = defaultdict(list)
    for t in terms:
        stacks[(t.selected.numel(), t.top_k)].append(t)
    official = canonical_balance_loss(formulation) != PER_MODULE
    total = None
    for (experts, top_k), group in stacks.items():
        selected = torch.stack([t.selected for t in group])
        prob_sum = torch.stack([t.prob_sum for t in group])
        tokens = torch.stack([t.tokens for t in group]).unsqueeze(-1)
        if official:  # one pool per decoder layer
            layers = sorted({t.layer for t in group})
            if len(layers) < len(group):
                index = torch.tensor([layers.index(t.layer) for t in group], device=selected.device)
                pool = lambda v: v.new_zeros(len(layers), v.shape[1]).index_add_(0, index, v)  # noqa: E731
                selected, prob_sum, tokens = pool(selected), pool(prob_sum), pool(tokens)
        tokens = tokens.clamp_min(1.0)
        part = experts * ((selected / (tokens * top_k)) * (prob_sum / tokens)).sum()
        total = part if total is None else total + part
    return total if official else total / len(terms)
