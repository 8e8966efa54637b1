"""Baselines through PEFT on the tiny model: hand-computed parameter counts, aligned logits, save/load.

tiny_llama(num_layers=4): hidden 64, intermediate 128, 4 heads / 2 kv heads (head_dim 16), vocab 49152,
tied embeddings. Per layer the seven target linears have (d_in, d_out):
q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64.
"""

from __future__ import annotations

import json

import pytest
import torch

from mola_search.errors import UserError
from mola_search.methods import (ADAPTERS, METHOD_FILE, METHODS, Adapter, adapter_kind, build_baseline,
                                  load_adapter_into, register, resolve_lora_rank)
from mola_search.methods.base import known_kinds
from mola_search.models import tiny_llama
from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.train.run import RunConfig, count_parameters, resolve_spec

LAYERS, HIDDEN = 4, 64
LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
SUM_IN_OUT = sum(a + b for a, b in LINEARS)          # 1024 per layer
SUM_IN = sum(a for a, _ in LINEARS)                   # 512 per layer (router inputs)


def cfg(method: str, **kw) -> RunConfig:
    return RunConfig(model="tiny-llama", method=method, dtype="fp32", **kw)


def trainable(model) -> int:
    return count_parameters(model)[0]


def test_methods_list():
    assert METHODS == ("mola", "lora", "prompt-tuning", "llama-adapter", "full")


def test_lora_count_and_match():
    model = build_baseline(cfg("lora", lora_rank=8), tiny_llama(LAYERS))
    assert trainable(model) == LAYERS * 8 * SUM_IN_OUT == 32768
    assert model.num_base() == sum(p.numel() for p in tiny_llama(LAYERS).parameters())
    # default: the MoLA expert rank (--rank)
    assert resolve_lora_rank(cfg("lora", rank=4), tiny_llama(LAYERS))[0] == 4
    # match: inverted triangle at budget 5 x 4 = 20 over 4 layers is 2,4,6,8; MoLA count =
    # sum_j E_j * (8 * 1024 + 512) = 20 * 8704 = 174080; LoRA per rank = 4 * 1024 = 4096 -> 42.5 -> 42
    rank, info = resolve_lora_rank(cfg("lora", lora_rank="match"), tiny_llama(LAYERS),
                                   resolve_spec(cfg("lora"), LAYERS))
    assert info["matched_mola_trainable"] == 20 * (8 * SUM_IN_OUT + SUM_IN) == 174080
    assert rank == 42 and info["matched_allocation"] == [2, 4, 6, 8]
    base = tiny_llama(LAYERS)
    spec = resolve_spec(cfg("mola"), LAYERS)
    mola = MoLAModel(base, MoLAConfig.from_spec(spec))
    assert mola.num_trainable() == 174080  # the formula agrees with a built MoLA model
    with pytest.raises(UserError, match="lora_rank"):
        resolve_lora_rank(cfg("lora", lora_rank="big"), tiny_llama(LAYERS))
    with pytest.raises(UserError, match="needs the MoLA allocation"):
        resolve_lora_rank(cfg("lora", lora_rank="match"), tiny_llama(LAYERS))


def test_prompt_tuning_count():
    model = build_baseline(cfg("prompt-tuning", num_virtual_tokens=20), tiny_llama(LAYERS))
    assert trainable(model) == 20 * HIDDEN == 1280


def test_llama_adapter_count():
    model = build_baseline(cfg("llama-adapter"), tiny_llama(LAYERS))
    # adapter_len 10 prompt vectors + 1 gate per adapted layer; min(8, 4) = 4 layers
    assert trainable(model) == 4 * (10 * HIDDEN + 1) == 2564
    deep = build_baseline(cfg("llama-adapter"), tiny_llama(10))
    assert trainable(deep) == 8 * (10 * HIDDEN + 1)


def test_full_count_and_fp32():
    base = tiny_llama(LAYERS).to(torch.bfloat16)
    total = sum(p.numel() for p in base.parameters())
    model = build_baseline(cfg("full"), base)
    assert trainable(model) == total == model.num_base()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "float32" in model.method_info["dtype_note"]


def test_unknown_method_and_unsupported_model():
    with pytest.raises(UserError, match="unknown method 'adapterx'.*lora, prompt-tuning"):
        build_baseline(cfg("adapterx"), tiny_llama(2))
    base = tiny_llama(2)
    base.config.model_type = "qwen2"  # PEFT's adaption prompt knows llama, mistral and gpt2 only
    with pytest.raises(UserError, match="does not support model type 'qwen2'"):
        build_baseline(cfg("llama-adapter"), base)
    with pytest.raises(UserError, match="target_modules"):
        build_baseline(cfg("lora", target_modules=("c_attn",)), tiny_llama(2))


def _batch():
    ids = torch.tensor([[2, 2, 2, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "llama-adapter"])
def test_logits_aligned_and_padding_invariant(method):
    torch.manual_seed(0)
    model = build_baseline(cfg(method), tiny_llama(2))
    with torch.no_grad():  # make the adapters act (LoRA B and the adapter gate start at zero)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    ids, mask, pos = _batch()
    with torch.no_grad():
        full = model(ids, mask, pos).logits
        tail = model(ids, mask, pos, logits_to_keep=3).logits
        alone = model(ids[:1, 3:], mask[:1, 3:], pos[:1, 3:]).logits
        default_pos = model(ids[:1, 3:], mask[:1, 3:]).logits  # scorers that pass no position_ids
    assert full.shape[:2] == ids.shape  # prompt tuning's virtual tokens are stripped
    torch.testing.assert_close(tail, full[:, -3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full[:1, 3:], alone, atol=1e-4, rtol=1e-3)  # left padding changes nothing
    torch.testing.assert_close(default_pos, alone, atol=1e-5, rtol=1e-4)


def test_lora_starts_at_base():
    base = tiny_llama(2)
    ids, mask, pos = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        model = build_baseline(cfg("lora"), base)
        torch.testing.assert_close(model(ids, mask, pos).logits, ref)


def _built(kind: str):
    """A fresh adapter of `kind` on a tiny model: the same arguments build the same starting weights."""
    if kind == "mola":
        return MoLAModel(tiny_llama(2), MoLAConfig(experts=(2, 3), top_k=(1, 2), rank=(4, 4)))
    return build_baseline(cfg(kind), tiny_llama(2))


def _logits(model):
    ids, mask, pos = _batch()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_the_registry_holds_every_method_under_its_kind():
    assert list(known_kinds()) == list(METHODS)
    for kind, cls in ADAPTERS.items():
        assert issubclass(cls, Adapter) and cls.kind == kind
        model = _built(kind)
        assert type(model) is cls
        assert model.num_trainable() == trainable(model) > 0
        if kind != "mola":  # only MoLA adds a term to the loss (its load balancing)
            assert model.auxiliary_loss() is None and model.method_info["method"] == kind


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_every_kind_round_trips_save_and_load(kind, tmp_path):
    model = _built(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_adapter(tmp_path / "adapter", task="mrpc")
    record = json.loads((tmp_path / "adapter" / METHOD_FILE).read_text())
    assert record["kind"] == kind and record["metadata"] == {"task": "mrpc"}
    assert record["trainable_params"] == model.num_trainable() and record["base_params"] == model.num_base()
    fresh = _built(kind)
    assert not torch.allclose(_logits(fresh), _logits(model))  # so the comparison below means something
    load_adapter_into(fresh, tmp_path)  # a run folder holding adapter/ is accepted too
    torch.testing.assert_close(_logits(fresh), _logits(model))


class _Probe(Adapter):
    """A kind of adapter only this test knows: it saves one file and remembers what it was asked to load."""

    kind = "probe"

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.loaded_from = None

    def write_adapter_files(self, folder, metadata):
        (folder / "probe.txt").write_text("probe")

    def load_adapter(self, folder):
        self.loaded_from = folder


def test_loading_dispatches_on_the_recorded_kind_not_on_file_names(tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTERS, "probe", _Probe)
    _Probe().save_adapter(tmp_path / "adapter")
    assert adapter_kind(tmp_path / "adapter") == ("probe", tmp_path / "adapter")
    # a MoLA config beside the record changes nothing: the record decides
    MoLAConfig(experts=(1, 1), top_k=(1, 1), rank=(4, 4)).save(tmp_path / "adapter")
    probe = _Probe()
    load_adapter_into(probe, tmp_path / "adapter")
    assert probe.loaded_from == tmp_path / "adapter"
    with pytest.raises(UserError, match="holds a 'probe' adapter but this run's method is 'mola'"):
        load_adapter_into(_built("mola"), tmp_path / "adapter")


def _without_kind(folder, keep_record: bool) -> None:
    """Make `folder` look as it did before the kind record had its "kind" key."""
    record = folder / METHOD_FILE
    if keep_record:
        old = json.loads(record.read_text())
        old.pop("kind")
        record.write_text(json.dumps(old))
    else:
        record.unlink()


@pytest.mark.parametrize("kind, keep_record", [("mola", False), ("lora", False), ("prompt-tuning", True),
                                               ("full", True)])
def test_folders_saved_before_the_kind_record_still_load(kind, keep_record, tmp_path):
    """MoLA folders with only adapter_config.json, PEFT folders with only PEFT's (peft_type), and baseline
    folders whose mola_method.json named the method but had no "kind": the legacy fallback reads them."""
    model = _built(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_adapter(tmp_path)
    _without_kind(tmp_path, keep_record)
    assert adapter_kind(tmp_path) == (kind, tmp_path)
    fresh = _built(kind)
    load_adapter_into(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(model))


def test_an_unknown_or_unreadable_kind_is_a_one_line_user_error(tmp_path):
    target = _built("lora")
    (tmp_path / METHOD_FILE).write_text(json.dumps({"kind": "adapterx"}))
    with pytest.raises(UserError) as caught:
        load_adapter_into(target, tmp_path)
    assert str(caught.value) == (f"`init_from` {tmp_path} holds a 'adapterx' adapter, a kind mola-search does "
                                 "not know; known kinds: mola, lora, prompt-tuning, llama-adapter, full")
    (tmp_path / METHOD_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"mola_method.json is not valid JSON \(Expecting"):
        load_adapter_into(target, tmp_path)
    (tmp_path / METHOD_FILE).write_text("[]")
    with pytest.raises(UserError, match="holds a JSON list, not an object"):
        load_adapter_into(target, tmp_path)
    (tmp_path / METHOD_FILE).unlink()
    with pytest.raises(UserError, match="not an adapter folder"):
        load_adapter_into(target, tmp_path)


def test_register_refuses_a_class_without_a_kind_and_a_second_class_for_a_kind():
    with pytest.raises(TypeError, match="with a `kind`"):
        register(type("NoKind", (Adapter,), {}))
    with pytest.raises(ValueError, match="'lora' is registered already"):
        register(type("OtherLora", (Adapter,), {"kind": "lora"}))
    assert ADAPTERS["lora"].__name__ == "LoraModel"


def test_init_from_mismatches(tmp_path):
    # MoLA adapter with another allocation
    spec = resolve_spec(cfg("mola", shape="rectangle"), LAYERS)
    MoLAModel(tiny_llama(LAYERS), MoLAConfig.from_spec(spec)).save_adapter(tmp_path / "rect")
    target = MoLAModel(tiny_llama(LAYERS), MoLAConfig.from_spec(resolve_spec(cfg("mola"), LAYERS)))
    with pytest.raises(UserError, match="differs from this run's"):
        load_adapter_into(target, tmp_path / "rect")
    # MoLA adapter of another depth
    spec8 = resolve_spec(cfg("mola"), 8)
    MoLAModel(tiny_llama(8), MoLAConfig.from_spec(spec8)).save_adapter(tmp_path / "l8")
    with pytest.raises(UserError, match="for 8 layers but this model has 4"):
        load_adapter_into(target, tmp_path / "l8")
    # another method
    with pytest.raises(UserError, match="holds a 'mola' adapter but this run's method is 'lora'"):
        load_adapter_into(build_baseline(cfg("lora"), tiny_llama(2)), tmp_path / "l8")
    # LoRA of another rank
    build_baseline(cfg("lora", lora_rank=4), tiny_llama(2)).save_adapter(tmp_path / "r4")
    with pytest.raises(UserError, match="has shape"):
        load_adapter_into(build_baseline(cfg("lora", lora_rank=8), tiny_llama(2)), tmp_path / "r4")
    with pytest.raises(UserError, match="no such folder"):
        load_adapter_into(target, tmp_path / "nope")
