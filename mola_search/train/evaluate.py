"""Scoring by answer log-likelihood: exact, cheap, and needs no generation.

Each example's choices are scored as sum_t log p(choice_t | prompt, choice_<t);
the prediction is the argmax.  When every choice is a single token (the
verbalizers we ship), one forward of the prompt scores all of them at once.

Besides accuracy, the same scores give continuous per-example measures that a
search can rank short runs by (accuracy on a few hundred examples is quantised
and sits at the majority class for most short runs):

* ``gold_logprob``: log p(gold | choices), the gold choice's log-likelihood
  normalised over the choices (log-softmax of the choice scores); <= 0, higher
  is better, 0 means certain and right.
* ``margin``: log-likelihood of the gold choice minus the best wrong choice
  (> 0 exactly when the prediction is right).

`EvalResult.to_dict` also carries the task's usual metric where it has one
(MRPC: F1 of the positive class, label 1; CoLA: Matthews correlation) and, with
`per_example=True`, the per-example arrays keyed by stable example ids, so two
runs can be compared paired on the same examples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mola_search.tasks import Example
from mola_search.train.batching import (Encoded, answer_span, collate, encode_answer, encode_prompt, model_device,
                                        tail_logits, to_device)


# Scores a search may optimise ("--metric"); the first is the default objective.
METRICS: tuple[str, ...] = ("gold_logprob", "margin", "accuracy", "f1", "mcc")
DEFAULT_METRIC = METRICS[0]
PER_EXAMPLE: tuple[str, ...] = ("gold_logprob", "margin", "correct")
# The usual GLUE metric of a task beside accuracy: MRPC reports F1 of label 1 (paraphrase), CoLA Matthews r.
TASK_METRICS: dict[str, str] = {"mrpc": "f1", "cola": "mcc"}


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    predictions: list[int]
    gold_logprob: list[float] = field(default_factory=list)   # per example: log p(gold | choices)
    margin: list[float] = field(default_factory=list)         # per example: gold minus best wrong choice
    labels: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def task_metrics(self, task: str | None) -> dict[str, float]:
        """The task's usual metric beside accuracy (f1 for mrpc, mcc for cola), else nothing."""
        name = TASK_METRICS.get((task or "").lower())
        if name is None or not self.labels:
            return {}
        from sklearn.metrics import f1_score, matthews_corrcoef

        if name == "f1":
            return {"f1": float(f1_score(self.labels, self.predictions, pos_label=1, zero_division=0.0))}
        return {"mcc": float(matthews_corrcoef(self.labels, self.predictions))}

    def to_dict(self, task: str | None = None, per_example: bool = False) -> dict:
        out: dict = {"accuracy": self.accuracy, "n": self.n}
        if self.gold_logprob:
            out["gold_logprob"] = math.fsum(self.gold_logprob) / len(self.gold_logprob)
            out["margin"] = math.fsum(self.margin) / len(self.margin)
        out.update(self.task_metrics(task))
        if per_example and self.gold_logprob:
            out["per_example"] = {"ids": list(self.ids), "gold_logprob": list(self.gold_logprob),
                                  "margin": list(self.margin),
                                  "correct": [int(p == y) for p, y in zip(self.predictions, self.labels)]}
        return out


def example_id(example: Example) -> str:
    """A stable id of an example (its content), so runs pair on the same examples whatever their order."""
    text = "\x1f".join((example.prompt, *example.choices, str(example.label)))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


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
        batch = to_device(collate([Encoded(prompts[i], prompts[i]) for i in idx], _pad_id(tokenizer)),
                          model_device(model))
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
        batch = to_device(collate([e for _, e in chunk], _pad_id(tokenizer)), model_device(model))
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
    return result_from_scores(scores, examples)


def result_from_scores(scores: Sequence[Sequence[float]], examples: Sequence[Example]) -> EvalResult:
    """Accuracy and the continuous per-example measures from the choices' log-likelihoods."""
    preds, gold, margin = [], [], []
    for s, ex in zip(scores, examples):
        preds.append(max(range(len(s)), key=s.__getitem__))
        top = max(s)
        log_norm = top + math.log(math.fsum(math.exp(v - top) for v in s))
        gold.append(s[ex.label] - log_norm)
        wrong = [v for i, v in enumerate(s) if i != ex.label]
        margin.append(s[ex.label] - max(wrong) if wrong else 0.0)
    labels = [ex.label for ex in examples]
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    return EvalResult(correct / len(examples), len(examples), preds, gold, margin, labels,
                      [example_id(ex) for ex in examples])


def evaluate_generation(model: nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 8,
                        cutoff_len: int = 256) -> EvalResult:
    """The paper's protocol: greedy decoding, then the choice the output names (`parse_choice`)."""
    texts = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, cutoff_len=cutoff_len)
    preds = [parse_choice(text, ex.choices) for text, ex in zip(texts, examples)]
    labels = [ex.label for ex in examples]
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    return EvalResult(correct / max(1, len(examples)), len(examples), preds, labels=labels,
                      ids=[example_id(ex) for ex in examples])


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 8,
                     cutoff_len: int = 256) -> list[str]:
    """Each example's greedy continuation up to the tokenizer's EOS, decoded.

    Decoding runs through the model's own `generate` (MoLAModel and the baseline wrappers forward it
    to the base model or to PEFT), so it keeps the KV cache: every step computes one new position
    instead of the whole sequence again. One example at a time, as the prompt alone (no padding)
    gives the same tokens whatever else is in the split.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    texts = []
    try:
        for ex in examples:
            ids = torch.tensor([encode_prompt(tokenizer, ex.prompt)[-cutoff_len:]]).to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            new = out[0, ids.shape[1]:].tolist()
            texts.append(tokenizer.decode(new[:new.index(eos)] if eos in new else new))
    finally:
        model.train(was_training)
    return texts


# Words a model may answer a yes/no question with, beyond the verbalizers themselves. A negation
# ("not equivalent", "no, ...") is read before the word it negates.
_YES = {"yes", "true", "correct", "equivalent", "paraphrase", "paraphrases", "entailment", "entails", "acceptable",
        "grammatical", "same"}
_NO = {"no", "not", "false", "incorrect", "different", "unacceptable", "ungrammatical", "neither"}
_LETTER_PATTERNS = (
    r"\banswer\s*(?:is|:)?\s*(?:option\s*)?\(?([A-Za-z])\)?(?![A-Za-z])",   # "The answer is B", "Answer: (C)"
    r"\b(?:option|choice)\s*\(?([A-Za-z])\)?(?![A-Za-z])",                 # "option D"
    r"^\s*\(?([A-Z])\)?(?:[.):,\s]|$)",                                    # "B.", "(C) ...", "D"
    r"(?<![A-Za-z])([A-Z])(?![A-Za-z])",                                      # a capital letter standing alone
)


def parse_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice a generated answer names; -1 when it names none.

    Lettered choices (" A" ... " E"): an explicit "answer is X" / "Answer: (X)" / "option X" first, then a
    letter at the start ("B.", "(C)"), then a capital letter standing alone, never a letter inside a word
    (the "e" of "the"). Word choices (" yes"/" no"): the first word that is a choice, or a yes/no synonym
    such as "equivalent" / "not" ("Not equivalent" -> no). Otherwise the choice whose text starts the
    output, then the earliest whole-word occurrence of one.
    """
    import re

    stripped = [c.strip() for c in choices]
    letters = {c.upper(): i for i, c in enumerate(stripped) if len(c) == 1 and c.isalpha()}
    if letters and len(letters) == len(stripped):
        for pattern in _LETTER_PATTERNS:
            for match in re.finditer(pattern, text.strip(), flags=re.IGNORECASE if "answer" in pattern or
                                     "option" in pattern else 0):
                letter = match.group(1).upper()
                if letter in letters:
                    return letters[letter]
        return -1
    words = [c.lower() for c in stripped]
    tokens = re.findall(r"[a-z]+", text.lower())
    yes = next((i for i, w in enumerate(words) if w == "yes"), None)
    no = next((i for i, w in enumerate(words) if w == "no"), None)
    for token in tokens:
        if token in words:
            return words.index(token)
        if yes is not None and no is not None:
            if token in _NO:
                return no
            if token in _YES:
                return yes
    lowered = text.strip().lower()
    starts = [i for i, w in enumerate(words) if w and lowered.startswith(w)]
    if starts:
        return max(starts, key=lambda i: len(words[i]))
    found = [(m.start(), i) for i, w in enumerate(words) if w
             for m in [re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", lowered)] if m]
    return min(found)[1] if found else -1


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
