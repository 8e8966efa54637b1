"""The paper's baselines beside MoLA, all through PEFT and all trained by the same loop.

`build_baseline(config, base_model)` returns a wrapper the trainer and the scorer call
exactly like a `MoLAModel`: ``model(input_ids, attention_mask, position_ids,
logits_to_keep=k).logits`` gives logits aligned with the input positions, the
trainable parameters (and only those) have ``requires_grad``, and
``save_adapter(folder, **metadata)`` writes a self-describing folder.

Methods (``METHODS``):

* ``lora``: PEFT LoRA on the same linears as MoLA (``target_modules``), ``lora_alpha`` and
  ``lora_dropout`` as for MoLA. Rank: ``lora_rank`` if given (an int), ``"match"`` for the
  rank whose trainable count is closest to the MoLA allocation the same flags describe
  (shape/allocation/budget/top-k/rank; computed from the linears' shapes, no MoLA model is
  built), else ``rank`` (8 by default: the rank of every MoLA expert).
  Trainable: ``r * sum(d_in + d_out)`` over the adapted linears.
* ``prompt-tuning``: PEFT prompt tuning, ``num_virtual_tokens`` virtual tokens (default 20)
  initialised from randomly sampled vocabulary embeddings (PEFT's ``SAMPLE_VOCAB``).
  Trainable: ``num_virtual_tokens * hidden_size``. PEFT's own forward drops
  ``position_ids`` (which left-padded batches need), so the wrapper builds the input
  embeddings itself from PEFT's prompt encoder: virtual tokens get positions
  ``0..n-1``, real tokens follow; the virtual positions are stripped from the logits.
* ``llama-adapter``: PEFT's adaption prompt (LLaMA-Adapter): ``adapter_len = 10`` prompt
  vectors with a zero-init gate in the top ``min(8, layers)`` attention modules.
  Trainable per adapted layer: ``adapter_len * hidden_size + 1``. PEFT supports only the
  model types in ``ADAPTION_PROMPT_TYPES`` (llama, mistral, gpt2); others raise a
  ``UserError`` saying so. Its parameters take the attention weights' dtype, so a bf16/fp16
  base is upcast to fp32 (otherwise bf16 rounding swallows the updates); ``method_info`` says so.
* ``full``: every base parameter is trained; the base is upcast to fp32 (AdamW on bf16/fp16
  weights loses most small updates) and ``method_info`` says so. ``save_adapter`` writes the
  whole model with ``save_pretrained`` (about 4 bytes per parameter: ~540 MB for SmolLM2-135M),
  so the folder is itself a loadable ``--model``.

`load_adapter_into(model, folder)` (``mola-train --init-from``) loads a MoLA adapter into a
`MoLAModel` or a baseline folder into the wrapper of the same method; any mismatch (method,
allocation, depth, shapes) is a one-line `UserError`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError
from mola_search.models import decoder_layers, layer_index_of

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("mola", "lora", "prompt-tuning", "llama-adapter", "full")
BASELINES: tuple[str, ...] = METHODS[1:]
ADAPTER_LEN = 10          # LLaMA-Adapter's prompt length (the LLaMA-Adapter paper's default)
ADAPTER_LAYERS = 8        # ... in the top min(8, layers) layers (PEFT's documented example)
METHOD_FILE = "mola_method.json"
"""Written into every baseline adapter folder: method, base model, counts, metadata."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return method


def adaption_prompt_types() -> tuple[str, ...]:
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG
    return tuple(TRANSFORMERS_MODEL_CONFIG)


# --------------------------------------------------------------------------------------------------
# Parameter arithmetic (no model build)


def target_linears(base_model: nn.Module, target_modules: tuple[str, ...] | list[str]) -> list[tuple[str, int, int, int]]:
    """(name, layer index, d_in, d_out) of every decoder-layer linear whose suffix is a target."""
    index = layer_index_of(base_model)
    return [(name, index[name], m.in_features, m.out_features) for name, m in base_model.named_modules()
            if name in index and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]


def lora_trainable(linears: list[tuple[str, int, int, int]], rank: int) -> int:
    return rank * sum(d_in + d_out for _, _, d_in, d_out in linears)


def mola_trainable(linears: list[tuple[str, int, int, int]], experts, ranks) -> int:
    """MoLA's trainable count: per linear, E experts of rank r (A: r x d_in, B: d_out x r) + a router (E x d_in)."""
    return sum(experts[j] * (ranks[j] * (d_in + d_out) + d_in) for _, j, d_in, d_out in linears)


def resolve_lora_rank(config, base_model: nn.Module, mola_spec=None) -> tuple[int, dict[str, Any]]:
    """The LoRA rank for `config` and a record of how it was chosen.

    `lora_rank: match` matches the trainable count of the MoLA allocation `mola_spec` (an AllocationSpec,
    resolved by the caller: `train.run.resolve_spec` for a run)."""
    value = config.lora_rank
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if value is None:
        value = config.rank
        rule = "rank (MoLA's per-expert rank)"
    elif isinstance(value, int) and not isinstance(value, bool):
        rule = "given"
    elif isinstance(value, str) and value.strip().lower() == "match":
        if mola_spec is None:
            raise UserError("lora_rank 'match' needs the MoLA allocation to match: pass mola_spec")
        linears = _targets_or_error(base_model, config.target_modules)
        spec = mola_spec
        target = mola_trainable(linears, spec.experts, spec.rank)
        per_rank = lora_trainable(linears, 1)
        value = max(1, round(target / per_rank))
        return value, {"lora_rank": value, "rank_rule": "match", "matched_mola_trainable": target,
                       "matched_allocation": list(spec.experts)}
    else:
        raise UserError(f"lora_rank must be a positive integer or 'match', got {value!r}")
    if value < 1:
        raise UserError(f"lora_rank must be >= 1, got {value}")
    return value, {"lora_rank": value, "rank_rule": rule}


def _targets_or_error(base_model: nn.Module, target_modules) -> list[tuple[str, int, int, int]]:
    linears = target_linears(base_model, tuple(target_modules))
    if not linears:
        index = layer_index_of(base_model)
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules()
                        if n in index and isinstance(m, nn.Linear)})
        raise UserError(f"no linear module in the decoder layers matches target_modules "
                        f"{list(target_modules)}; this model has {kinds}")
    return linears


# --------------------------------------------------------------------------------------------------
# Wrappers


class BaselineModel(nn.Module):
    """A baseline behind MoLAModel's interface: forward -> .logits, save_adapter, num_trainable, num_base."""

    def __init__(self, method: str, model: nn.Module, *, base_params: int, info: dict[str, Any],
                 base_name: str) -> None:
        super().__init__()
        self.method = method
        self.model = model              # a PeftModel, or the base model itself for full fine-tuning
        self.method_info = {"method": method, **info}
        self._base_params = base_params
        self._base_name = base_name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, use_cache=False, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's `generate` (PEFT's for adapters: it adds virtual tokens and keeps the KV cache)."""
        return self.model.generate(*args, **kwargs)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_base(self) -> int:
        return self._base_params

    def _describe(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"method": self.method, "base_model": self._base_name, **self.method_info,
                "trainable_params": self.num_trainable(), "base_params": self._base_params,
                "metadata": metadata}

    def save_adapter(self, folder: str | Path, **metadata: Any) -> Path:
        """PEFT's save_pretrained (adapter_config.json + adapter_model.safetensors) + mola_method.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder), save_embedding_layers=False)
        (folder / METHOD_FILE).write_text(json.dumps(self._describe(metadata), indent=2, default=str) + "\n")
        return folder

    def load_folder(self, folder: Path) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{folder} has no adapter_model.safetensors")
        tensors = load_file(str(weights))
        own = get_peft_model_state_dict(self.model)
        _check_tensors(folder, own, tensors)
        set_peft_model_state_dict(self.model, tensors)


class PromptTuningModel(BaselineModel):
    """PEFT prompt tuning with position ids kept: [virtual tokens][left padding][tokens]."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        peft_model = self.model
        n = peft_model.active_peft_config.num_virtual_tokens
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        embeds = peft_model.word_embeddings(input_ids)
        prompts = peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
        device = input_ids.device
        mask = torch.cat([torch.ones(batch, n, dtype=attention_mask.dtype, device=device), attention_mask], 1)
        virtual_pos = torch.arange(n, device=device).unsqueeze(0).expand(batch, -1)
        positions = torch.cat([virtual_pos, position_ids + n], 1)
        base = peft_model.get_base_model()
        out = base(inputs_embeds=torch.cat([prompts, embeds], 1), attention_mask=mask, position_ids=positions,
                   logits_to_keep=logits_to_keep, use_cache=False, **kwargs)
        if not (isinstance(logits_to_keep, int) and logits_to_keep > 0):
            out.logits = out.logits[:, n:]  # the last k positions are real tokens; all positions need trimming
        return out


class FullModel(BaselineModel):
    """Full fine-tuning: `model` is the base model itself, every parameter trainable."""

    def save_adapter(self, folder: str | Path, **metadata: Any) -> Path:
        """The whole fine-tuned model (save_pretrained, safetensors) + mola_method.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        (folder / METHOD_FILE).write_text(json.dumps(self._describe(metadata), indent=2, default=str) + "\n")
        return folder

    def load_folder(self, folder: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no *.safetensors weights of a fully fine-tuned model")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        own = {k: v for k, v in self.model.state_dict().items()}
        tied = {k for k in own if k not in tensors and k.endswith("lm_head.weight")}
        _check_tensors(folder, {k: v for k, v in own.items() if k not in tied}, tensors)
        with torch.no_grad():
            self.model.load_state_dict(tensors, strict=False)


def _check_tensors(folder: Path, own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(f"adapter {folder} does not fit this model: {len(missing)} tensors missing, "
                        f"{len(extra)} unexpected (e.g. {example}); it was saved for another model or setting")
    for key, value in own.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise UserError(f"adapter {folder}: tensor {key} has shape {tuple(saved[key].shape)}, "
                            f"this model needs {tuple(value.shape)} (another rank, size or model)")


def build_baseline(config, base_model: nn.Module, mola_spec=None) -> BaselineModel:
    """Wrap `base_model` (modified in place) for `config.method`, one of BASELINES; `mola_spec` is the
    allocation a `lora_rank: match` LoRA matches (see resolve_lora_rank)."""
    method = check_method(config.method)
    if method == "mola":
        raise UserError("build_baseline builds baselines; MoLA is built by MoLAModel")
    base_name = str(config.model)
    base_params = sum(p.numel() for p in base_model.parameters())
    for p in base_model.parameters():
        p.requires_grad_(False)
    if method == "lora":
        return _build_lora(config, base_model, base_params, base_name, mola_spec)
    if method == "prompt-tuning":
        return _build_prompt_tuning(config, base_model, base_params, base_name)
    if method == "llama-adapter":
        return _build_llama_adapter(config, base_model, base_params, base_name)
    return _build_full(config, base_model, base_params, base_name)


def _get_peft_model(base_model: nn.Module, peft_config, method: str) -> nn.Module:
    from peft import get_peft_model

    try:
        return get_peft_model(base_model, peft_config)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        model_type = getattr(getattr(base_model, "config", None), "model_type", "?")
        raise UserError(f"PEFT cannot apply {method} to this model (type '{model_type}'): {first}") from None


def _build_lora(config, base_model, base_params, base_name, mola_spec) -> BaselineModel:
    from peft import LoraConfig

    _targets_or_error(base_model, config.target_modules)
    rank, info = resolve_lora_rank(config, base_model, mola_spec)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout, target_modules=list(config.target_modules),
                             bias="none")
    model = _get_peft_model(base_model, peft_config, "lora")
    info.update(lora_alpha=config.lora_alpha, target_modules=list(config.target_modules))
    return BaselineModel("lora", model, base_params=base_params, info=info, base_name=base_name)


def _build_prompt_tuning(config, base_model, base_params, base_name) -> BaselineModel:
    from peft import PromptTuningConfig, PromptTuningInit

    n = int(config.num_virtual_tokens)
    if n < 1:
        raise UserError(f"num_virtual_tokens must be >= 1, got {n}")
    peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                     prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    model = _get_peft_model(base_model, peft_config, "prompt-tuning")
    info = {"num_virtual_tokens": n, "init": "sample_vocab"}
    return PromptTuningModel("prompt-tuning", model, base_params=base_params, info=info, base_name=base_name)


def _upcast(base_model: nn.Module, why: str) -> dict[str, Any]:
    dtypes = {p.dtype for p in base_model.parameters()}
    if dtypes <= {torch.float32}:
        return {}
    base_model.float()
    note = f"base weights upcast from {sorted(str(d) for d in dtypes)} to float32: {why}"
    logger.warning(note)
    return {"dtype_note": note}


def _build_llama_adapter(config, base_model, base_params, base_name) -> BaselineModel:
    from peft import AdaptionPromptConfig

    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    supported = adaption_prompt_types()
    if model_type not in supported:
        raise UserError(f"llama-adapter: PEFT's adaption prompt does not support model type '{model_type}' "
                        f"(it supports {', '.join(supported)}); use another method for this model")
    layers = len(decoder_layers(base_model))
    info = _upcast(base_model, "PEFT keeps adaption prompts in the attention weights' dtype")
    peft_config = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN,
                                       adapter_layers=min(ADAPTER_LAYERS, layers))
    model = _get_peft_model(base_model, peft_config, "llama-adapter")
    info.update(adapter_len=ADAPTER_LEN, adapter_layers=min(ADAPTER_LAYERS, layers))
    return BaselineModel("llama-adapter", model, base_params=base_params, info=info, base_name=base_name)


def _build_full(config, base_model, base_params, base_name) -> BaselineModel:
    info = _upcast(base_model, "full fine-tuning with AdamW needs fp32 weights")
    for p in base_model.parameters():
        p.requires_grad_(True)
    return FullModel("full", base_model, base_params=base_params, info=info, base_name=base_name)


# --------------------------------------------------------------------------------------------------
# --init-from


def adapter_kind(folder: str | Path) -> tuple[str, Path]:
    """(method, adapter folder) of a saved adapter; a run folder holding adapter/ is accepted too."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"`init_from` {folder}: no such folder")
    if not (path / "adapter_config.json").is_file() and not (path / METHOD_FILE).is_file() \
            and (path / "adapter").is_dir():
        path = path / "adapter"
    if (path / METHOD_FILE).is_file():
        try:
            method = json.loads((path / METHOD_FILE).read_text()).get("method")
        except json.JSONDecodeError as exc:
            raise UserError(f"{path / METHOD_FILE} is not valid JSON ({exc.msg})") from None
        return str(method), path
    config_file = path / "adapter_config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_file} is not valid JSON ({exc.msg})") from None
        if raw.get("method", "mola") == "mola" and "peft_type" not in raw:
            return "mola", path
        kind = {"LORA": "lora", "PROMPT_TUNING": "prompt-tuning", "ADAPTION_PROMPT": "llama-adapter"}
        return kind.get(str(raw.get("peft_type")), str(raw.get("peft_type"))), path
    raise UserError(f"`init_from` {folder}: not an adapter folder (no adapter_config.json or {METHOD_FILE})")


def load_adapter_into(model: nn.Module, folder: str | Path) -> None:
    """Start `model` from the adapter saved in `folder` (two-stage training)."""
    from mola_search.mola import MoLAModel

    method, path = adapter_kind(folder)
    current = "mola" if isinstance(model, MoLAModel) else getattr(model, "method", type(model).__name__)
    if method != current:
        raise UserError(f"`init_from` {folder} holds a '{method}' adapter but this run's method is "
                        f"'{current}'; pass `method` {method}")
    if isinstance(model, MoLAModel):
        _load_mola(model, path)
    else:
        model.load_folder(path)


def _load_mola(model, path: Path) -> None:
    from safetensors.torch import load_file

    from mola_search.mola import MoLAConfig
    from mola_search.mola.config import WEIGHTS_NAME

    saved = MoLAConfig.load(path)
    own = model.mola_config
    if saved.num_layers != own.num_layers:
        raise UserError(f"`init_from` {path}: its allocation is for {saved.num_layers} layers but this model "
                        f"has {own.num_layers}; use an adapter trained on the same base model")
    if (saved.experts, saved.top_k, saved.rank) != (own.experts, own.top_k, own.rank):
        hint = path.parent / "allocation.json"
        raise UserError(f"`init_from` {path}: its allocation (experts {_digits(saved.experts)}, top-k "
                        f"{_digits(saved.top_k)}, rank {_digits(saved.rank)}) differs from this run's (experts "
                        f"{_digits(own.experts)}, top-k {_digits(own.top_k)}, rank {_digits(own.rank)}); pass "
                        f"`allocation` {hint if hint.is_file() else '<its allocation.json>'}")
    if tuple(saved.target_modules) != tuple(own.target_modules):
        raise UserError(f"`init_from` {path}: it adapts {list(saved.target_modules)} but this run adapts "
                        f"{list(own.target_modules)}; pass `target_modules` {','.join(saved.target_modules)}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{path} has adapter_config.json but no {WEIGHTS_NAME}")
    model.load_adapter_weights(load_file(str(weights)))


def _digits(values) -> str:
    return ",".join(str(v) for v in values)
