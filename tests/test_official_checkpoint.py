"""Official MoLA checkpoints (GCYZSL/MoLA) both ways: names, layout, and the same outputs.

The reference is written here: `OfficialMoELinear` keeps the official module's parameter layout
(`lora_A` / `lora_B` module dicts keyed `default_<e>`, a `router` module dict keyed `router`) and computes
what the official `Linear_MoE.forward` computes in eval mode (src/mola_lora_hacked.py at commit
01785c84c70846999638b11b88409fdf86361d9a), with a loop over experts and `index_add_` as there. Its state
dict, filtered and renamed as the official `get_peft_model_state_dict_moe` does (LoRA and router tensors
only, ".default" dropped, under the PeftModel's "base_model.model." prefix), is an official checkpoint.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import DATA_DIR, needs_data
from mola_search.errors import UserError
from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.mola.official_checkpoint import (as_adapter_folder, convert_adapter_to_official,
                                                  convert_official_to_adapter, is_official_checkpoint,
                                                  load_official_into, read_official_checkpoint,
                                                  write_official_checkpoint)
from mola_search.models import random_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPERTS, TOP_K, RANK = (2, 3, 4), (1, 2, 2), (4, 8, 4)   # per-layer ranks differ: the official lora_r is a list
ALPHA = 16
KINDS = ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
SHAPE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 4}  # no grouped-query attention, as the official code


class OfficialMoELinear(nn.Module):
    """The official mixture-of-LoRA linear in eval mode, in the official parameter layout."""

    def __init__(self, base: nn.Linear, experts: int, top_k: int, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.base, self.top_k, self.scaling = base, top_k, ALPHA / rank
        d_in, d_out = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict({f"default_{e}": nn.Linear(d_in, rank, bias=False) for e in range(experts)})
        self.lora_B = nn.ModuleDict({f"default_{e}": nn.Linear(rank, d_out, bias=False) for e in range(experts)})
        self.router = nn.ModuleDict({"router": nn.Linear(d_in, experts, bias=False)})
        with torch.no_grad():  # B non-zero, unlike a fresh LoRA: the experts must change the output
            for p in (*self.lora_A.parameters(), *self.lora_B.parameters(), *self.router.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router["router"](flat), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        delta = torch.zeros(flat.shape[0], result.shape[-1], dtype=x.dtype)
        for e in range(len(self.lora_A)):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                expert = self.lora_B[f"default_{e}"](self.lora_A[f"default_{e}"](flat[rows])) * self.scaling
                delta.index_add_(0, rows, expert * weights[rows, slot, None])
        return result + delta.reshape(result.shape)


def reference_model() -> nn.Module:
    model = copy.deepcopy(random_llama(SHAPE))
    gen = torch.Generator().manual_seed(1)
    for name, module in list(model.named_modules()):
        kind = name.rsplit(".", 1)[-1]
        if kind in KINDS and isinstance(module, nn.Linear):
            j = int(name.split(".")[2])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, OfficialMoELinear(module, EXPERTS[j], TOP_K[j], RANK[j], gen))
    return model.eval()


def official_state_dict(model: nn.Module, trainer_style: bool = False) -> dict[str, torch.Tensor]:
    """What the official save_pretrained writes (or, `trainer_style`, a Trainer checkpoint's naming)."""
    state = {f"base_model.model.{k}": v.clone() for k, v in model.state_dict().items() if "lora_" in k or "router" in k}
    return state if trainer_style else {k.replace(".default", ""): v for k, v in state.items()}


def write_official_folder(folder, state, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "my/llama", "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None, "lora_alpha": ALPHA,
        "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": list(RANK), "revision": None,
        "target_modules": list(KINDS), "task_type": "CAUSAL_LM", **config}))


@pytest.fixture(scope="module")
def reference():
    model = reference_model()
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        base = random_llama(SHAPE)(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-2  # the experts matter, so equal logits below mean equal experts
    return model, ids, logits


def ours(config: MoLAConfig, tensors=None) -> MoLAModel:
    model = MoLAModel(random_llama(SHAPE), config).eval()
    if tensors is not None:
        model.load_adapter_weights(tensors)
    return model


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("trainer_style", [False, True])
def test_an_official_checkpoint_loads_into_mola_model_with_the_official_outputs(tmp_path, reference, trainer_style):
    model, ids, expected = reference
    folder = tmp_path / "official"
    write_official_folder(folder, official_state_dict(model, trainer_style))
    assert is_official_checkpoint(folder)
    config, tensors = read_official_checkpoint(folder, top_k=TOP_K)
    assert (config.experts, config.top_k, config.rank) == (EXPERTS, TOP_K, RANK)
    assert (config.lora_alpha, config.lora_dropout, config.base_model) == (16.0, 0.05, "my/llama")
    assert set(config.target_modules) == set(KINDS) and config.extra["top_k_assumed"] is False
    torch.testing.assert_close(logits_of(ours(config, tensors), ids), expected, atol=1e-5, rtol=1e-5)


def test_our_adapter_written_officially_has_the_official_names_and_tensors(tmp_path, reference):
    model, ids, expected = reference
    write_official_folder(tmp_path / "official", official_state_dict(model))
    config, tensors = read_official_checkpoint(tmp_path / "official", top_k=TOP_K)
    mola = ours(config, tensors)
    mola.save_pretrained(tmp_path / "ours")
    assert not is_official_checkpoint(tmp_path / "ours")
    out = convert_adapter_to_official(tmp_path / "ours", tmp_path / "back", base_model="my/llama")
    written = torch.load(out / "adapter_model.bin", weights_only=True)
    original = official_state_dict(model)
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert (raw["peft_type"], raw["task_type"], raw["r"], raw["lora_alpha"]) == ("LORA", "CAUSAL_LM", list(RANK), 16)
    assert raw["target_modules"] == list(KINDS) and raw["base_model_name_or_path"] == "my/llama"
    again, _ = read_official_checkpoint(out)  # top-k from the allocation.json written beside it
    assert again.top_k == TOP_K and again.extra["top_k_assumed"] is False
    adapter = convert_official_to_adapter(out, tmp_path / "adapter")
    rebuilt = MoLAModel.from_pretrained(random_llama(SHAPE), adapter).eval()
    torch.testing.assert_close(logits_of(rebuilt, ids), expected, atol=1e-5, rtol=1e-5)
    assert as_adapter_folder(tmp_path / "ours", tmp_path / "scratch") == tmp_path / "ours"
    assert MoLAConfig.load(as_adapter_folder(out, tmp_path / "scratch")).experts == EXPERTS


def test_a_model_is_written_directly_and_top_k_defaults_to_the_official_2(tmp_path, reference):
    model, _, _ = reference
    write_official_folder(tmp_path / "official", official_state_dict(model))
    config, tensors = read_official_checkpoint(tmp_path / "official")  # no top_k anywhere: the scripts' 2
    assert config.top_k == (2, 2, 2) and config.extra["top_k_assumed"] is True
    write_official_checkpoint(ours(config, tensors), tmp_path / "direct")
    assert sorted(torch.load(tmp_path / "direct" / "adapter_model.bin", weights_only=True)) == sorted(
        official_state_dict(model))


def test_broken_checkpoints_and_mismatched_top_k_are_one_line_errors(tmp_path, reference):
    model, _, _ = reference
    state = official_state_dict(model)
    with pytest.raises(UserError, match=r"^`top_k` \[3, 3, 3\] does not fit .* experts \[2, 3, 4\]"):
        write_official_folder(tmp_path / "a", state)
        read_official_checkpoint(tmp_path / "a", top_k=3)
    del state["base_model.model.model.layers.1.mlp.up_proj.lora_B_2.weight"]
    write_official_folder(tmp_path / "b", state)
    with pytest.raises(UserError, match=r"module 'model\.layers\.1\.mlp\.up_proj' is incomplete"):
        read_official_checkpoint(tmp_path / "b")
    write_official_folder(tmp_path / "c", official_state_dict(model), r=[4, 4, 4])
    with pytest.raises(UserError, match=r"has rank 8 but its adapter_config\.json gives layer 1 r=4"):
        read_official_checkpoint(tmp_path / "c")
    with pytest.raises(UserError, match=r"is not an official MoLA checkpoint"):
        read_official_checkpoint(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"^`out` .* holds adapter_model\.safetensors"):
        write_official_checkpoint(ours(MoLAConfig(experts=EXPERTS, top_k=TOP_K, rank=RANK)), tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["adapter_model.safetensors"]  # nothing written


def test_init_from_an_official_checkpoint_needs_the_same_allocation(tmp_path, reference):
    model, ids, expected = reference
    write_official_folder(tmp_path / "official", official_state_dict(model))
    run = ours(MoLAConfig(experts=EXPERTS, top_k=TOP_K, rank=RANK, lora_alpha=16.0))
    load_official_into(run, tmp_path / "official")
    torch.testing.assert_close(logits_of(run, ids), expected, atol=1e-5, rtol=1e-5)
    other = ours(MoLAConfig(experts=(2, 2, 2), top_k=(1, 1, 1), rank=RANK, lora_alpha=32.0))
    with pytest.raises(UserError) as error:
        load_official_into(other, tmp_path / "official")
    message = str(error.value)
    assert "\n" not in message and "experts [2, 3, 4]" in message and "`allocation`" in message
    assert "lora_alpha is 16, this run's 32" in message


@needs_data
def test_mola_train_starts_from_an_official_checkpoint(tmp_path, capsys):
    """A run's adapter written officially, then `mola-train --init-from <official folder> --max-steps 0`: the
    very scores of the run, example by example."""
    from mola_search.cli.common import run_main
    from mola_search.cli.train import main

    common = ["--model", "tiny-llama", "--task", "mrpc", "--data-dir", DATA_DIR, "--shape", "2468",
              "--max-train-examples", "8", "--max-eval-examples", "4", "--no-progress", "--threads", "1"]
    trained = [*common, "--max-steps", "1", "--lr", "0.05", "--out", str(tmp_path / "a")]
    assert run_main("mola-train", main, trained) == 0
    convert_adapter_to_official(tmp_path / "a" / "adapter", tmp_path / "official")
    assert is_official_checkpoint(tmp_path / "official")
    code = run_main("mola-train", main, [*common, "--max-steps", "0", "--init-from", str(tmp_path / "official"),
                                         "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    first, second = (json.loads((tmp_path / n / "metrics.json").read_text())["validation"]["per_example"]
                     for n in ("a", "b"))
    assert second["gold_logprob"] == pytest.approx(first["gold_logprob"], abs=1e-5)
    code = run_main("mola-train", main, [*common, "--shape", "1111", "--max-steps", "0",
                                         "--init-from", str(tmp_path / "official"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--allocation" in err, err


def test_mola_search_convert_goes_both_ways_and_analyze_reads_an_official_checkpoint(tmp_path, reference, capsys):
    from mola_search.analysis.adapter import analyze_adapter
    from mola_search.cli.common import run_main
    from mola_search.cli.search import main

    model, ids, logits = reference
    official = tmp_path / "official"
    write_official_folder(official, official_state_dict(model))
    ours_dir, back = tmp_path / "ours", tmp_path / "back"
    assert run_main("mola-search", main, ["convert", str(official), str(ours_dir), "--top-k", ",".join(map(str, TOP_K))]) == 0
    converted = MoLAModel.from_pretrained(random_llama(SHAPE), ours_dir).eval()
    assert torch.allclose(logits_of(converted, ids), logits, atol=1e-5)  # the official model's outputs
    assert run_main("mola-search", main, ["convert", str(ours_dir), str(back)]) == 0
    assert "official checkpoint folder" in capsys.readouterr().out
    again = tmp_path / "again"
    assert run_main("mola-search", main, ["convert", str(back), str(again), "--top-k", ",".join(map(str, TOP_K))]) == 0
    assert torch.allclose(logits_of(MoLAModel.from_pretrained(random_llama(SHAPE), again).eval(), ids), logits,
                          atol=1e-5)
    # analyze takes the official checkpoint as it is: the same redundancy as the converted folder
    capsys.readouterr()
    assert run_main("mola-search", main, ["analyze", str(official), "--top-k", ",".join(map(str, TOP_K)), "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["experts"] == list(analyze_adapter(ours_dir).config.experts)
