"""What the four baselines share: the wrapper behind the `Adapter` contract, and `build_baseline`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.adapter import Adapter
from mola_search.errors import UserError
from mola_search.methods.base import ADAPTERS, check_method

logger = logging.getLogger(__name__)


class BaselineModel(Adapter):
    """A baseline behind MoLAModel's interface: forward -> .logits, save_adapter, num_trainable, num_base.

    `model` is a PeftModel (LoRA, prompt tuning, LLaMA-Adapter) or the base model itself (full
    fine-tuning). Subclasses set `kind` and build themselves in the classmethod `build`, which
    `build_baseline` calls with the base model already frozen.
    """

    def __init__(self, model: nn.Module, *, base_params: int, info: dict[str, Any], base_name: str) -> None:
        super().__init__()
        self.model = model
        self._info = {"method": self.kind, **info}
        self._base_params = base_params
        self._base_name = base_name

    @classmethod
    def build(cls, config, base_model: nn.Module, *, base_params: int, base_name: str,
              mola_spec=None) -> "BaselineModel":
        """Wrap the frozen `base_model` (modified in place) as `config` asks."""
        raise NotImplementedError(f"{cls.__qualname__} does not say how it is built")

    @property
    def method(self) -> str:
        return self.kind

    @property
    def method_info(self) -> dict[str, Any]:
        return self._info

    @property
    def base_model_name(self) -> str:
        return self._base_name

    def num_base(self) -> int:
        return self._base_params

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, use_cache=False, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's `generate` (PEFT's for adapters: it adds virtual tokens and keeps the KV cache)."""
        return self.model.generate(*args, **kwargs)

    def write_adapter_files(self, folder: Path, metadata: dict[str, Any]) -> None:
        """PEFT's save_pretrained: adapter_config.json + adapter_model.safetensors."""
        self.model.save_pretrained(str(folder), save_embedding_layers=False)

    def load_adapter(self, folder: Path) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{folder} has no adapter_model.safetensors")
        tensors = load_file(str(weights))
        own = get_peft_model_state_dict(self.model)
        check_tensors(folder, own, tensors)
        set_peft_model_state_dict(self.model, tensors)


def build_baseline(config, base_model: nn.Module, mola_spec=None) -> BaselineModel:
    """Wrap `base_model` (modified in place) for `config.method`, one of BASELINES; `mola_spec` is the
    allocation a `lora_rank: match` LoRA matches (see resolve_lora_rank)."""
    method = check_method(config.method)
    if method == "mola":
        raise UserError("build_baseline builds baselines; MoLA is built by MoLAModel")
    base_params = sum(p.numel() for p in base_model.parameters())
    for p in base_model.parameters():
        p.requires_grad_(False)
    return ADAPTERS[method].build(config, base_model, base_params=base_params, base_name=str(config.model),
                                  mola_spec=mola_spec)


def check_tensors(folder: Path, own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """The saved tensors are exactly this model's, shape for shape; else a one-line UserError."""
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


def get_peft_model(base_model: nn.Module, peft_config, method: str) -> nn.Module:
    """PEFT's `get_peft_model`, with PEFT's refusal turned into a one-line UserError."""
    from peft import get_peft_model as peft_get_peft_model

    try:
        return peft_get_peft_model(base_model, peft_config)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        model_type = getattr(getattr(base_model, "config", None), "model_type", "?")
        raise UserError(f"PEFT cannot apply {method} to this model (type '{model_type}'): {first}") from None


def upcast(base_model: nn.Module, why: str) -> dict[str, Any]:
    """Cast a bf16/fp16 base to float32 (in place), returning the note `method_info` keeps; {} if it was fp32."""
    dtypes = {p.dtype for p in base_model.parameters()}
    if dtypes <= {torch.float32}:
        return {}
    base_model.float()
    note = f"base weights upcast from {sorted(str(d) for d in dtypes)} to float32: {why}"
    logger.warning(note)
    return {"dtype_note": note}
