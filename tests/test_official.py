"""Exact compatibility with the official MoLA code (GCYZSL/MoLA): its balance loss, and the exported flags.

The official balance loss is checked two ways: against numbers computed by hand for pooled groups, and
against a transcription of the official `load_balancing_loss_func` run on the router logits a real forward
produced. The export is checked on study folders written here, with models described by their config alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mola_search.allocation import AllocationSpec, resolve_allocation, save_spec, to_mola_flags
from mola_search.cli.common import run_main
from mola_search.errors import UserError
from mola_search.mola import MoLAConfig, MoLALinear, MoLAModel
from mola_search.mola.layer import RoutingState, balance_loss
from mola_search.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Router probabilities of 3 tokens in each of 2 modules of 2 decoder layers (no ties inside a top-k).
PROBS = {
    (0, "a"): [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]],                          # layer 0: 2 experts, top-1
    (0, "b"): [[0.9, 0.1], [0.7, 0.3], [0.45, 0.55]],
    (1, "a"): [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.15, 0.6]],         # layer 1: 3 experts, top-2
    (1, "b"): [[0.35, 0.25, 0.4], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3]],
}
TOP_K = {0: 1, 1: 2}

# By hand. Layer 0 pools 6 rows, top-1: expert 0 chosen 4 times (f = 4/6, 2/6), mean probabilities
# (0.7+0.6+0.2+0.9+0.7+0.45)/6 = 3.55/6 and 2.45/6. Layer 1 pools 6 rows, top-2 (12 selections): experts
# chosen 4, 3, 5 times; mean probabilities 2.0/6, 1.9/6, 2.1/6. Official: the per-layer losses summed.
OFFICIAL = 2 * (4 / 6 * 3.55 / 6 + 2 / 6 * 2.45 / 6) + 3 * (4 / 12 * 2.0 / 6 + 3 / 12 * 1.9 / 6 + 5 / 12 * 2.1 / 6)
# Per module, then averaged: layer 0 a: f (2/3, 1/3), P (1.5/3, 1.5/3); b: f (2/3, 1/3), P (2.05/3, 0.95/3);
# layer 1 a: every expert chosen twice (f = 1/3 each), so the loss is sum(P) = 1; b: f (2, 1, 3)/6, P (1.15, 0.85, 1)/3.
PER_MODULE = (2 * (2 / 3 * 0.5 + 1 / 3 * 0.5) + 2 * (2 / 3 * 2.05 / 3 + 1 / 3 * 0.95 / 3) + 1.0
              + 3 * (2 / 6 * 1.15 / 3 + 1 / 6 * 0.85 / 3 + 3 / 6 * 1 / 3)) / 4


def _routed(formulation: str, token_mask: torch.Tensor | None = None) -> RoutingState:
    """One training forward of four MoLALinears whose routers give exactly PROBS: with token t fed as the
    one-hot input e_t, the router logits are column t of the router, set to log of token t's probabilities."""
    state = RoutingState(balance_loss=formulation, token_mask=token_mask)
    for (layer, _), probs in PROBS.items():
        p = torch.tensor(probs)
        linear = MoLALinear(nn.Linear(3, 4), p.shape[1], TOP_K[layer], 2, alpha=4.0, dropout=0.0, layer_index=layer,
                            state=state).train()
        with torch.no_grad():
            linear.router.copy_(p.log().T)
        linear(torch.eye(3).unsqueeze(0))
    return state


def test_official_balance_loss_matches_the_hand_computed_pooled_value():
    assert OFFICIAL == pytest.approx(2.069444, abs=1e-6) and PER_MODULE == pytest.approx(1.036806, abs=1e-6)
    official = balance_loss(_routed("mola-official").balance_terms, "mola-official")
    assert official.item() == pytest.approx(OFFICIAL, rel=1e-5)
    per_module = balance_loss(_routed("per-module").balance_terms, "per-module")
    assert per_module.item() == pytest.approx(PER_MODULE, rel=1e-5)


def test_padding_counts_in_the_official_loss_only():
    padded = torch.tensor([[1, 1, 0]])  # the third token is padding
    official = balance_loss(_routed("mola-official", padded).balance_terms, "mola-official")
    assert official.item() == pytest.approx(OFFICIAL, rel=1e-5)  # the official code never sees the mask
    per_module = balance_loss(_routed("per-module", padded).balance_terms, "per-module").item()
    # by hand, tokens 1 and 2 only: layer 0 a f (1, 0) P (.65, .35) -> 1.3; b f (1, 0) P (.8, .2) -> 1.6;
    # layer 1 a f (1, 2, 1)/4 P (.3, .45, .25) -> 3 * 1.45/4; b f (2, 0, 2)/4 P (.475, .175, .35) -> 3 * 1.65/4
    assert per_module == pytest.approx((1.3 + 1.6 + 3 * 1.45 / 4 + 3 * 1.65 / 4) / 4, rel=1e-5)


def official_load_balancing_loss_func(gate_logits, num_experts, top_k):
    """GCYZSL/MoLA src/mola_modeling_llama_hacked.py `load_balancing_loss_func`, transcribed (comments and
    the dead branches left out): one tensor of router logits per decoder layer, the layer's modules
    concatenated along the token dimension."""
    overall_loss = torch.tensor(0, dtype=torch.float32)
    for layer_i in range(len(gate_logits)):
        routing_weights = torch.nn.functional.softmax(gate_logits[layer_i], dim=-1)
        _, selected_experts = torch.topk(routing_weights, top_k[layer_i], dim=-1)
        selected_experts = selected_experts.reshape(-1)
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts[layer_i])
        expert_mask_1 = torch.sum(expert_mask, dim=-2)
        tokens_per_expert = expert_mask_1 / torch.sum(expert_mask_1)
        router_prob_per_expert = torch.mean(routing_weights, dim=0)
        overall_loss += torch.sum(tokens_per_expert * router_prob_per_expert) * num_experts[layer_i]
    return overall_loss


def test_mola_official_is_the_official_function_on_a_real_forward():
    """All 7 projections of a 3-layer LLaMA, left-padded batch: the official function on the logits the
    routers produced (padding included) equals our auxiliary loss divided by its coefficient."""
    experts, top_k = (2, 3, 4), (1, 2, 2)
    model = MoLAModel(tiny_llama(num_layers=3, hidden_size=32, vocab_size=128),
                      MoLAConfig(experts=experts, top_k=top_k, rank=(4,) * 3, lora_dropout=0.0, aux_loss_coef=0.001,
                                 balance_loss="mola-official")).train()
    logits = {j: [] for j in range(3)}
    for layer in model.mola_layers.values():
        layer.register_forward_pre_hook(
            lambda m, args: logits[m.layer_index].append(F.linear(args[0], m.router).reshape(-1, m.num_experts)))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    model(input_ids=ids, attention_mask=mask)
    assert all(len(v) == 7 for v in logits.values())
    official = official_load_balancing_loss_func(tuple(torch.cat(v) for v in logits.values()), experts, top_k)
    assert model.auxiliary_loss().item() == pytest.approx(0.001 * official.item(), rel=1e-5)
    per_module = balance_loss(model.state.balance_terms, "per-module")
    assert abs(per_module.item() - official.item()) > 0.5  # ~1 (averaged) vs ~3 (summed over 3 layers)


def test_balance_loss_setting_is_validated_and_reaches_mola_train():
    with pytest.raises(UserError, match=r"^`balance_loss` is 'pooled': use one of per-module, official "
                                        r"\(mola-official is accepted for official\)$"):
        MoLAConfig(experts=(2,), top_k=(1,), rank=(4,), balance_loss="pooled")
    from mola_search.cli.train import build_parser, config_from_args
    from mola_search.train.run import Prepared, build_model

    args = build_parser().parse_args(["--balance-loss", "official", "--aux-loss-coef", "0.002", "--out", "x"])
    config = config_from_args(args)
    assert (config.balance_loss, config.aux_loss_coef) == ("official", 0.002)  # a given coefficient is kept
    spec = AllocationSpec.build([2, 3], top_k=1, rank=4)
    base = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128)
    model = build_model(Prepared(config, base, tokenizer=None, data=None, spec=spec, splits={}))
    assert (model.mola_config.balance_loss, model.mola_config.aux_loss_coef) == ("official", 0.002)
    assert model.state.balance_loss == "official"


@pytest.mark.parametrize("argv, expected", [
    (["--balance-loss", "official"], ("official", 0.001)),        # the official coefficient by default
    (["--balance-loss", "mola-official"], ("official", 0.001)),   # the former name is an alias
    ([], ("per-module", 0.01)),
    (["--aux-loss-coef", "0"], ("per-module", 0.0)),
])
def test_the_official_balance_loss_gets_the_official_coefficient_unless_one_is_given(argv, expected):
    from mola_search.cli.train import build_parser, config_from_args
    from mola_search.train.run import RunConfig

    config = config_from_args(build_parser().parse_args([*argv, "--out", "x"]))
    assert (config.balance_loss, config.aux_loss_coef) == expected
    assert RunConfig.from_dict(config.to_dict()) == config  # metrics.json's config runs again the same
    mola = MoLAConfig(experts=(2,), top_k=(1,), rank=(4,), balance_loss=argv[1] if argv[:1] == ["--balance-loss"]
                      else "per-module")
    assert mola.aux_loss_coef == (expected[1] if argv[:1] != ["--aux-loss-coef"] else 0.01)


def test_mola_train_refuses_an_unknown_balance_loss_in_one_line(capsys):
    from mola_search.cli.train import main

    assert run_main("mola-train", main, ["--balance-loss", "pooled"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "per-module" in err and "official" in err, err


# --- export --format mola-flags ------------------------------------------------------------------


def _model_folder(path, **config):
    from transformers import AutoConfig, LlamaConfig

    if config.pop("model_type", "llama") == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_layer=config.get("num_hidden_layers", 32))
    else:
        cfg = LlamaConfig(**{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32,
                             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, **config})
    cfg.save_pretrained(path)
    return str(path)


def _study(tmp_path, model: str, layers: int = 32, objective: str = "mola"):
    from mola_search.search.config import StudyConfig

    folder = tmp_path / "study"
    folder.mkdir()
    StudyConfig(model=model, objective=objective, study_name="s").save(folder)
    spec = resolve_allocation("inverted_triangle", layers, 5 * layers, top_k=2, rank=8)
    save_spec(spec, folder / "best_allocation.json", model=model, task="mrpc")
    return folder, spec


def _export(folder, capsys) -> tuple[int, str, str]:
    from mola_search.cli.search import main

    code = run_main("mola-search", main, ["export", str(folder), "--format", "mola-flags"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_prints_the_official_flag_set_for_a_llama_2_7b_shaped_study(tmp_path, capsys):
    model = _model_folder(tmp_path / "llama")
    folder, spec = _study(tmp_path, model)
    code, out, err = _export(folder, capsys)
    assert code == 0, err
    experts = ",".join(["2"] * 8 + ["4"] * 8 + ["6"] * 8 + ["8"] * 8)  # the paper's 2468 at 32 layers / 160
    assert out == (f"--number_experts {experts} --top_k {','.join(['2'] * 32)} --lora_r {','.join(['8'] * 32)} "
                   f"--base_model {model} --lora_alpha 16 --lora_dropout 0.05 "
                   "--lora_target_modules q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --obalance False\n")
    # the study trained with our per-module loss: no official equivalent, said on stderr, not in the flags
    assert err.startswith("# note: trained with the per-module balance loss (coefficient 0.01)"), err
    assert err.count("\n") == 1


def test_export_flags_follow_the_balance_loss_and_say_what_they_cannot_carry(tmp_path):
    from mola_search.mola.official import official_flags

    model = _model_folder(tmp_path / "llama")
    spec = resolve_allocation("inverted_triangle", 32, 160, top_k=2, rank=8)
    exact = MoLAConfig.from_spec(spec, balance_loss="mola-official")  # the official coefficient by default
    flags, notes = official_flags(spec, model, exact)
    assert flags.endswith(" --obalance True") and notes == []
    flags, notes = official_flags(spec, model, MoLAConfig.from_spec(spec, balance_loss="official", aux_loss_coef=0.01))
    assert flags.endswith(" --obalance True") and "weighted 0.01" in notes[0] and "0.001" in notes[0]
    flags, notes = official_flags(spec, model, MoLAConfig.from_spec(spec, aux_loss_coef=0.0, lora_alpha=32.0,
                                                                     target_modules=("q_proj", "v_proj")))
    assert flags.endswith(" --lora_alpha 32 --lora_dropout 0.05 --lora_target_modules q_proj,v_proj --obalance False")
    assert notes == []  # no balance loss on either side
    flags, _ = official_flags(spec, model, MoLAConfig.from_spec(spec, target_modules=("v_proj",)))
    assert " --lora_target_modules v_proj, " in flags  # fire reads "v_proj," as a tuple, "v_proj" as a string


def test_export_of_a_study_whose_training_is_not_ours_leaves_the_script_defaults(tmp_path, capsys):
    model = _model_folder(tmp_path / "llama")
    folder, _ = _study(tmp_path, model, objective="synthetic")
    code, out, err = _export(folder, capsys)
    assert code == 0, err
    assert out.endswith(f"--base_model {model} "
                        "--lora_target_modules q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj\n")
    assert "obalance" not in out and "not recorded" in err


def test_the_depth_is_free_but_must_be_the_models(tmp_path, capsys):
    """The official stack is built with config.num_hidden_layers layers: a 40-layer LLaMA runs."""
    model = _model_folder(tmp_path / "llama40", num_hidden_layers=40)
    folder, _ = _study(tmp_path, model, layers=40)
    code, out, err = _export(folder, capsys)
    assert code == 0, err
    assert out.startswith("--number_experts " + ",".join(["2"] * 10 + ["4"] * 10 + ["6"] * 10 + ["8"] * 10) + " ")


@pytest.mark.parametrize("model, layers, needles", [
    ("tiny-llama-L8", 8, ["grouped-query attention (2 key/value heads for 4 query heads)"]),
    ({"model_type": "gpt2"}, 32, ["it is a 'gpt2' model", "LLaMA only"]),
    ({"rope_theta": 500000.0}, 32, ["theta 500000"]),
    ({"attention_bias": True}, 32, ["biases"]),
    ({"num_hidden_layers": 30}, 32, ["the allocation has 32 layers and the model 30"]),
])
def test_export_refuses_what_the_official_code_cannot_run_in_one_line(tmp_path, capsys, model, layers, needles):
    if isinstance(model, dict):
        model = _model_folder(tmp_path / "model", **model)
    folder, _ = _study(tmp_path, model, layers=layers)
    code, out, err = _export(folder, capsys)
    assert code == 2 and out == "", err
    err = err.strip()
    assert err.startswith("mola-search: error: the official MoLA code cannot train this allocation on ")
    assert "\n" not in err and all(n in err for n in needles), err


def test_to_mola_flags_writes_settings_as_fire_reads_them():
    spec = AllocationSpec.build([2, 8], top_k=[1, 2], rank=4)
    flags = to_mola_flags(spec, base_model="/models/my llama", lora_alpha=16.0, lora_dropout=0.05, obalance=True)
    assert flags == ("--number_experts 2,8 --top_k 1,2 --lora_r 4,4 --base_model '/models/my llama' --lora_alpha 16 "
                     "--lora_dropout 0.05 --obalance True "
                     "--lora_target_modules q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj")
    chosen = spec.to_mola_flags(lora_target_modules="q_proj,v_proj")
    assert chosen.endswith("--lora_r 4,4 --lora_target_modules q_proj,v_proj")
