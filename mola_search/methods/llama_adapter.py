"""LLaMA-Adapter through PEFT's adaption prompt."""

from __future__ import annotations

from torch import nn

from mola_search.errors import UserError
from mola_search.methods.base import register
from mola_search.methods.baseline import BaselineModel, get_peft_model, upcast
from mola_search.models import decoder_layers

ADAPTER_LEN = 10          # LLaMA-Adapter's prompt length (the LLaMA-Adapter paper's default)
ADAPTER_LAYERS = 8        # ... in the top min(8, layers) layers (PEFT's documented example)


def adaption_prompt_types() -> tuple[str, ...]:
    """The model types PEFT's adaption prompt supports (llama, mistral, gpt2, ...)."""
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG
    return tuple(TRANSFORMERS_MODEL_CONFIG)


@register
class LlamaAdapterModel(BaselineModel):
    """`ADAPTER_LEN` prompt vectors with a zero-init gate in the top min(`ADAPTER_LAYERS`, layers) attention modules."""

    kind = "llama-adapter"

    @classmethod
    def build(cls, config, base_model: nn.Module, *, base_params: int, base_name: str,
              mola_spec=None) -> "LlamaAdapterModel":
        from peft import AdaptionPromptConfig

        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        supported = adaption_prompt_types()
        if model_type not in supported:
            raise UserError(f"llama-adapter: PEFT's adaption prompt does not support model type '{model_type}' "
                            f"(it supports {', '.join(supported)}); use another method for this model")
        layers = len(decoder_layers(base_model))
        info = upcast(base_model, "PEFT keeps adaption prompts in the attention weights' dtype")
        peft_config = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN,
                                           adapter_layers=min(ADAPTER_LAYERS, layers))
        model = get_peft_model(base_model, peft_config, "llama-adapter")
        info.update(adapter_len=ADAPTER_LEN, adapter_layers=min(ADAPTER_LAYERS, layers))
        return cls(model, base_params=base_params, info=info, base_name=base_name)
