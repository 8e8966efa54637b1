"""Every tensor the trainer and the evaluators feed a model is on that model's device.

This machine has no GPU, so the CPU-only tests use a model that *declares* another device
(`cuda:0`) and refuses any input that was not moved there: `Tensor.to` is patched, for these
tests only, so that a move to the declared device tags a CPU copy instead of needing a GPU.
A batch built on the CPU and never moved (the bug a real GPU would show as a device mismatch)
reaches the model untagged and fails. The CUDA tests at the end run where a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.models import tiny_llama
from mola_search.tasks import Example
from mola_search.train import evaluate as ev
from mola_search.train.run import answer_nll
from mola_search.train.trainer import TrainConfig, train

DECLARED = torch.device("cuda", 0)


class DeviceChecking(nn.Module):
    """A model that says it lives on DECLARED and asserts that its inputs were moved there."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return DECLARED

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None:
                assert getattr(t, "_moved_to", None) == DECLARED, f"{name} reached the model without a move to {DECLARED}"
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Generation hands the prompt to `generate`, which keeps every new token on the prompt's device."""
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            assert getattr(t, "_moved_to", None) == DECLARED, f"{name} reached generate without a move to {DECLARED}"
        self.calls += 1
        return self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@pytest.fixture
def fake_gpu(monkeypatch):
    """`tensor.to(DECLARED)` returns a tagged CPU copy; every other `.to` behaves as usual."""
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target) == DECLARED:
            copy = self.clone()
            copy._moved_to = DECLARED
            return copy
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


@pytest.fixture(scope="module")
def tok():
    """The SmolLM2 tokenizer as load_base_model prepares it (pad = eos)."""
    from mola_search.models import load_base_model

    return load_base_model("tiny-llama-L1", dtype="fp32")[1]


def _model(tok) -> DeviceChecking:
    base = tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok))
    return DeviceChecking(MoLAModel(base, MoLAConfig(experts=(2, 3), top_k=(1, 2), rank=(4, 4), lora_dropout=0.0)))


def _examples(n: int, choices=(" no", " yes")) -> list[Example]:
    return [Example(f"Question {i}: is {i} even?\nAnswer:", choices, i % 2) for i in range(n)]


def test_trainer_moves_every_micro_batch(tok, fake_gpu):
    model = _model(tok)
    result = train(model, tok, _examples(8), TrainConfig(max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-3),
                   progress=False)
    assert result.steps == 2 and model.calls == 4


@pytest.mark.parametrize("choices", [(" no", " yes"), (" not at all", " yes indeed")])
def test_loglik_scoring_moves_its_batches(tok, fake_gpu, choices):
    model = _model(tok)
    res = ev.evaluate_accuracy(model, tok, _examples(5, choices), batch_size=2)
    assert res.n == 5 and all(math.isfinite(v) for v in res.gold_logprob) and model.calls >= 3


def test_generation_moves_its_prompt(tok, fake_gpu):
    model = _model(tok)
    res = ev.evaluate_generation(model, tok, _examples(2), max_new_tokens=3)
    assert res.n == 2 and model.calls == 2


def test_answer_nll_moves_its_batches(tok, fake_gpu):
    model = _model(tok)
    examples = [Example(f"Say {i}.", (), -1, target=f" {i} done") for i in range(3)]
    out = answer_nll(model, tok, examples, batch_size=2)
    assert math.isfinite(out["answer_nll"]) and model.calls == 2


def test_the_check_catches_a_batch_that_was_not_moved(tok, fake_gpu, monkeypatch):
    """With the move taken out (the bug: batches built on the CPU and fed as they are), the model refuses."""
    monkeypatch.setattr(ev, "to_device", lambda batch, device: batch)
    model = _model(tok)
    with pytest.raises(AssertionError, match="without a move"):
        ev.evaluate_accuracy(model, tok, _examples(2), batch_size=2)


# --- on a real GPU ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_training_and_scoring_run_on_the_gpu(tok):
    base = tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok)).to("cuda")
    model = MoLAModel(base, MoLAConfig(experts=(2, 3), top_k=(1, 2), rank=(4, 4)))
    assert model.device.type == "cuda" and all(p.device.type == "cuda" for p in model.parameters())
    result = train(model, tok, _examples(8), TrainConfig(max_steps=2, batch_size=4, micro_batch_size=2), progress=False)
    assert result.steps == 2
    res = ev.evaluate_accuracy(model, tok, _examples(4), batch_size=2)
    assert all(math.isfinite(v) for v in res.gold_logprob)
