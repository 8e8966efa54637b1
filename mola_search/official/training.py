"""A study's training as the flags of the official `mola_training.py` (GCYZSL/MoLA), and what cannot carry over.

Read from the official code at commit 01785c84c70846999638b11b88409fdf86361d9a: `train()`'s signature and
body in `mola_training.py` (a `transformers.TrainingArguments` with warmup_steps=100, fp16, AdamW and the
library defaults otherwise) and the step arithmetic of its Trainer (`src/mola_trainer_hacked.py`, a copy
of transformers 4.28's: ``max(ceil(n / micro_batch_size) // accumulation, 1)`` optimizer steps per epoch,
``ceil(num_epochs * that)`` in all).

`settings` is a plain dict, as study.json holds it or as a run's config (`RunConfig.to_dict()`, the
"config" of metrics.json):

* ``model``, ``task``, ``method`` (only "mola" exports);
* ``train``: `TrainConfig` overrides (lr, epochs, max_steps, batch_size, micro_batch_size, cutoff_len,
  warmup_ratio, weight_decay, max_grad_norm, seed, ...);
* the adapter settings of `RunConfig`, at the top level or inside ``train``: lora_alpha, lora_dropout,
  target_modules, balance_loss, aux_loss_coef (unset: `RunConfig`'s defaults);
* a study's ``fidelity``, the effective one (the space's fidelity with the study's overrides, as
  `Fidelity.to_dict()` gives it: max_train_examples, max_eval_examples, epochs, max_steps), with
  ``finalist_train_examples`` / ``finalist_eval_examples`` and ``seed`` (the study seed); a run config
  has ``max_train_examples`` / ``max_eval_examples`` instead.

What is exported is the finalists' training (full fidelity), set as `search.trial` sets it: fidelity.epochs
replaces train.epochs, fidelity.max_steps (else train.max_steps) counts optimizer steps, on
finalist_train_examples (else fidelity.max_train_examples) training examples.

Per parameter, decided as follows:

* batch_size, learning_rate, cutoff_len, lora_alpha, lora_dropout: the same flags.
* per-layer experts, top-k and rank: number_experts, top_k, lora_r (the official code indexes all three by
  layer, `r[layer_index]` included, so ranks that differ between layers carry over).
* target_modules: the official kinds among them, in the official order; the fused kinds (qkv_proj,
  gate_up_proj) a LLaMA does not have are dropped; none left is refused (`target_modules`).
* micro_batch_size: the largest divisor of batch_size not above it (NOTE when changed). The official
  script accumulates ``batch_size // micro_batch_size`` micro-batches, so 16 // 6 would train on 12
  examples per step; ours splits a batch of batch_size as it divides, micro-batches only bound memory.
* epochs / max_steps: num_epochs is chosen so that the official Trainer takes the study's number of
  optimizer steps (``steps_for`` of the study's TrainConfig). Its count is ``ceil(num_epochs * P)`` for a
  float num_epochs, so a float giving exactly the study's count always exists: max_steps studies carry over
  exactly, and an epochs study gets a NOTE when rounding of partial batches makes num_epochs differ from
  its epochs. max_steps 0 (evaluation only) has nothing to train and is refused (`max_steps`).
* balance loss: official at 0.001 -> obalance True (exact); official at another coefficient ->
  obalance True and a NOTE (0.001 is a constant there); coefficient 0 -> obalance False; per-module ->
  obalance False and a NOTE: the official loss is another objective (pooled per layer, padding included,
  summed over layers), and adding it would train with a loss the study did not use.
* warmup_ratio, weight_decay, max_grad_norm: no flags (warmup is 100 steps, weight decay 0, clipping at
  1.0): NOTE where the study's differ. Carried rather than refused: no study could export otherwise.
* method other than mola: refused (`method`).
* fixed flags: val_set_size 0 (the study trains on all of its train subset), train_on_inputs False (the
  loss on the response only: closest to our answer-only loss), add_eos_token True (the official evaluation
  needs the model to stop), group_by_length False, prompt_template_name alpaca, resume_from_checkpoint False
  (its default names a folder of the authors').

Call order: `study_training(settings)` -> `official_train_flags(spec, settings, ...)` -> `fire_argv(flags)`.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.mola.config import OFFICIAL, OFFICIAL_AUX_COEF
from mola_search.mola.official import balance_flag
from mola_search.mola.official_checkpoint import OFFICIAL_KINDS

OFFICIAL_WARMUP_STEPS = 100
"""`warmup_steps` of the official TrainingArguments (no flag)."""
ADAPTER_KEYS: tuple[str, ...] = ("method", "lora_alpha", "lora_dropout", "target_modules", "balance_loss",
                                 "aux_loss_coef")
FIDELITY_KEYS: tuple[str, ...] = ("max_train_examples", "max_eval_examples", "epochs")


@dataclass(frozen=True)
class StudyTraining:
    """How a study trained its finalists (or a run trained): the run settings and the data sizes."""

    run: Any                      # RunConfig: adapter settings, and `train` with the finalists' epochs / max_steps
    train_examples: int | None    # None: the whole train split
    eval_examples: int | None
    seed: int                     # draws the train subset (the study seed: its search trials' subset)


@dataclass(frozen=True)
class OfficialTraining:
    """The official train() flags (its parameter names, in its order, Python values) and the notes."""

    flags: dict[str, Any]
    notes: list[str]
    steps: int


def study_training(settings: Mapping[str, Any]) -> StudyTraining:
    """The finalists' training of a study (or a run's training) from its settings (see the module docstring)."""
    from mola_search.train.run import RunConfig

    raw_train = dict(settings.get("train") or {})
    adapter = {k: raw_train.pop(k) for k in ADAPTER_KEYS if k in raw_train}
    adapter.update({k: settings[k] for k in ADAPTER_KEYS if settings.get(k) is not None})
    fidelity = settings.get("fidelity")
    if fidelity is not None:
        missing = [k for k in FIDELITY_KEYS if k not in fidelity]
        if missing:
            raise UserError(f"`fidelity` lacks {', '.join(missing)}: pass the study's effective fidelity "
                            "(the space's, with the study's overrides: Fidelity.to_dict())")
        raw_train["epochs"] = fidelity["epochs"]
        if fidelity.get("max_steps"):
            raw_train["max_steps"] = fidelity["max_steps"]
        train_n = settings.get("finalist_train_examples") or fidelity["max_train_examples"]
        eval_n = settings.get("finalist_eval_examples") or fidelity["max_eval_examples"]
        seed = int(settings.get("seed", 0))
    else:
        train_n, eval_n = settings.get("max_train_examples"), settings.get("max_eval_examples")
        seed = int(raw_train.get("seed", 0))
    base = {k: settings[k] for k in ("model", "task") if settings.get(k) is not None}
    run = RunConfig.from_dict({**base, **adapter, "train": raw_train})
    return StudyTraining(run, train_n, eval_n, seed)


def official_train_flags(spec: AllocationSpec, settings: Mapping[str, Any], *, num_train_examples: int,
                         data_path: str, output_dir: str, base_model: str | None = None) -> OfficialTraining:
    """The official `train()` flags that train `spec` as `settings` trained, on `num_train_examples` examples.

    Refusals are one-line `UserError`s naming the parameter; the notes say what carries over only roughly.
    `base_model` defaults to the settings' model."""
    study = study_training(settings)
    run, train = study.run, study.run.train
    if run.method != "mola":
        raise UserError(f"`method` is '{run.method}': only MoLA trainings have official flags")
    if train.max_steps == 0:
        raise UserError("`max_steps` is 0 (evaluation only): there is no training to export")
    if num_train_examples < 1:
        raise UserError("`max_train_examples` leaves no training example to export")
    targets = [k for k in OFFICIAL_KINDS if k in run.target_modules]
    if not targets:
        raise UserError(f"`target_modules` {list(run.target_modules)} holds none of the modules the official "
                        f"code adapts ({', '.join(OFFICIAL_KINDS)})")
    micro = max(d for d in range(1, min(train.batch_size, train.micro_batch_size) + 1) if train.batch_size % d == 0)
    steps = train.steps_for(num_train_examples)
    num_epochs = epochs_for_steps(steps, num_train_examples, train.batch_size, micro)
    obalance, notes = balance_flag(run.balance_loss, run.aux_loss_coef)
    notes = [*_batch_notes(train, micro), *_length_notes(train, num_epochs, steps, num_train_examples),
             *notes, *_optimizer_notes(train, steps)]
    flags = {"base_model": base_model or run.model, "data_path": data_path, "output_dir": output_dir,
             "batch_size": train.batch_size, "micro_batch_size": micro, "num_epochs": num_epochs,
             "learning_rate": train.lr, "cutoff_len": train.cutoff_len, "val_set_size": 0,
             "lora_r": list(spec.rank), "lora_alpha": run.lora_alpha, "lora_dropout": run.lora_dropout,
             "lora_target_modules": targets, "number_experts": list(spec.experts), "top_k": list(spec.top_k),
             "train_on_inputs": False, "add_eos_token": True, "group_by_length": False,
             "resume_from_checkpoint": False, "prompt_template_name": "alpaca", "obalance": obalance}
    return OfficialTraining(flags, notes, steps)


def official_steps(num_epochs: float, n: int, batch_size: int, micro_batch_size: int) -> int:
    """Optimizer steps the official Trainer takes (transformers 4.28's arithmetic, one process)."""
    accumulation = batch_size // micro_batch_size
    per_epoch = max(math.ceil(n / micro_batch_size) // accumulation, 1)
    return math.ceil(num_epochs * per_epoch)


def epochs_for_steps(steps: int, n: int, batch_size: int, micro_batch_size: int) -> float:
    """The num_epochs (a float, integral when it can be) for which the official Trainer takes `steps` steps."""
    per_epoch = official_steps(1, n, batch_size, micro_batch_size)
    epochs = steps / per_epoch
    while official_steps(epochs, n, batch_size, micro_batch_size) > steps:
        epochs = math.nextafter(epochs, 0.0)
    while official_steps(epochs, n, batch_size, micro_batch_size) < steps:
        epochs = math.nextafter(epochs, math.inf)
    return float(int(epochs)) if epochs.is_integer() else epochs


def _batch_notes(train: Any, micro: int) -> list[str]:
    if micro == train.micro_batch_size:
        return []
    return [f"micro_batch_size {micro} instead of the study's {train.micro_batch_size}: the official script "
            f"accumulates batch_size // micro_batch_size micro-batches, which must make up batch_size "
            f"{train.batch_size} (micro-batches only bound memory in the study's trainer)"]


def _length_notes(train: Any, num_epochs: float, steps: int, n: int) -> list[str]:
    if train.max_steps is not None:
        return [f"the study trained {steps} optimizer steps (max_steps) of {train.batch_size} examples out of "
                f"{n}; the official script counts steps from num_epochs only, and num_epochs {num_epochs!r} "
                f"makes its Trainer take exactly {steps}"]
    if num_epochs == train.epochs:
        return []
    return [f"num_epochs {num_epochs!r} instead of the study's {train.epochs:g}: the official Trainer drops a "
            f"partial batch from its count of steps per epoch, and this value gives the study's {steps} "
            "optimizer steps"]


def _optimizer_notes(train: Any, steps: int) -> list[str]:
    notes = []
    warmup = int(train.warmup_ratio * steps)
    if warmup != OFFICIAL_WARMUP_STEPS:
        # transformers' linear warmup: step s (from 0) uses s / warmup_steps of the learning rate
        reach = (f"; in {steps} steps its learning rate goes from 0 to only {steps - 1}% of learning_rate"
                 if steps < OFFICIAL_WARMUP_STEPS else "")
        notes.append(f"the official script warms the learning rate up over {OFFICIAL_WARMUP_STEPS} steps "
                     f"(warmup_steps, no flag), the study over {warmup} (warmup_ratio {train.warmup_ratio:g})"
                     f"{reach}; both then decay linearly")
    if train.weight_decay != 0:
        notes.append(f"weight_decay {train.weight_decay:g} does not carry over: the official AdamW uses 0 (no flag)")
    if train.max_grad_norm != 1.0:
        notes.append(f"max_grad_norm {train.max_grad_norm:g} does not carry over: the official Trainer clips at "
                     "1.0 (no flag)")
    return notes


def fire_value(value: Any) -> str:
    """One flag value as the official script's fire 0.5.0 reads it back: booleans True/False, integral
    floats as integers, other floats by repr (exact), lists comma-joined (a one-element list with a trailing
    comma: fire reads "q_proj," as a tuple but "q_proj" as a string, which the script would split into
    characters), text as is unless fire would read it as something else ("123", "True", "a,b"): then as a
    quoted string literal, which fire reads back as the text."""
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(fire_value(v) for v in value) + ("," if len(value) == 1 else "")
    text = str(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        plain = bool(text) and text.strip() == text and not any(c in text for c in ",[]{}()'\"#")
        return text if plain else json.dumps(text)
    return json.dumps(text)  # a Python literal fire would turn into a number, bool, None, tuple ...


def fire_argv(flags: Mapping[str, Any]) -> list[str]:
    """The command-line words of `flags` for the official script: ["--name", "value", ...]."""
    return [word for name, value in flags.items() for word in (f"--{name}", fire_value(value))]
