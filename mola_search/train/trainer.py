"""The training loop: AdamW, gradient accumulation, warmup + linear decay, answer-only loss.

Method-agnostic: the model is anything callable like a HF causal LM whose
trainable parameters have requires_grad=True; if it has `auxiliary_loss()` (MoLA's
load balancing) that term is added to the task loss.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mola_search.errors import UserError
from mola_search.tasks import Example
from mola_search.train.batching import (IGNORE, answer_span, batches, collate, encode_example, model_device,
                                        tail_logits, to_device)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the trial is recorded as failed with this reason."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    epochs: float = 1.0
    max_steps: int | None = None       # optimizer steps; overrides epochs when set; 0 = evaluate only
    batch_size: int = 16               # effective batch (examples per optimizer step)
    micro_batch_size: int = 8          # examples per forward; batch_size / micro = accumulation steps
    cutoff_len: int = 256
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    # Keep only each decoder layer's input for backward and recompute the rest there: the same numbers,
    # a fraction of the activation memory, about one more forward per step (docs/performance.md).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Values may come from YAML, where `lr: 3e-4` is a string (YAML 1.1 floats need a dot).
        for name in ("lr", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm"):
            object.__setattr__(self, name, _number(name, getattr(self, name), float))
        for name in ("max_steps", "batch_size", "micro_batch_size", "cutoff_len", "seed", "log_every"):
            if not (name == "max_steps" and self.max_steps is None):
                object.__setattr__(self, name, _number(name, getattr(self, name), int))
        # Nonsense here would otherwise surface mid-run as a traceback (range step 0, empty answers, ...).
        problems = []
        if not isinstance(self.activation_checkpointing, bool):
            problems.append(f"`activation_checkpointing` {self.activation_checkpointing!r} (need true or false)")
        if not self.lr > 0:
            problems.append(f"`lr` {self.lr} (need > 0)")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"`max_steps` {self.max_steps} (need >= 0: 0 only evaluates, unset uses epochs)")
        if self.max_steps is None and not self.epochs > 0:
            problems.append(f"`epochs` {self.epochs} (need > 0)")
        for name in ("batch_size", "micro_batch_size", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}` {getattr(self, name)} (need >= 1)")
        if self.cutoff_len < 2:
            problems.append(f"`cutoff_len` {self.cutoff_len} (need >= 2: one prompt and one answer token)")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            problems.append(f"`warmup_ratio` {self.warmup_ratio} (need 0..1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("`weight_decay` and `max_grad_norm` (need >= 0)")
        if problems:
            raise UserError("invalid training settings: " + "; ".join(problems))

    def steps_for(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(num_examples * self.epochs / self.batch_size))

    def to_dict(self) -> dict:
        return asdict(self)


def _number(name: str, value, kind: type) -> float | int:
    """`value` as a float / int; numeric strings are accepted, anything else is a UserError."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, numbers.Integral):
            return int(value)  # not through float: large seeds stay exact
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"training setting {name} is {value!r}: use {what}") from None


@dataclass
class StepEvent:
    """Passed to callbacks after every optimizer step; a callback returning True stops training."""
    step: int
    total_steps: int
    loss: float
    tokens_seen: int
    elapsed: float
    lr: float = 0.0  # the learning rate this step used


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


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then linear decay.

    Warmup starts at 1/(warmup+1) rather than 0 so no step is wasted; decay ends at
    1/(total-warmup) on the last step rather than 0 for the same reason.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (labels != IGNORE).

    With `normalizer`, the sum over answer tokens divided by it instead: a micro-batch's share
    of the whole batch's mean, which is 0 (not NaN) when the micro-batch holds no answer token.
    """
    flat_logits, flat_labels = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
    if normalizer is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum") / normalizer


def train(model: nn.Module, tokenizer, examples: Sequence[Example], config: TrainConfig, *,
          callbacks: Sequence[Callable[[StepEvent], bool | None]] = (), progress: bool = True) -> TrainResult:
    """Train `model`'s trainable parameters on `examples` for `config.steps_for(len(examples))` optimizer steps.

    Each step draws `config.batch_size` examples, runs them in micro-batches whose gradients add up to the
    whole batch's (`_backward`), then clips, steps AdamW and advances the warmup + linear-decay schedule.
    Callbacks see a `StepEvent` after every step; one returning True stops training.
    """
    seed_everything(config.seed)
    encoded = [encode_example(tokenizer, ex, config.cutoff_len) for ex in examples]
    if not encoded:
        raise UserError("no training examples: the train split is empty (check `max_train_examples` and the data)")
    total_steps = config.steps_for(len(encoded))
    if total_steps == 0:  # evaluate-only (e.g. a saved adapter via --init-from): no optimizer, no mode change
        return TrainResult(steps=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(params, config, total_steps)
    generator = torch.Generator().manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    aux_fn = getattr(model, "auxiliary_loss", None)  # MoLA's load balancing; None: a plain causal LM
    device = model_device(model)  # batches go where the model is
    autocast = _autocast(device)  # bf16 (fp16) autocast on CUDA, nothing on the CPU
    if config.activation_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()

    result = TrainResult(steps=0)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    step_iter = _endless(encoded, config.batch_size, generator)
    try:
        while result.steps < total_steps:
            batch = next(step_iter)
            micro = [to_device(collate(batch[i:i + config.micro_batch_size], pad_id), device)
                     for i in range(0, len(batch), config.micro_batch_size)]
            step_loss, step_aux = _backward(model, micro, len(batch), aux_fn, autocast)
            result.train_tokens += sum(int(inputs["attention_mask"].sum()) for inputs in micro)
            if not math.isfinite(step_loss):
                raise TrainingDiverged(f"loss became {step_loss} at step {result.steps + 1}")
            if not math.isfinite(step_aux):
                raise TrainingDiverged(f"load-balancing loss became {step_aux} at step {result.steps + 1}")
            step_lr = _optimizer_step(optimizer, schedule, params, config.max_grad_norm)
            result.steps += 1
            elapsed = time.perf_counter() - start
            if result.steps % config.log_every == 0 or result.steps == total_steps or result.steps == 1:
                result.loss_curve.append((result.steps, step_loss))
                result.aux_curve.append((result.steps, step_aux))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.train_tokens / elapsed:.0f}")
            event = StepEvent(result.steps, total_steps, step_loss, result.train_tokens, elapsed, step_lr)
            if any(cb(event) for cb in callbacks):
                result.stopped_early = True
                break
    finally:  # a raise (divergence, a pruning callback) must not leave a half-drawn bar
        bar.close()
    result.wall_time = time.perf_counter() - start
    return result


def _optimizer(params: list[nn.Parameter], config: TrainConfig, total_steps: int):
    """AdamW over `params` and its schedule: linear warmup over `warmup_ratio` of the steps, then linear decay."""
    optimizer = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return optimizer, schedule


def adamw(params: list[nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)`, fused into one kernel per step where the parameters allow it (floating
    point, on a CPU or a CUDA device). On a CPU PyTorch otherwise picks its per-tensor loop, a dozen passes over every
    parameter and its two moments: for MoLA's 13 M SmolLM2 parameters about 4x the fused kernel's time."""
    fusable = params and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16,
                                                                                 torch.float16) for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a build or device without the fused kernel
            pass
    return torch.optim.AdamW(params, **kwargs)


def _enable_activation_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise UserError(f"activation_checkpointing: {type(model).__name__} cannot recompute its layers; "
                        "train with activation_checkpointing false")
    enable()


def _backward(model: nn.Module, micro: list[dict[str, torch.Tensor]], batch_size: int, aux_fn, autocast
              ) -> tuple[float, float]:
    """Forward and backward over one batch's micro-batches; returns (task loss, auxiliary loss) of the batch.

    The task loss is summed over answer tokens and divided by the whole batch's answer-token count, so the
    accumulated gradient is exactly one big batch's and a micro-batch without answer tokens adds 0, not NaN.
    The auxiliary loss (computed per micro-batch: its batch statistics are not additive) is weighted by the
    micro-batch's share of the examples.
    """
    answer_tokens = sum(int((inputs["labels"][:, 1:] != IGNORE).sum()) for inputs in micro)
    step_loss = step_aux = 0.0
    for inputs in micro:
        keep = answer_span(inputs)
        with autocast:
            logits = tail_logits(model, inputs, keep)
        loss = answer_loss(logits, inputs["labels"][:, -keep:], normalizer=max(1, answer_tokens))
        aux = aux_fn() if aux_fn is not None else None
        share = len(inputs["input_ids"]) / batch_size
        total = loss + aux * share if aux is not None else loss
        total.backward()
        step_loss += loss.detach()
        if aux is not None:
            step_aux += aux.detach() * share
    return float(step_loss), float(step_aux)


def _optimizer_step(optimizer, schedule, params: list[nn.Parameter], max_grad_norm: float) -> float:
    """Clip the gradients, step, advance the schedule and clear the gradients; returns the lr this step used."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    step_lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return step_lr


def _autocast(device: torch.device):
    """On CUDA the forward runs under bf16 (fp16 without bf16) autocast: the frozen base is stored in that
    dtype already, and the fp32 adapter weights stay fp32 masters. On the CPU nothing changes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _endless(encoded, batch_size, generator):
    while True:
        yield from batches(encoded, batch_size, generator)
