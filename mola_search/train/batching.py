"""Examples -> token tensors: answer-only labels, left-truncated prompts, left-padded batches.

Left padding puts every row's answer at the end of the batch, so the LM head
(576 x 49k for SmolLM2: the biggest matmul of the model) only has to run on the
last few positions (`logits_to_keep`) in training and scoring alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mola_search.tasks import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: the loss is on the answer only

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt tokens, with the tokenizer's BOS if it uses one, so training and scoring agree."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, example: Example, cutoff_len: int) -> Encoded:
    """Prompt + answer (+ EOS for free-form targets); prompt cut from the left to fit `cutoff_len`.

    Cutting the prompt's start rather than the answer keeps the supervised tokens
    and the text right before them, which is what the answer depends on most.
    """
    answer = encode_answer(tokenizer, example.answer)
    if example.target is not None and tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    answer = answer[:cutoff_len - 1]
    prompt = encode_prompt(tokenizer, example.prompt)
    prompt = prompt[max(0, len(prompt) - (cutoff_len - len(answer))):]
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer)


WIDTH_MULTIPLE = 16
"""Batches are padded to a multiple of this many positions. On a CPU every new (rows x width) shape makes
oneDNN build and cache new matmul primitives for each linear of the model, forward and backward: with
activation checkpointing, multiples of 16 cut a cpu-quick trial's peak resident memory from 2,554 to 1,789 MB
and were not slower (`benchmarks/bench_trial.py --activation-checkpointing [--width-multiple 1]`, docs/performance.md,
Performance). Padding is masked out, so only bf16 rounding (other matmul blocking) changes."""


def collate(items: Sequence[Encoded], pad_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Left-pad a micro-batch to its longest sequence rounded up to `multiple` (default `WIDTH_MULTIPLE`);
    positions restart at 0 after the padding."""
    multiple = multiple or WIDTH_MULTIPLE
    longest = max(len(e.input_ids) for e in items)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, width - n:] = torch.tensor(e.input_ids)
        labels[row, width - n:] = torch.tensor(e.labels)
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model computes: its `device` attribute (Hugging Face models and our wrappers have one),
    else the device of its first parameter, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device` (non-blocking from CPU; a no-op for tensors already there).

    Every path that feeds a model (trainer, evaluators, answer NLL) builds its batch on the CPU
    with `collate` and moves it here, once, to `model_device(model)`.
    """
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def answer_span(batch: dict[str, torch.Tensor]) -> int:
    """How many trailing positions hold logits that predict answer tokens (+1 for the one before)."""
    labelled = (batch["labels"] != IGNORE).any(0).nonzero()
    return int(batch["labels"].shape[1] - labelled.min()) + 1 if len(labelled) else 1


def tail_logits(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions, computing the LM head only there when the model allows it."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    try:  # no KV cache: nothing decodes further from these positions
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits[:, -keep:]
    except TypeError:  # models without logits_to_keep: full logits, then slice
        return model(**inputs).logits[:, -keep:]


def batches(encoded: Sequence[Encoded], batch_size: int, generator: torch.Generator,
            shuffle: bool = True) -> Iterator[list[Encoded]]:
    """Shuffled batches, length-sorted inside windows of 8 batches to cut padding on CPU."""
    order = torch.randperm(len(encoded), generator=generator).tolist() if shuffle else list(range(len(encoded)))
    window = batch_size * 8
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i].input_ids))
        groups = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        if shuffle:
            perm = torch.randperm(len(groups), generator=generator).tolist()
            groups = [groups[i] for i in perm]
        for g in groups:
            yield [encoded[i] for i in g]
