"""Base models: name resolution, dtype choice, decoder-layer discovery, the atomic cache, loading."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mola_search import models
from mola_search.errors import UserError
from mola_search.models import (
    DEFAULT_MODEL,
    decoder_layers,
    is_complete,
    layer_index_of,
    load_base_model,
    materialize_atomically,
    model_summary,
    resolve_dtype,
    resolve_model_source,
    tiny_layers,
    tiny_llama,
)


def _tiny_gpt2(num_layers: int = 3) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=num_layers, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config)


class _TwoLists(nn.Module):
    """A model with two candidate stacks of the right length: the heavier one is the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(2))
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))


# --- decoder layers -------------------------------------------------------------------------------


def test_decoder_layers_of_llama(tiny_model):
    layers = decoder_layers(tiny_model)
    assert layers is tiny_model.model.layers
    assert len(layers) == 4


def test_decoder_layers_of_gpt2():
    model = _tiny_gpt2(num_layers=3)
    assert decoder_layers(model) is model.transformer.h


def test_decoder_layers_prefers_the_heaviest_stack():
    model = _TwoLists()
    assert decoder_layers(model) is model.blocks


def test_decoder_layers_missing_is_a_user_error(tiny_model):
    tiny_model.config.num_hidden_layers = 7  # no list of 7 modules anywhere
    with pytest.raises(UserError, match="7"):
        decoder_layers(tiny_model)
    with pytest.raises(UserError, match="num_hidden_layers"):
        decoder_layers(nn.Linear(2, 2))


def test_layer_index_of_llama(tiny_model):
    index = layer_index_of(tiny_model)
    assert index["model.layers.3.self_attn.q_proj"] == 3
    assert index["model.layers.0.mlp.down_proj"] == 0
    assert index["model.layers.2"] == 2
    assert "model.embed_tokens" not in index and "lm_head" not in index and "model.norm" not in index
    modules = dict(tiny_model.named_modules())
    assert set(index) <= set(modules)  # names are the model's own qualified names
    per_layer = [sum(1 for j in index.values() if j == i) for i in range(4)]
    assert len(set(per_layer)) == 1 and per_layer[0] > 5


def test_layer_index_of_gpt2():
    index = layer_index_of(_tiny_gpt2(num_layers=3))
    assert index["transformer.h.2.attn.c_attn"] == 2
    assert index["transformer.h.0.mlp.c_fc"] == 0
    assert set(index.values()) == {0, 1, 2}


# --- tiny llama -----------------------------------------------------------------------------------


def test_tiny_llama_is_frozen_fp32_and_deterministic():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128, seed=5)
    assert torch.equal(torch.rand(1), before)  # the global RNG was left alone
    b = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128, seed=5)
    c = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128, seed=6)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in a.parameters())
    assert not a.training
    assert a.config.num_key_value_heads == 2 and a.config.intermediate_size == 128
    assert tiny_llama().config.vocab_size == models.SMOLLM2_VOCAB_SIZE


def test_tiny_llama_forward_shape():
    model = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128)
    logits = model(input_ids=torch.randint(0, 128, (2, 5))).logits
    assert logits.shape == (2, 5, 128) and torch.isfinite(logits).all()


def test_lm_head_gets_contiguous_rows_with_logits_to_keep():
    """A strided (batch, keep, hidden) slice makes torch copy the whole LM head weight per batch row."""
    model = tiny_llama(num_layers=2, hidden_size=32, vocab_size=128)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 128, (3, 7))
    kept = model(input_ids=ids, logits_to_keep=2).logits
    assert seen == [True]
    assert torch.allclose(kept, model(input_ids=ids).logits[:, -2:], atol=1e-6)


@pytest.mark.parametrize("name,layers", [("tiny-llama", 4), ("tiny-llama-L8", 8), ("Tiny-Llama-l1", 1),
                                         ("tiny-llamas", None), ("llama-L8", None), (None, None)])
def test_tiny_aliases(name, layers):
    assert tiny_layers(name) == layers


def test_tiny_alias_with_zero_layers_is_a_user_error():
    with pytest.raises(UserError, match="N >= 1"):
        tiny_layers("tiny-llama-L0")


def test_model_summary_of_tiny(tiny_model):
    summary = model_summary(tiny_model)
    assert summary["num_layers"] == 4
    assert summary["hidden_size"] == 64
    assert summary["dtype"] == "float32"
    assert summary["name_or_path"] == "tiny-llama-L4"
    assert summary["num_parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert summary["num_trainable_parameters"] == 0


# --- names, dtypes --------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch):
    """Make Hub lookups fail at once. huggingface_hub reads HF_HUB_OFFLINE at import, so patch both."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unknown_model_is_a_user_error(offline_hub):
    started = time.perf_counter()
    with pytest.raises(UserError) as caught:
        load_base_model("no-such-org/no-such-model-xyz", dtype="fp32")
    message = str(caught.value)
    assert "unknown model 'no-such-org/no-such-model-xyz'" in message
    assert DEFAULT_MODEL in message and "Hugging Face Hub" in message
    assert time.perf_counter() - started < 10


def test_hub_id_passes_through_resolution():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(UserError, match="config.json"):
        load_base_model(str(tmp_path), dtype="fp32")


def test_folder_with_config_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope"))
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_source(str(weights))


def test_tiny_alias_resolves_to_itself():
    assert resolve_model_source("tiny-llama-L3") == "tiny-llama-L3"


def test_dtype_names():
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(UserError, match="auto, bf16, fp32, fp16"):
        resolve_dtype("int8")
    with pytest.raises(UserError, match="unknown dtype"):
        load_base_model("tiny-llama", dtype="float64")


def test_auto_dtype_follows_cpu_bf16_support(monkeypatch):
    from mola_search.models import devices  # resolve_dtype looks the probe up in its own module

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "meta") is torch.float32


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLA_CACHE_DIR", str(tmp_path))
    assert models.model_cache_dir(DEFAULT_MODEL) == tmp_path / "models" / DEFAULT_MODEL
    monkeypatch.delenv("MOLA_CACHE_DIR")
    assert models.model_cache_dir("x") == Path.home() / ".cache" / "mola-search" / "models" / "x"


# --- atomic cache ---------------------------------------------------------------------------------


def _fake_save(tag: str, calls: list[str], delay: float = 0.0):
    """A stand-in for the 15 s conversion: several files, written slowly, all naming the writer."""
    def build(folder: Path) -> None:
        calls.append(tag)
        for part in ("config.json", "model.safetensors", "tokenizer.json"):
            time.sleep(delay)
            (folder / part).write_text(tag)
    return build


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name)


def test_atomic_write_builds_once_and_leaves_no_temp(tmp_path):
    target = tmp_path / "models" / "m"
    calls: list[str] = []
    assert materialize_atomically(target, _fake_save("a", calls)) == target
    assert is_complete(target) and (target / "model.safetensors").read_text() == "a"
    assert target.stat().st_mode & 0o777 == 0o755  # readable by others, unlike a bare mkdtemp
    materialize_atomically(target, _fake_save("b", calls))
    assert calls == ["a"]  # complete: not rebuilt
    assert _leftovers(target.parent, "m") == []


def test_racing_writers_leave_one_consistent_copy(tmp_path):
    target = tmp_path / "m"
    calls: list[str] = []
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            start.wait()
            materialize_atomically(target, _fake_save(tag, calls, delay=0.05))
        except BaseException as error:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(calls) == ["a", "b", "c"]  # all raced to build ...
    winners = {(target / f).read_text() for f in ("config.json", "model.safetensors", "tokenizer.json")}
    assert len(winners) == 1  # ... but exactly one writer's files are in place, none mixed
    assert is_complete(target)
    assert _leftovers(tmp_path, "m") == []


def test_first_finisher_wins_and_late_writer_discards_its_copy(tmp_path):
    """The rename is all-or-nothing: a slower writer must not overwrite or mix into a finished cache."""
    target = tmp_path / "m"
    slow_started = threading.Event()
    calls: list[str] = []

    def fast(folder: Path) -> None:
        assert slow_started.wait(5)  # both are building at once
        _fake_save("fast", calls)(folder)

    def slow(folder: Path) -> None:
        slow_started.set()
        _fake_save("slow", calls, delay=0.1)(folder)
        assert is_complete(target)  # the fast writer finished while this one was still writing

    errors: list[BaseException] = []

    def slow_writer() -> None:
        try:
            materialize_atomically(target, slow)
        except BaseException as error:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(error)

    worker = threading.Thread(target=slow_writer)
    worker.start()
    materialize_atomically(target, fast)
    worker.join()
    assert errors == []
    assert sorted(calls) == ["fast", "slow"]
    files = ("config.json", "model.safetensors", "tokenizer.json")
    assert {(target / f).read_text() for f in files} == {"fast"}
    assert _leftovers(tmp_path, "m") == []


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "m"

    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        materialize_atomically(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_writers_are_swept(tmp_path):
    target = tmp_path / "m"
    dead = tmp_path / ".m.tmp-dead"
    live = tmp_path / ".m.tmp-live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    materialize_atomically(target, _fake_save("a", []), stale_after_s=3600)
    assert _leftovers(tmp_path, "m") == [".m.tmp-live"]  # a writer may still be filling that one


def test_incomplete_target_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("half-written")
    materialize_atomically(target, _fake_save("new", []))
    assert (target / "config.json").read_text() == "new" and is_complete(target)
    assert _leftovers(tmp_path, "m") == []


# --- the real embedded model ----------------------------------------------------------------------


@pytest.mark.integration
def test_embedded_smollm2_loads_from_cache(smollm2):
    model, tokenizer = smollm2
    assert len(decoder_layers(model)) == 30
    assert is_complete(models.model_cache_dir(DEFAULT_MODEL))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    batch = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    summary = model_summary(model)
    assert (summary["num_layers"], summary["hidden_size"]) == (30, 576)
    assert 130e6 < summary["num_parameters"] < 140e6


@pytest.mark.integration
def test_embedded_bf16_copy_holds_the_fp32_weights_cast(smollm2):
    """A bf16 load reads its own cached copy (no fp32 weights in memory), and that copy is exactly the
    fp32 dequantisation cast to bf16, tied head included."""
    model, tokenizer = load_base_model(None, dtype="bf16")
    assert is_complete(models.model_cache_dir(f"{DEFAULT_MODEL}-bf16"))
    exact = dict(smollm2[0].named_parameters())
    loaded = dict(model.named_parameters())
    assert loaded.keys() == exact.keys()
    for name, p in loaded.items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, exact[name].to(torch.bfloat16)), name
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer("Hello")["input_ids"] == smollm2[1]("Hello")["input_ids"]


@pytest.mark.integration
def test_tiny_alias_uses_the_smollm2_tokenizer(smollm2):
    model, tokenizer = load_base_model("tiny-llama-L2", dtype="fp32")
    assert len(decoder_layers(model)) == 2
    assert model.config.vocab_size == len(tokenizer) == len(smollm2[1])
    assert model_summary(model)["name_or_path"] == "tiny-llama-L2"
    batch = tokenizer(["Hello there", "Hi"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.integration
def test_local_folder_round_trip(tmp_path, tokenizer):
    tiny_llama(num_layers=3, vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = tmp_path / "tokenizer_config.json"  # a tokenizer that pads left and has no pad token
    saved = json.loads(settings.read_text())
    saved.pop("pad_token", None)
    settings.write_text(json.dumps({**saved, "padding_side": "left"}))
    model, loaded_tokenizer = load_base_model(str(tmp_path), dtype="bf16", device="cpu")
    assert len(decoder_layers(model)) == 3
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert loaded_tokenizer.padding_side == "right"
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token


def test_unreachable_hub_fails_fast(monkeypatch):
    """Offline, an unknown model name is a one-line error at once, not after a minute of Hub retries."""
    import time

    from mola_search import hub

    monkeypatch.setattr(hub, "offline_reason", lambda: "huggingface.co:443 is unreachable (test)")
    start = time.perf_counter()
    with pytest.raises(UserError, match="unknown model 'nobody/no-such-model'"):
        load_base_model("nobody/no-such-model")
    assert time.perf_counter() - start < 15


def test_the_models_package_exports_what_it_lists():
    """`models` is a package of one module per job; its `__all__` is the public surface callers import."""
    assert sorted(models.__all__) == sorted(set(models.__all__))
    missing = [name for name in models.__all__ if not hasattr(models, name)]
    assert missing == []
    assert {"load_base_model", "tiny_llama", "decoder_layers", "materialize_atomically", "parse_device"} <= set(models.__all__)
