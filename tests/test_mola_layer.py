"""The MoLA adapter: vectorised forward vs the per-expert loop, balance loss, injection, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.mola import MoLAConfig, MoLALinear, MoLAModel, load_balancing_loss
from mola_search.mola.config import MOLA_OFFICIAL, PER_MODULE
from mola_search.mola.layer import RoutingState
from mola_search.models import tiny_llama
from reference_mola import reference_forward


def _layer(num_experts=5, top_k=2, rank=4, d_in=24, d_out=20, seed=0) -> MoLALinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True)
    base.requires_grad_(False)
    layer = MoLALinear(base, num_experts, top_k, rank, alpha=8.0, dropout=0.0, layer_index=0,
                       state=RoutingState())
    with torch.no_grad():  # non-zero B so every expert contributes
        layer.lora_B.normal_(std=0.5)
    return layer


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (2, 1), (5, 2), (8, 3), (4, 4)])
def test_vectorised_forward_and_grads_match_per_expert_loop(num_experts, top_k):
    layer = _layer(num_experts, top_k)
    x = torch.randn(3, 7, 24)
    fast = layer(x)
    (fast * torch.linspace(-1, 1, fast.shape[-1])).sum().backward()
    grads_fast = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)]
    layer.zero_grad()
    slow = reference_forward(layer, x)
    (slow * torch.linspace(-1, 1, slow.shape[-1])).sum().backward()
    grads_slow = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for gf, gs in zip(grads_fast, grads_slow):
        torch.testing.assert_close(gf, gs, atol=1e-5, rtol=1e-5)
    if top_k > 1:  # renormalised top-1 weights are always 1: then only the balance loss trains the router
        assert grads_fast[2].abs().sum() > 0


def test_unselected_experts_get_no_gradient():
    layer = _layer(num_experts=4, top_k=1)
    x = torch.randn(1, 1, 24)  # one token: exactly one expert chosen
    layer(x).sum().backward()
    touched = (layer.lora_B.grad.abs().sum(dim=(0, 2)) > 0).tolist()
    assert sum(touched) == 1


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    chosen = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # f = (3/4, 1/4), P = (0.6, 0.4): 2 * (0.75*0.6 + 0.25*0.4) = 1.1
    assert load_balancing_loss(probs, chosen, torch.ones(4, 1), top_k=1).item() == pytest.approx(1.1)
    # padding (last token) excluded: f = (2/3, 1/3), P = (0.5, 0.5) -> 1.0
    mask = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    assert load_balancing_loss(probs, chosen, mask, top_k=1).item() == pytest.approx(1.0)
    # perfectly balanced top-2 of 2 experts -> exactly 1
    assert load_balancing_loss(torch.full((3, 2), 0.5), torch.ones(3, 2), torch.ones(3, 1), 2).item() == pytest.approx(1.0)


def _config(layers: int, experts=2, **kw) -> MoLAConfig:
    return MoLAConfig(experts=(experts,) * layers, top_k=(1,) * layers, rank=(4,) * layers, lora_dropout=0.0, **kw)


def test_injection_freezes_base_and_adapts_every_target():
    base = tiny_llama(num_layers=3, hidden_size=32, vocab_size=128)
    model = MoLAModel(base, MoLAConfig(experts=(1, 2, 3), top_k=(1, 1, 2), rank=(2, 4, 8), lora_dropout=0.0))
    assert len(model.mola_layers) == 3 * 7
    per_layer = {j: {l.num_experts for l in model.mola_layers.values() if l.layer_index == j} for j in range(3)}
    assert per_layer == {0: {1}, 1: {2}, 2: {3}}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router")) for n in trainable)
    # hand count: sum over layers and the 7 projections of E*(r*(d_in+d_out)) + E*d_in
    cfg = base.config
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, cfg.intermediate_size), (32, cfg.intermediate_size),
              (cfg.intermediate_size, 32)]
    expected = sum(e * (r * (i + o) + i) for e, r in ((1, 2), (2, 4), (3, 8)) for i, o in shapes)
    assert model.num_trainable() == expected


def test_balance_loss_really_reaches_the_router():
    """At init B = 0, so the task loss cannot move the router: only the added balance loss can."""
    ids = torch.randint(0, 128, (2, 9))
    grads = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), _config(2, experts=3, aux_loss_coef=coef))
        model.train()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        loss = out.logits.float().logsumexp(-1).mean()
        aux = model.auxiliary_loss()
        (loss + aux if aux is not None else loss).backward()
        grads[coef] = sum(l.router.grad.abs().sum().item() for l in model.mola_layers.values() if l.router.grad is not None)
    assert grads[0.0] == 0.0
    assert grads[0.5] > 0.0


def test_save_load_reproduces_logits(tmp_path):
    torch.manual_seed(1)
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), _config(2, experts=3))
    for layer in model.mola_layers.values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    model.eval()
    ids = torch.randint(0, 128, (2, 6))
    before = model(input_ids=ids).logits
    model.save_adapter(tmp_path / "adapter", task="unit")
    reloaded = MoLAModel.from_pretrained(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), tmp_path / "adapter")
    reloaded.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before)
    assert MoLAConfig.load(tmp_path / "adapter").extra["task"] == "unit"


def test_router_stats_count_real_tokens_only():
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), _config(2, experts=3))
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    model.eval()
    with model.collecting_router_stats(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for row in model.router_stats():
        assert row["tokens"] == 7
        assert sum(row["counts"]) == 7 * row["top_k"]
        assert sum(row["share"]) == pytest.approx(1.0)
        assert sum(row["mean_weight"]) == pytest.approx(1.0)


def test_wrong_depth_and_missing_targets_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="allocation has 3 layers but the model has 2"):
        MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), _config(3))
    with pytest.raises(UserError, match="no linear module"):
        MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=128), _config(2, target_modules=("c_attn",)))
    with pytest.raises(UserError, match="not a MoLA adapter folder"):
        MoLAConfig.load(tmp_path)


# --- common random numbers ------------------------------------------------------------------


def _adapter(experts: tuple[int, ...], init_seed: int = 0) -> MoLAModel:
    base = tiny_llama(num_layers=len(experts), hidden_size=32, vocab_size=128)
    config = MoLAConfig(experts=experts, top_k=(1,) * len(experts), rank=(4,) * len(experts), init_seed=init_seed)
    return MoLAModel(base, config)


def test_experts_start_from_weights_keyed_by_seed_layer_module_and_index():
    """An allocation with more experts in a layer shares its first experts' initial weights with one with
    fewer, whatever the global RNG did in between: search trials compare allocations, not init draws."""
    torch.manual_seed(1)
    small = _adapter((2, 3))
    torch.manual_seed(2)
    large = _adapter((4, 3))
    for name, layer in small.mola_layers.items():
        other = large.mola_layers[name]
        n = layer.num_experts
        torch.testing.assert_close(layer.lora_A, other.lora_A[:n], rtol=0, atol=0)
        torch.testing.assert_close(layer.router, other.router[:n], rtol=0, atol=0)
    q0, k0 = small.mola_layers["model.layers.0.self_attn.q_proj"], small.mola_layers["model.layers.0.self_attn.k_proj"]
    assert not torch.equal(q0.lora_A[0], q0.lora_A[1])       # experts differ from one another
    assert not torch.equal(q0.lora_A[0, :, :16], k0.lora_A[0, :, :16])  # and from the same expert of another module
    reseeded = _adapter((2, 3), init_seed=7)
    assert not torch.equal(reseeded.mola_layers[next(iter(small.mola_layers))].lora_A,
                           small.mola_layers[next(iter(small.mola_layers))].lora_A)


def test_fused_projections_are_adapted_by_default():
    """A Phi-3-style model fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the default targets adapt
    every linear of every decoder layer, not only o_proj and down_proj."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0)
    base = Phi3ForCausalLM(config)
    model = MoLAModel(base, _config(2))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in model.mola_layers})
    assert kinds == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(model.mola_layers) == 2 * 4
    out = model(input_ids=torch.randint(0, 64, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.logits.shape == (2, 5, 64)


# --- dropout pool and low-precision compute -------------------------------------------------------


def test_dropout_pool_keeps_each_element_with_probability_1_minus_p_and_scales_it():
    from mola_search.mola.layer import DropoutPool, keep

    torch.manual_seed(0)
    pool, p = DropoutPool(), 0.2
    x = torch.ones(400, 500)
    dropped = pool.apply(x, p)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 200k draws: sd 0.0009
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / (1 - p)))
    # rows are not copies of each other (a slice of iid draws, not a repeated pattern)
    assert (kept[0] != kept[1]).any() and (kept[:, 0] != kept[:, 1]).any()
    bits = pool.mask(x, p)
    assert bits.dtype == torch.int32 and set(bits.unique().tolist()) == {0, -1}  # all bits set or none
    assert pool.mask(x, p, key=5) is bits  # the same input (q, k and v read one tensor): one shared mask
    assert torch.equal(keep(x, bits) != 0, kept)
    signed = torch.randn(400, 500)  # an AND of the bits: the element itself, or +0
    assert torch.equal(keep(signed, pool.mask(signed, p)), torch.where(pool.mask(signed, p) != 0, signed, 0.0))
    other = pool.apply(x.clone(), p, key=1)
    assert not torch.equal(other != 0, kept)  # another linear: another slice
    replay = pool.apply(x.clone(), p, key=0)
    assert torch.equal(replay, dropped)  # a checkpointed layer's replay in backward: the same mask
    pool.new_forward()
    again = pool.apply(x, p)
    assert not torch.equal(again != 0, kept)  # a new forward draws a new pool
    assert pool.mask(x, p, dtype=torch.bfloat16).dtype == torch.int16  # as wide as the dtype it computes in


def test_dropout_is_on_in_training_only_and_differs_between_forwards():
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=64),
                      MoLAConfig(experts=(2, 2), top_k=(1, 1), rank=(4, 4), lora_dropout=0.3))
    with torch.no_grad():
        for layer in model.mola_layers.values():
            layer.lora_B.normal_(std=0.5)
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, second)


def test_bf16_input_computes_the_adapter_in_bf16_close_to_fp32():
    layer = _layer(5, 2)
    x = torch.randn(3, 7, 24)
    exact = reference_forward(layer, x)
    layer.base_layer.to(torch.bfloat16)
    seen, linear, addmm_ = [], torch.nn.functional.linear, torch.Tensor.addmm_

    def recording(inp, weight, bias=None):
        seen.append((inp.dtype, weight.dtype))
        return linear(inp, weight, bias)

    def recording_addmm_(acc, mat1, mat2):
        seen.append((acc.dtype, mat1.dtype, mat2.dtype))
        return addmm_(acc, mat1, mat2)

    torch.nn.functional.linear, torch.Tensor.addmm_ = recording, recording_addmm_
    try:
        low = layer(x.to(torch.bfloat16))
    finally:
        torch.nn.functional.linear, torch.Tensor.addmm_ = linear, addmm_
    bf16 = torch.bfloat16
    assert seen == [(bf16, bf16)] * 2 + [(bf16, bf16, bf16)]  # base, router+A; B into the base output: no fp32 copy
    assert low.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32  # fp32 masters, bf16 compute
    torch.testing.assert_close(low.float(), exact, atol=0.1, rtol=0.05)
    low.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


def _adapters_case(formulation: str, plain: bool = True):
    """Three float64 members of one input for `_Adapters`: q and k form a block (4 experts, top-2), v another
    (a sub-network: 3 of its 5 experts, top-1); q's base is trainable and has a bias."""
    from mola_search.mola.layer import _Plan

    gen = torch.Generator().manual_seed(0)
    state = RoutingState(balance_loss=formulation)

    def member(d_out: int, experts: int, top_k: int, bias: bool, kind: str) -> MoLALinear:
        base = nn.Linear(5, d_out, bias=bias).double()
        base.requires_grad_(kind == "q")
        layer = MoLALinear(base, experts, top_k, 2, alpha=4.0, dropout=0.0, layer_index=0, state=state,
                           adapter_dtype=torch.float64, module_kind=kind)
        with torch.no_grad():
            for p in (layer.lora_B, layer.router, layer.lora_A):
                p.normal_(generator=gen)
        return layer

    members = [member(3, 4, 2, True, "q"), member(2, 4, 2, False, "k"), member(4, 5, 1, True, "v")]
    members[2].activate(3)
    rows = torch.tensor([False, True, True, True, True, True]).view(1, 1, 6)  # the first position is padding
    plan = _Plan(members, rows, balance=True, stats=False)
    assert plan.blocks == [(0, 2), (2, 3)]
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tensors = []
    for m in members:
        results = None if plain else torch.randn(6, m.base_layer.out_features, generator=gen, dtype=torch.float64,
                                                 requires_grad=True)
        tensors += [m.router, m.lora_A, m.lora_B, m.base_layer.weight if plain else None,
                    m.base_layer.bias if plain else None, results]
    return members, plan, x, tensors, gen


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("formulation", [PER_MODULE, MOLA_OFFICIAL])
def test_adapters_backward_is_the_gradient_of_its_forward(dropout, formulation):
    """`_Adapters` writes its own backward (routing, gates, the balance sums, one input-gradient buffer, recomputed
    dropout): check it against numerical differentiation, for two blocks of members, one of them a sub-network,
    one trainable base with a bias, padding left out of the balance sums and the mask of a dropout."""
    from mola_search.mola.layer import _Adapters, _Plan

    members, plan, x, tensors, gen = _adapters_case(formulation)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).long().neg() if dropout else None  # keep-bits of float64
    inputs = [x] + [t for t in tensors if t is not None]
    where = [i for i, t in enumerate(tensors) if t is not None]

    def run(x, *flat):
        full = list(tensors)
        for i, t in zip(where, flat):
            full[i] = t
        return _Adapters.apply(x, mask, _Plan(members, plan.rows, True, False, 0.3 if dropout else 0.0), *full)

    outs = run(*inputs)
    assert len(outs) == 6 and [o.shape for o in outs[3:]] == [(4,), (4,), (3,)]  # 3 outputs, 3 prob sums
    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_adapters_backward_with_bases_that_are_not_plain_linears():
    """The base outputs come in (a quantised base computed them) and are added to in place."""
    from mola_search.mola.layer import _Adapters, _Plan

    members, plan, x, tensors, _ = _adapters_case(PER_MODULE, plain=False)
    inputs = [x] + [t for t in tensors if t is not None]
    where = [i for i, t in enumerate(tensors) if t is not None]

    def run(x, *flat):
        full = list(tensors)
        for i, t in zip(where, flat):
            full[i] = t.clone() if i % 6 == 5 else t  # the base outputs are modified in place
        return _Adapters.apply(x, None, _Plan(members, plan.rows, True, False), *full)

    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_balance_loss_stacked_equals_term_by_term():
    """`balance_loss` stacks the terms of one expert count: the same loss as a switch loss per term (per module)
    or per decoder layer's pooled terms (official)."""
    from mola_search.mola.layer import BalanceTerm, balance_loss, switch_loss

    gen = torch.Generator().manual_seed(3)
    terms = [BalanceTerm(layer, torch.randint(0, 9, (e,), generator=gen).float(), torch.rand(e, generator=gen),
                         torch.tensor(7.0 + layer), k)
             for layer, e, k in ((0, 3, 1), (0, 3, 1), (1, 5, 2), (1, 5, 2), (1, 5, 2), (2, 3, 2))]
    by_term = torch.stack([switch_loss(t.selected, t.prob_sum, t.tokens, t.top_k) for t in terms]).mean()
    torch.testing.assert_close(balance_loss(terms, PER_MODULE), by_term)
    layers = {}
    for t in terms:
        layers.setdefault(t.layer, []).append(t)
    pooled = sum(switch_loss(sum(t.selected for t in g), sum(t.prob_sum for t in g), sum(t.tokens for t in g),
                             g[0].top_k) for g in layers.values())
    torch.testing.assert_close(balance_loss(terms, MOLA_OFFICIAL), pooled)


def test_a_base_that_is_not_a_plain_linear_is_called_and_trains_the_same():
    """A quantised base (any nn.Linear subclass) runs its own forward; outputs and gradients are unchanged."""
    class CustomLinear(nn.Linear):
        calls = 0

        def forward(self, x):
            CustomLinear.calls += 1
            return super().forward(x)

    def run(custom: bool):
        layer = _layer(4, 2)
        if custom:
            plain, layer.base_layer = layer.base_layer, CustomLinear(24, 20)
            layer.base_layer.load_state_dict(plain.state_dict())
            layer.base_layer.requires_grad_(False)
        layer.train()
        x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        out.pow(2).sum().backward()
        return out.detach(), x.grad, layer.lora_A.grad, layer.router.grad, layer.lora_B.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want)
    assert CustomLinear.calls == 1


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_an_fp32_base_under_autocast_computes_in_autocast_dtype_and_trains(dropout):
    """The trainer runs a CUDA forward under bf16 autocast, whatever the base's dtype; here the CPU's autocast
    stands in. The layer must compute in bf16 (as autocast would), backward included, and keep fp32 masters."""
    layer = _layer(4, 2)
    layer.dropout_p = dropout
    layer.train()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    for param in (layer.lora_A, layer.lora_B, layer.router):
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    if not dropout:
        torch.testing.assert_close(out.float(), reference_forward(layer, x).detach(), atol=0.1, rtol=0.05)


def _grads(model: MoLAModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("training", [True, False])
def test_shared_input_groups_compute_what_each_linear_computes_alone(training):
    """q/k/v and gate/up compute their routers and A's as one matmul: same outputs and gradients as
    every linear on its own (same dropout masks: the pool is drawn from the same seed)."""
    def run(fuse: bool):
        model = MoLAModel(tiny_llama(num_layers=3), MoLAConfig(experts=(3, 4, 2), top_k=(2, 2, 1), rank=(4, 4, 4),
                                                               lora_alpha=8.0, lora_dropout=0.1))
        with torch.no_grad():
            for layer in model.mola_layers.values():
                layer.lora_B.normal_(std=0.2, generator=torch.Generator().manual_seed(layer.layer_index))
        model.state.fuse_groups = fuse
        model.train(training)
        model.use_allocation(AllocationSpec.build([2, 4, 1], [1, 2, 1], 4))  # a sub-network: slices too
        torch.manual_seed(0)
        ids = torch.randint(3, 300, (2, 9))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = out.float().pow(2).mean() + (model.auxiliary_loss() if training else 0.0)
        loss.backward()
        groups = {id(l.group): l.group for l in model.mola_layers.values() if l.group is not None}
        return out.detach(), _grads(model), groups

    fused, fused_grads, groups = run(True)
    alone, alone_grads, _ = run(False)
    assert len(groups) == 6 and all(g.enabled for g in groups.values())  # q/k/v and gate/up of 3 layers
    assert sorted(len(g.members) for g in groups.values()) == [2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(fused, alone, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == alone_grads.keys() and fused_grads
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], alone_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_group_whose_members_read_different_inputs_falls_back_to_each_linear():
    model = MoLAModel(tiny_llama(num_layers=1), MoLAConfig(experts=(3,), top_k=(2,), rank=(4,), lora_alpha=8.0,
                                                           lora_dropout=0.0))
    q = model.mola_layers["model.layers.0.self_attn.q_proj"]
    k = model.mola_layers["model.layers.0.self_attn.k_proj"]
    with torch.no_grad():
        k.lora_B.normal_(std=0.5)
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    q(x1)
    got = k(x2)  # not the tensor q read: the group cannot serve it
    assert q.group.enabled is False
    model.state.fuse_groups = False
    torch.testing.assert_close(got, k(x2))


# --- activation checkpointing -------------------------------------------------------------------


def _checkpointed_step(checkpointing: bool, formulation: str, allocation: AllocationSpec | None = None):
    """Loss, adapter gradients, balance terms recorded and forward calls of one adapted linear, for one
    training step on a left-padded batch with dropout and the balance loss on."""
    base = tiny_llama(num_layers=3, hidden_size=32, vocab_size=64)
    model = MoLAModel(base, MoLAConfig(experts=(2, 3, 4), top_k=(1, 2, 2), rank=(4, 4, 4), lora_dropout=0.2,
                                       aux_loss_coef=0.05, balance_loss=formulation))
    with torch.no_grad():
        for layer in model.mola_layers.values():
            layer.lora_B.normal_(std=0.3, generator=torch.Generator().manual_seed(layer.dropout_key % 2**31))
    if checkpointing:
        model.activation_checkpointing_enable()
    model.use_allocation(allocation)
    calls = []
    first = next(iter(model.mola_layers.values()))
    first.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(7)
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the balance terms must leave these positions out in the replay too
    mask[2, :2] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    recorded = len(model.state.balance_terms)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads, recorded, len(model.state.balance_terms), len(calls)


@pytest.mark.parametrize("formulation", [PER_MODULE, MOLA_OFFICIAL])
def test_activation_checkpointing_trains_the_same_numbers(formulation):
    """A replayed layer must see the first pass's dropout masks and token mask, or its gradients differ;
    it must not add balance terms, or the next step's loss counts them twice."""
    loss, grads, recorded, after, calls = _checkpointed_step(False, formulation)
    loss_ck, grads_ck, recorded_ck, after_ck, calls_ck = _checkpointed_step(True, formulation)
    assert (calls, calls_ck) == (1, 2)  # the layer really ran again in backward
    assert recorded == recorded_ck == after_ck == 7 * 3  # one term per adapted linear: 7 kinds x 3 layers
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and any(k.endswith("router") for k in grads)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name
    assert all(g.abs().sum() > 0 for k, g in grads.items() if k.endswith(("router", "lora_A")))


def test_activation_checkpointing_replays_a_supernet_sub_network():
    allocation = AllocationSpec(experts=(1, 2, 3), top_k=(1, 1, 2), rank=(4, 4, 4))
    _, grads, *_ = _checkpointed_step(False, PER_MODULE, allocation)
    _, grads_ck, *_, calls = _checkpointed_step(True, PER_MODULE, allocation)
    assert calls == 2
    assert all(torch.equal(g, grads_ck[n]) for n, g in grads.items())


def test_reentrant_activation_checkpointing_is_refused():
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=64),
                      MoLAConfig(experts=(2, 2), top_k=(1, 1), rank=(4, 4)))
    with pytest.raises(UserError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    assert not model.base_model.is_activation_checkpointing
    model.gradient_checkpointing_enable()  # what transformers.Trainer calls
    assert model.base_model.is_activation_checkpointing and model.state.keep_token_mask
    model.activation_checkpointing_disable()
    assert not model.base_model.is_activation_checkpointing and not model.state.keep_token_mask


def test_activation_checkpointing_off_again_computes_no_embedding_gradient():
    """transformers' enable makes the embeddings' output require grad; off again, the first layer's input must not
    (bench_step's MoLA rows after its checkpointed variant computed that unused gradient every step)."""
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=64),
                      MoLAConfig(experts=(2, 2), top_k=(1, 1), rank=(4, 4)))
    seen = []
    first = model.base_model.model.layers[0]
    first.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True)
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids)
    model.activation_checkpointing_enable()
    model(input_ids=ids)
    model.activation_checkpointing_disable()
    model(input_ids=ids)
    assert seen == [False, True, False]


def test_a_training_forward_holds_no_activation_after_it():
    """Nothing of MoLA's keeps a layer's input once the forward is over (the dropout pool used to keep the last
    input it cut a mask for until the next step: one activation pinned in the heap between steps)."""
    import gc
    import weakref

    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=64),
                      MoLAConfig(experts=(2, 2), top_k=(1, 1), rank=(4, 4), lora_dropout=0.1))
    model.train()
    inputs = []
    for layer in model.mola_layers.values():
        layer.register_forward_pre_hook(lambda _m, args: inputs.append(weakref.ref(args[0])))
    with torch.no_grad():  # autograd saves nothing: only MoLA's own references could keep an input alive
        out = model(input_ids=torch.randint(0, 64, (2, 5)))
    del out
    gc.collect()
    assert inputs and all(ref() is None for ref in inputs)
