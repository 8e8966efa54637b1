"""Full fine-tuning: every base weight trained, in float32, and saved as a whole model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError
from mola_search.methods.base import register
from mola_search.methods.baseline import BaselineModel, check_tensors, upcast


@register
class FullModel(BaselineModel):
    """Full fine-tuning: `model` is the base model itself, every parameter trainable."""

    kind = "full"

    @classmethod
    def build(cls, config, base_model: nn.Module, *, base_params: int, base_name: str,
              mola_spec=None) -> "FullModel":
        info = upcast(base_model, "full fine-tuning with AdamW needs fp32 weights")
        for p in base_model.parameters():
            p.requires_grad_(True)
        return cls(base_model, base_params=base_params, info=info, base_name=base_name)

    def write_adapter_files(self, folder: Path, metadata: dict[str, Any]) -> None:
        """The whole fine-tuned model (save_pretrained, safetensors): the folder is itself a loadable `model`."""
        self.model.save_pretrained(str(folder))

    def load_adapter(self, folder: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no *.safetensors weights of a fully fine-tuned model")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        own = {k: v for k, v in self.model.state_dict().items()}
        tied = {k for k in own if k not in tensors and k.endswith("lm_head.weight")}
        check_tensors(folder, {k: v for k, v in own.items() if k not in tied}, tensors)
        with torch.no_grad():
            self.model.load_state_dict(tensors, strict=False)
