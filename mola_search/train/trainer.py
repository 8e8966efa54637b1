"""The training loop: AdamW, gradient accumulation, warmup + linear decay, answer-only loss.

Method-agnostic: the model is anything callable like a HF causal LM whose
trainable parameters have requires_grad=True; if it has `auxiliary_loss()` (MoLA's
load balancing) that term is added to the task loss.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mola_search.tasks import Example
from mola_search.train.batching import IGNORE, answer_span, batches, collate, encode_example, tail_logits


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the trial is recorded as failed with this reason."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    epochs: float = 1.0
    max_steps: int | None = None       # optimizer steps; overrides epochs when set
    batch_size: int = 16               # effective batch (examples per optimizer step)
    micro_batch_size: int = 8          # examples per forward; batch_size / micro = accumulation steps
    cutoff_len: int = 256
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10

    def steps_for(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(num_examples * self.epochs / self.batch_size))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepEvent:
    """Passed to callbacks after every optimizer step; a callback returning True stops training."""
    step: int
    total_steps: int
    loss: float
    tokens_seen: int
    elapsed: float


@dataclass
class TrainResult:
    steps: int
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    aux_curve: list[tuple[int, float]] = field(default_factory=list)
    train_tokens: int = 0
    wall_time: float = 0.0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.wall_time if self.wall_time else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (labels != IGNORE)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def train(model: nn.Module, tokenizer, examples: Sequence[Example], config: TrainConfig, *,
          callbacks: Sequence[Callable[[StepEvent], bool | None]] = (), progress: bool = True) -> TrainResult:
    seed_everything(config.seed)
    encoded = [encode_example(tokenizer, ex, config.cutoff_len) for ex in examples]
    if not encoded:
        raise ValueError("no training examples")
    total_steps = config.steps_for(len(encoded))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    generator = torch.Generator().manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    aux_fn = getattr(model, "auxiliary_loss", None)

    result = TrainResult(steps=0)
    model.train()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    step_iter = _endless(encoded, config.batch_size, generator)
    while result.steps < total_steps:
        batch = next(step_iter)
        micro = [batch[i:i + config.micro_batch_size] for i in range(0, len(batch), config.micro_batch_size)]
        answer_tokens = sum(e.num_answer_tokens for e in batch)
        step_loss = step_aux = 0.0
        for mb in micro:
            inputs = collate(mb, pad_id)
            keep = answer_span(inputs)
            logits = tail_logits(model, inputs, keep)
            # Token-weighted so accumulation gives the same gradient as one big batch.
            weight = sum(e.num_answer_tokens for e in mb) / max(1, answer_tokens)
            loss = answer_loss(logits, inputs["labels"][:, -keep:]) * weight
            aux = aux_fn() if aux_fn is not None else None
            total = loss + aux * (len(mb) / len(batch)) if aux is not None else loss
            total.backward()
            step_loss += loss.detach()
            if aux is not None:
                step_aux += aux.detach() * (len(mb) / len(batch))
            result.train_tokens += int(inputs["attention_mask"].sum())
        step_loss = float(step_loss)
        if not math.isfinite(step_loss):
            raise TrainingDiverged(f"loss became {step_loss} at step {result.steps + 1}")
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps += 1
        elapsed = time.perf_counter() - start
        if result.steps % config.log_every == 0 or result.steps == total_steps or result.steps == 1:
            result.loss_curve.append((result.steps, step_loss))
            result.aux_curve.append((result.steps, float(step_aux)))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.train_tokens / elapsed:.0f}")
        event = StepEvent(result.steps, total_steps, step_loss, result.train_tokens, elapsed)
        if any(cb(event) for cb in callbacks):
            result.stopped_early = True
            break
    bar.close()
    result.wall_time = time.perf_counter() - start
    return result


def _endless(encoded, batch_size, generator):
    while True:
        yield from batches(encoded, batch_size, generator)
