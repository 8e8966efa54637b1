"""Prompt tuning through PEFT, with the position ids left-padded batches need."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError
from mola_search.methods.base import register
from mola_search.methods.baseline import BaselineModel, get_peft_model


@register
class PromptTuningModel(BaselineModel):
    """PEFT prompt tuning with position ids kept: [virtual tokens][left padding][tokens].

    PEFT's own forward drops ``position_ids``, so this one builds the input embeddings itself from
    PEFT's prompt encoder: virtual tokens get positions ``0..n-1``, real tokens follow; the virtual
    positions are stripped from the logits.
    """

    kind = "prompt-tuning"

    @classmethod
    def build(cls, config, base_model: nn.Module, *, base_params: int, base_name: str,
              mola_spec=None) -> "PromptTuningModel":
        from peft import PromptTuningConfig, PromptTuningInit

        n = int(config.num_virtual_tokens)
        if n < 1:
            raise UserError(f"num_virtual_tokens must be >= 1, got {n}")
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                         prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
        model = get_peft_model(base_model, peft_config, "prompt-tuning")
        info = {"num_virtual_tokens": n, "init": "sample_vocab"}
        return cls(model, base_params=base_params, info=info, base_name=base_name)

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
