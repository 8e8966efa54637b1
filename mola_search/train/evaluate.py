"""Scoring by answer log-likelihood: exact, cheap, and needs no generation.

Each example's choices are scored as sum_t log p(choice_t | prompt, choice_<t);
the prediction is the argmax.  When every choice is a single token (the
verbalizers we ship), one forward of the prompt scores all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mola_search.tasks import Example
from mola_search.train.batching import Encoded, answer_span, collate, encode_answer, encode_prompt, tail_logits


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    predictions: list[int]

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "n": self.n}


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
                  cutoff_len: int = 256) -> list[list[float]]:
    """Log-likelihood of every choice of every example (list per example)."""
    was_training = model.training
    model.eval()
    try:
        choice_ids = [[encode_answer(tokenizer, c) for c in ex.choices] for ex in examples]
        if all(len(ids) == 1 for per_ex in choice_ids for ids in per_ex):
            return _score_single_token(model, tokenizer, examples, choice_ids, batch_size, cutoff_len)
        return _score_sequences(model, tokenizer, examples, choice_ids, batch_size, cutoff_len)
    finally:
        model.train(was_training)


def _score_single_token(model, tokenizer, examples, choice_ids, batch_size, cutoff_len) -> list[list[float]]:
    prompts = [encode_prompt(tokenizer, ex.prompt)[-cutoff_len:] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([Encoded(prompts[i], prompts[i]) for i in idx], _pad_id(tokenizer))
        logp = F.log_softmax(tail_logits(model, batch, 1)[:, -1].float(), dim=-1)
        for row, i in enumerate(idx):
            scores[i] = logp[row, [ids[0] for ids in choice_ids[i]]].tolist()
    return scores


def _score_sequences(model, tokenizer, examples, choice_ids, batch_size, cutoff_len) -> list[list[float]]:
    items: list[tuple[int, Encoded]] = []
    for i, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, ex.prompt)
        for ids in choice_ids[i]:
            p = prompt[max(0, len(prompt) - (cutoff_len - len(ids))):]
            items.append((i, Encoded(p + ids, [-100] * len(p) + ids)))
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = collate([e for _, e in chunk], _pad_id(tokenizer))
        keep = answer_span(batch)
        logp = F.log_softmax(tail_logits(model, batch, keep)[:, :-1].float(), dim=-1)
        target = batch["labels"][:, -keep + 1:]
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        totals = (picked * (target != -100)).sum(1)
        for (i, _), total in zip(chunk, totals.tolist()):
            scores[i].append(total)
    return scores


def evaluate_accuracy(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
                      cutoff_len: int = 256) -> EvalResult:
    if not examples:
        return EvalResult(float("nan"), 0, [])
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, cutoff_len=cutoff_len)
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples))
    return EvalResult(correct / len(examples), len(examples), preds)


@torch.no_grad()
def evaluate_generation(model: nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 8,
                        cutoff_len: int = 256) -> EvalResult:
    """The paper's protocol: greedy decoding, then the first choice that appears in the output."""
    was_training = model.training
    model.eval()
    preds = []
    try:
        for ex in examples:
            ids = torch.tensor([encode_prompt(tokenizer, ex.prompt)[-cutoff_len:]])
            generated = []
            for _ in range(max_new_tokens):  # plain greedy loop: works for wrapped adapters too
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                generated.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            preds.append(parse_choice(tokenizer.decode(generated), ex.choices))
    finally:
        model.train(was_training)
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples))
    return EvalResult(correct / max(1, len(examples)), len(examples), preds)


def parse_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice whose text starts the output (else occurs earliest); -1 if none does."""
    text = text.strip().lower()
    stripped = [c.strip().lower() for c in choices]
    for i, c in enumerate(stripped):
        if text.startswith(c) and all(not text.startswith(o) or len(o) <= len(c) for o in stripped):
            return i
    found = [(text.find(c), i) for i, c in enumerate(stripped) if c and text.find(c) >= 0]
    return min(found)[1] if found else -1


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
