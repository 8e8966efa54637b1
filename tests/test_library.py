"""mola_search as a library: the front door, HF Trainer, save/load, generate, and the README example.

Every model here is a tiny random LLaMA built in code (no download), so a Trainer run takes seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mola_search
from mola_search import AllocationSpec, MoLAConfig, MoLAModel, get_mola_model
from mola_search.errors import UserError
from mola_search.mola.layer import balance_loss

REPO = Path(__file__).resolve().parent.parent
VOCAB, LAYERS = 100, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


SPEC = AllocationSpec.build([2, 3], top_k=[1, 2], rank=4)


def mola(coef: float = 0.01, random_b: bool = False, **kwargs) -> MoLAModel:
    model = get_mola_model(llama(), SPEC, lora_dropout=0.0, aux_loss_coef=coef, **kwargs)
    if random_b:  # B starts at zero (the adapter starts as the identity); make it matter
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.mola_layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    return model


def batch(rows: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# --- the front door ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_front_door_names_and_a_light_import():
    assert set(mola_search.__all__) == {"get_mola_model", "AllocationSpec", "MoLAConfig", "MoLAModel",
                                        "ObjectiveTrial", "StudyConfig", "run_study"}
    # each name is imported when first used: `import mola_search` (which every sub-package runs first) loads
    # neither torch (mola_search.allocation promises to stay pure Python) nor the search's Optuna, Ray or SciPy
    code = ("import sys, mola_search; heavy = ('torch', 'optuna', 'ray', 'matplotlib', 'scipy');"
            "print([m for m in heavy if m in sys.modules]); from mola_search import get_mola_model, StudyConfig;"
            "print(get_mola_model.__module__, StudyConfig.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "mola_search.mola.model mola_search.search.config"]
    assert mola_search.run_study.__module__ == "mola_search.search.runner"


def test_get_mola_model_takes_a_spec_or_a_config():
    from_spec = get_mola_model(llama(), SPEC, aux_loss_coef=0.5, balance_loss="mola-official")
    c = from_spec.mola_config
    assert (c.experts, c.top_k, c.rank) == ((2, 3), (1, 2), (4, 4))
    assert (c.aux_loss_coef, c.balance_loss) == (0.5, "official")  # "mola-official" is the old name
    from_config = get_mola_model(llama(), MoLAConfig.from_spec(SPEC, lora_alpha=8.0), lora_dropout=0.0)
    assert (from_config.mola_config.lora_alpha, from_config.mola_config.lora_dropout) == (8.0, 0.0)
    trainable = [n for n, p in from_config.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 7 * LAYERS and all(n.endswith(("lora_A", "lora_B", "router")) for n in trainable)
    with pytest.raises(UserError, match="pass an AllocationSpec"):
        get_mola_model(llama(), [2, 3])


def test_config_is_the_base_models_and_attributes_come_from_it():
    model = mola()
    base = model.base_model
    assert model.config is base.config and isinstance(model.mola_config, MoLAConfig)
    model.config.use_cache = False  # what Trainer and the official script do; a frozen MoLAConfig would raise
    assert base.config.use_cache is False
    assert model.generation_config is base.generation_config
    assert model.get_input_embeddings() is base.get_input_embeddings()
    assert model.main_input_name == "input_ids"
    assert not hasattr(model, "peft_config")  # nothing pretends to be PEFT
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018


def test_print_trainable_parameters_in_pefts_format(capsys):
    base_params = sum(p.numel() for p in llama().parameters())
    model = mola()
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert m, line
    trainable, total = (int(g.replace(",", "")) for g in m.groups()[:2])
    # by hand: per layer and projection, E experts of A (r x d_in) and B (d_out x r), and a router (E x d_in)
    shapes = [(32, 32)] * 4 + [(32, 64), (32, 64), (64, 32)]  # q, k, v, o (4 heads of 8 = 32), gate, up, down
    expected = sum(e * (4 * (i + o) + i) for e in (2, 3) for i, o in shapes)
    assert trainable == expected and total == base_params + expected
    assert m.group(3) == f"{100 * expected / total:.4f}"


# --- training through outputs.loss ---------------------------------------------------------------


def test_loss_with_labels_holds_the_balance_term_once():
    model = mola(coef=0.5).train()
    inputs = batch()
    out = model(**inputs)
    aux = balance_loss(model.state.balance_terms, "per-module")
    logits, labels = out.logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten()
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    assert out.loss.item() == pytest.approx(ce.item() + 0.5 * aux.item(), rel=1e-5)
    assert 0.5 * aux.item() > 0.4  # the term is there (a balanced router gives 1 per module)
    # Trainer with gradient accumulation: the base loss is a share of the accumulated mean, and so is the term
    items = int((labels != -100).sum())
    out = model(**inputs, num_items_in_batch=3 * items)
    assert out.loss.item() == pytest.approx((ce.item() + 0.5 * aux.item()) / 3, rel=1e-5)
    model.eval()  # evaluation: the task loss alone
    assert model(**inputs).loss.item() == pytest.approx(ce.item(), rel=1e-5)


def _train_with_trainer(coef: float, tmp_path: Path, model: MoLAModel | None = None, accumulate: int = 1):
    from transformers import Trainer, TrainingArguments

    model = model or mola(coef=coef)
    data = [dict(zip(batch(), row)) for row in zip(*batch().values())]
    args = TrainingArguments(output_dir=str(tmp_path / f"coef{coef}"), max_steps=3,
                             per_device_train_batch_size=2 // accumulate, gradient_accumulation_steps=accumulate,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    model.config.use_cache = False  # as GCYZSL/MoLA's mola_training.py does after building its Trainer
    trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_trains_mola_with_the_balance_loss(tmp_path):
    before = mola(coef=0.0)
    start = {k: v.clone() for k, v in before.adapter_state_dict().items()}
    frozen = {n: p.clone() for n, p in before.base_model.named_parameters() if not p.requires_grad}
    trained, plain = _train_with_trainer(0.0, tmp_path, before)
    after = trained.adapter_state_dict()
    assert all(not torch.equal(after[k], start[k]) for k in start if k.endswith("lora_B"))  # B left zero
    assert all(torch.equal(p, frozen[n]) for n, p in trained.base_model.named_parameters() if n in frozen)

    coef = 5.0
    _, balanced = _train_with_trainer(coef, tmp_path)
    assert len(plain) == len(balanced) == 3
    # Step 1 sees the same batch with the same initial weights: the logged losses differ by coef x the
    # balance loss of that batch, computed here on a fresh copy of the model.
    probe = mola(coef=coef).train()
    probe(**batch())
    expected = coef * balance_loss(probe.state.balance_terms, "per-module").item()
    assert balanced[0] - plain[0] == pytest.approx(expected, rel=1e-4)
    assert expected > 1.0


def test_hf_trainer_counts_the_balance_term_once_per_step_under_gradient_accumulation(tmp_path):
    """Two micro-batches of one row: the logged step loss holds each row's balance loss with weight 1/2
    (its share of the label tokens), not both in full."""
    coef = 5.0
    _, plain = _train_with_trainer(0.0, tmp_path, accumulate=2)
    _, balanced = _train_with_trainer(coef, tmp_path, accumulate=2)
    per_row = []
    for row in range(2):
        probe = mola(coef=coef).train()
        probe(**{k: v[row:row + 1] for k, v in batch().items()})
        per_row.append(balance_loss(probe.state.balance_terms, "per-module").item())
    assert balanced[0] - plain[0] == pytest.approx(coef * sum(per_row) / 2, rel=1e-4)


def test_our_trainer_adds_the_balance_loss_itself_and_passes_no_labels():
    from mola_search.models import load_base_model, tiny_llama
    from mola_search.tasks import Example
    from mola_search.train.trainer import TrainConfig, train

    tok = load_base_model("tiny-llama-L1", dtype="fp32")[1]
    model = MoLAModel(tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok)),
                      MoLAConfig(experts=(2, 3), top_k=(1, 2), rank=(4, 4), lora_dropout=0.0))
    seen = []
    model.base_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("labels")), with_kwargs=True)
    examples = [Example(f"Is {i} even?\nAnswer:", (" no", " yes"), i % 2) for i in range(4)]
    result = train(model, tok, examples, TrainConfig(max_steps=1, batch_size=4, micro_batch_size=2), progress=False)
    assert len(seen) == 2 and all(labels is None for labels in seen)  # so outputs.loss never holds the term
    assert result.aux_curve[0][1] > 0  # ... and the trainer added it itself


# --- save, load, generate ------------------------------------------------------------------------


def test_save_pretrained_writes_only_the_adapter_and_from_pretrained_reproduces_logits(tmp_path):
    model = mola(random_b=True).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        bare = llama()(input_ids=ids).logits
    assert not torch.allclose(expected, bare, atol=1e-3)  # the adapter changes the output
    model.save_pretrained(tmp_path / "adapter", note="unit")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors",
                                                                          "mola_method.json"]  # the kind record
    record = json.loads((tmp_path / "adapter" / "mola_method.json").read_text())
    assert record["kind"] == "mola" and record["metadata"] == {"note": "unit"}
    saved = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert saved < 4 * model.num_trainable() + 10_000  # the adapter's fp32 tensors, no base weights
    reloaded = MoLAModel.from_pretrained(llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    assert reloaded.mola_config.extra == {"note": "unit"}
    model.save_adapter(tmp_path / "old-name")  # the name the run folders and the baselines use
    assert MoLAConfig.load(tmp_path / "old-name").experts == (2, 3)


def test_generate_runs_the_experts_with_the_kv_cache():
    model = mola(random_b=True).eval()
    prompt = batch(rows=1, length=6)["input_ids"]
    greedy = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **greedy)
    uncached = model.generate(prompt, use_cache=False, **greedy)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)
    assert not torch.equal(cached, llama().generate(prompt, **greedy))  # the experts were in the loop


def test_router_stats_during_batched_generation_count_real_tokens_only():
    """A KV cache feeds one position per step while the attention mask covers all of them: the layers
    still learn which of the positions they compute are padding."""
    model = mola(random_b=True).eval()
    ids = batch(rows=2, length=7)["input_ids"]
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])  # left padding, as generation needs
    with model.collecting_router_stats():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    real = int(mask.sum()) + 2 * 2  # the prompts' real tokens, then 2 rows x 2 fed-back new tokens
    assert {row["tokens"] for row in model.router_stats()} == {real}


# --- the README example --------------------------------------------------------------------------


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "library.md").read_text()
    section = text[text.index("## MoLA experts in any causal LM"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/library.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "trainable params:" in out
    assert (tmp_path / "mola-out" / "adapter" / "adapter_model.safetensors").is_file()
