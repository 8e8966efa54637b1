"""One fine-tuning run from a `RunConfig`: resolve -> build adapter -> train -> score -> save.

This is the unit the search's trials, the benchmark table and `mola-train` all
call, so a run folder always looks the same: allocation.json, metrics.json,
adapter/, router_stats.json.
"""

from __future__ import annotations

import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mola_search._io import json_safe, write_json  # json_safe: search.trial and bench.continual import it from here
from mola_search.adapter import Adapter
from mola_search.allocation import SHAPES, AllocationSpec, check_depth, default_max_experts, resolve_allocation
from mola_search.allocation.shapes import normalize_shape
from mola_search.errors import UserError
from mola_search.methods import build_baseline, check_method, load_adapter_into  # baselines beside MoLA
from mola_search.mola import DEFAULT_TARGETS, MoLAConfig, MoLAModel
from mola_search.mola.config import canonical_balance_loss, default_aux_coef
from mola_search.models import DEFAULT_MODEL, decoder_layers, load_base_model
from mola_search.tasks import Example, TaskData, load_task
from mola_search.train.batching import model_device
from mola_search.train.evaluate import evaluate_accuracy, evaluate_generation
from mola_search.train.trainer import StepEvent, TrainConfig, train


DEFAULT_TOP_K = 2


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; every field is a CLI flag of `mola-train` and a key of a YAML/JSON config."""

    task: str = "mrpc"
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"                # auto (CUDA when present) | cpu | cuda | cuda:N
    data_dir: str | None = None
    method: str = "mola"
    shape: str | None = None            # paper shape name, digit notation or comma list
    allocation: str | None = None       # path to an allocation spec JSON
    budget: int | None = None           # default 5 x layers
    top_k: int | None = None            # None: 2, capped per layer by its expert count; a given value is strict
    rank: int = 8
    min_experts: int = 1
    max_experts: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    aux_loss_coef: float | None = None  # None: the balance loss's own (0.01 per-module, 0.001 official)
    balance_loss: str = "per-module"      # or "official" (alias "mola-official"; MoLAConfig.balance_loss)
    lora_rank: int | str | None = None  # --method lora: an int, "match" (MoLA's trainable count) or None (= rank)
    num_virtual_tokens: int = 20        # --method prompt-tuning
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 16
    eval_mode: str = "loglik"           # or "generate" (greedy decoding + answer parsing, as the paper)
    eval_splits: tuple[str, ...] = ("validation", "test")
    out: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        # One spelling of the formulation, and the number it is weighted with, from here on (metrics.json,
        # the adapter's config): an unset coefficient is the formulation's own (the official one's 0.001).
        object.__setattr__(self, "balance_loss", canonical_balance_loss(self.balance_loss))
        if self.aux_loss_coef is None:
            object.__setattr__(self, "aux_loss_coef", default_aux_coef(self.balance_loss))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        train_known = {f.name for f in fields(TrainConfig)}
        raw = dict(raw)
        train_raw = dict(raw.pop("train", {}) or {})
        for key in list(raw):  # flat train keys (e.g. lr, epochs) are accepted too
            if key in train_known and key not in known:
                train_raw[key] = raw.pop(key)
        unknown = sorted(set(raw) - known) + sorted(set(train_raw) - train_known)
        if unknown:
            raise UserError(f"unknown run config keys {unknown}; known: {sorted(known | train_known)}")
        for key in ("target_modules", "eval_splits"):  # a list, or one comma-separated string
            if key in raw:
                value = raw[key]
                items = value.split(",") if isinstance(value, str) else value
                if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
                    raise UserError(f"{key} must be a list of names (or a comma-separated string), got {value!r}")
                raw[key] = tuple(x.strip() for x in items if x.strip())
        return cls(**raw, train=TrainConfig(**train_raw))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["eval_splits"] = list(self.eval_splits)
        return d


@dataclass
class Prepared:
    """A resolved run: model loaded, data loaded, allocation fixed. Cheap to print for --dry-run."""

    config: RunConfig
    base_model: torch.nn.Module
    tokenizer: Any
    data: TaskData
    spec: AllocationSpec | None
    splits: dict[str, list[Example]]

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.base_model))


def prepare(config: RunConfig, *, base: tuple[torch.nn.Module, Any] | None = None,
            data: TaskData | None = None, spec: AllocationSpec | None = None) -> Prepared:
    """Resolve model, task and allocation; `base` / `data` / `spec` let a caller pass already resolved ones."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.method != "mola":
        check_method(config.method)
    if config.eval_mode not in ("loglik", "generate"):
        raise UserError(f"unknown eval mode '{config.eval_mode}': use 'loglik' or 'generate'")
    for name, least in (("max_train_examples", 1), ("max_eval_examples", 0)):
        value = getattr(config, name)
        if value is not None and value < least:
            raise UserError(f"`{name}` is {value}: use an integer >= {least} (or leave it unset for the whole split)")
    data = data or load_task(config.task, config.data_dir, val_seed=0)
    base_model, tokenizer = base or load_base_model(config.model, dtype=config.dtype, device=config.device)
    if spec is not None:
        check_depth(spec, len(decoder_layers(base_model)))
    elif config.method == "mola":
        spec = resolve_spec(config, len(decoder_layers(base_model)))
    splits = {
        "train": _subsample(data.splits["train"], config.max_train_examples, config.train.seed),
        **{s: _subsample(data.splits[s], config.max_eval_examples, 0) for s in ("validation", "test")},
    }
    return Prepared(config, base_model, tokenizer, data, spec, splits)


def resolve_spec(config: RunConfig, num_layers: int) -> AllocationSpec:
    """The run's allocation. A shape is scaled to --budget; explicit counts (digits, a comma list) keep their
    own total, so a --budget that disagrees with them is refused rather than ignored. A layer never routes to
    more experts than it has: the default top-k (2) is capped per layer, as in the search; a --top-k the user
    gives is used as given (a layer with fewer experts is an error), and a spec file keeps its own."""
    if config.shape and config.allocation:
        raise UserError("pass either `shape` or `allocation`, not both")
    budget = config.budget if config.budget is not None else 5 * num_layers
    value = config.allocation or config.shape or "inverted_triangle"
    is_shape = normalize_shape(value.strip()) in SHAPES
    is_file = not is_shape and (value.strip().endswith(".json") or Path(value).is_file())
    # A shape is scaled under the search spaces' default bound unless `max_experts` says otherwise, so the same
    # shape is the same allocation here and in `mola-search`; explicit counts are only checked against a bound
    # the user gave.
    max_count = config.max_experts if config.max_experts is not None or not is_shape \
        else default_max_experts(num_layers, budget)
    spec = resolve_allocation(value, num_layers, budget, top_k=1, rank=config.rank,
                              min_count=config.min_experts, max_count=max_count)
    if not is_file:
        top_k = [min(DEFAULT_TOP_K, e) for e in spec.experts] if config.top_k is None else config.top_k
        spec = AllocationSpec.build(spec.experts, top_k, config.rank, source=spec.source)
    if config.budget is not None and not is_shape and spec.budget != config.budget:
        raise UserError(f"`budget` {config.budget} does not apply to the explicit allocation '{value}' (it has "
                        f"{spec.budget} experts over {num_layers} layers): drop `budget`, or give a shape name "
                        f"({', '.join(SHAPES)}) to scale to it")
    return spec


def build_model(prepared: Prepared) -> Adapter:
    c = prepared.config
    if c.method != "mola":
        match = str(c.lora_rank).strip().lower() == "match" and c.method == "lora"
        return build_baseline(c, prepared.base_model,
                              mola_spec=resolve_spec(c, prepared.num_layers) if match else None)
    mola_config = MoLAConfig.from_spec(prepared.spec, target_modules=tuple(c.target_modules),
                                       lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                       aux_loss_coef=c.aux_loss_coef, balance_loss=c.balance_loss,
                                       init_seed=c.train.seed, base_model=c.model)
    return MoLAModel(prepared.base_model, mola_config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen base) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def describe(prepared: Prepared, model: Adapter) -> dict[str, Any]:
    trainable = count_parameters(model)[0]
    frozen = model.num_base()  # not the frozen count: full fine-tuning freezes nothing
    spec = prepared.spec
    return {
        "model": prepared.config.model, "task": prepared.data.name, "method": prepared.config.method,
        "num_layers": prepared.num_layers,
        "allocation": list(spec.experts) if spec else None,
        "top_k": list(spec.top_k) if spec else None, "rank": list(spec.rank) if spec else None,
        "budget": spec.budget if spec else None,
        "trainable_params": trainable, "base_params": frozen,
        "trainable_percent": 100.0 * trainable / max(1, frozen),
        "split_sizes": {k: len(v) for k, v in prepared.splits.items()},
        "split_notes": list(prepared.data.notes), "data_source": prepared.data.source,
        **({"method_info": model.method_info} if model.method_info else {}),
    }


def evaluate(model: torch.nn.Module, prepared: Prepared, split: str) -> dict[str, Any]:
    c = prepared.config
    examples = prepared.splits[split]
    if any(ex.is_generative for ex in examples[:1]):  # instruction data: no choices, score the answer NLL
        return answer_nll(model, prepared.tokenizer, examples, batch_size=c.eval_batch_size,
                          cutoff_len=c.train.cutoff_len)
    if c.eval_mode == "generate":
        res = evaluate_generation(model, prepared.tokenizer, examples, cutoff_len=c.train.cutoff_len)
    else:
        res = evaluate_accuracy(model, prepared.tokenizer, examples, batch_size=c.eval_batch_size,
                                cutoff_len=c.train.cutoff_len)
    return {**res.to_dict(task=prepared.data.name, per_example=True),
            "majority_baseline": prepared.data.majority_baseline(split, examples) if examples else None}


@torch.no_grad()
def answer_nll(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
               cutoff_len: int = 256) -> dict[str, Any]:
    """Mean negative log-likelihood per target token (and perplexity) of free-form answers."""
    import torch.nn.functional as F

    from mola_search.train.batching import (IGNORE, answer_span, collate, encode_example, model_device, tail_logits,
                                            to_device)

    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    try:
        encoded = [encode_example(tokenizer, ex, cutoff_len) for ex in examples]
        for start in range(0, len(encoded), batch_size):
            batch = to_device(collate(encoded[start:start + batch_size], pad_id), model_device(model))
            keep = answer_span(batch)
            logits = tail_logits(model, batch, keep)
            labels = batch["labels"][:, -keep:][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                           ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    nll = total / count if count else float("nan")
    return {"accuracy": None, "answer_nll": nll, "perplexity": math.exp(nll) if count else float("nan"),
            "n": len(examples), "target_tokens": count, "majority_baseline": None}


@dataclass
class RunOutcome:
    metrics: dict[str, Any]
    model: torch.nn.Module


def execute(prepared: Prepared, *, callbacks: Sequence[Callable[[StepEvent], bool | None]] = (),
            progress: bool = True, save: bool = True, init_from: str | None = None,
            on_model: Callable[[torch.nn.Module], None] | None = None) -> RunOutcome:
    """Train and score one run; write its folder when `config.out` is set and `save` is true."""
    c = prepared.config
    torch.manual_seed(c.train.seed)
    random.seed(c.train.seed)
    device = model_device(prepared.base_model)
    if device.type == "cuda":  # TF32 matmuls for what autocast leaves in fp32; peak memory per run
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(prepared)
    if init_from:
        from mola_search.mola.official_checkpoint import is_official_checkpoint, load_official_into

        # an official MoLA checkpoint (adapter_model.bin) as well as one of our adapter folders
        (load_official_into if is_official_checkpoint(init_from) else load_adapter_into)(model, init_from)
    if on_model is not None:  # lets callbacks (e.g. a search trial's rung evaluation) reach the model
        on_model(model)
    info = describe(prepared, model)
    t0 = time.perf_counter()
    result = train(model, prepared.tokenizer, prepared.splits["train"], c.train, callbacks=callbacks,
                   progress=progress)
    metrics: dict[str, Any] = {**info, "train_seed": c.train.seed, "train_loss_curve": result.loss_curve, "aux_loss_curve": result.aux_curve,
                               "train_steps": result.steps, "train_tokens": result.train_tokens,
                               "tokens_per_second": result.tokens_per_second,
                               "train_wall_time_s": result.wall_time, "stopped_early": result.stopped_early}
    router = None
    for split in c.eval_splits:
        if split == "validation" and isinstance(model, MoLAModel):
            with model.collecting_router_stats():
                metrics[split] = evaluate(model, prepared, split)
            router = model.router_stats()
        else:
            metrics[split] = evaluate(model, prepared, split)
    metrics["wall_time_s"] = time.perf_counter() - t0
    metrics["device"] = str(device)
    if device.type == "cuda":
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    metrics["config"] = c.to_dict()
    metrics["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "machine": platform.machine()}
    if save and c.out:
        out = Path(c.out)
        out.mkdir(parents=True, exist_ok=True)
        if prepared.spec is not None:
            from mola_search.allocation import save_spec
            save_spec(prepared.spec, out / "allocation.json", model=c.model, task=prepared.data.name)
        model.save_adapter(out / "adapter", task=prepared.data.name)
        if router is not None:
            write_json(out / "router_stats.json", router, indent=1)
        write_json(out / "metrics.json", metrics)
    return RunOutcome(metrics, model)


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    return rng.sample(list(examples), limit)

