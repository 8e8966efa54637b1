"""The paper's baselines beside MoLA, all through PEFT and all trained by the same loop.

Every method is an `adapter.Adapter` (the contract: kind, save, load, trainable parameters,
auxiliary loss; see its docstring for the call order) registered by kind in `ADAPTERS`.
`build_baseline(config, base_model)` returns a wrapper the trainer and the scorer call
exactly like a `MoLAModel`: ``model(input_ids, attention_mask, position_ids,
logits_to_keep=k).logits`` gives logits aligned with the input positions, the
trainable parameters (and only those) have ``requires_grad``, and
``save_adapter(folder, **metadata)`` writes a self-describing folder whose
``mola_method.json`` records its kind.

Methods (``METHODS``), one module each:

* ``lora`` (`lora.py`): PEFT LoRA on the same linears as MoLA (``target_modules``), ``lora_alpha``
  and ``lora_dropout`` as for MoLA. Rank: ``lora_rank`` if given (an int), ``"match"`` for the
  rank whose trainable count is closest to the MoLA allocation the same flags describe
  (shape/allocation/budget/top-k/rank; computed from the linears' shapes, no MoLA model is
  built), else ``rank`` (8 by default: the rank of every MoLA expert).
  Trainable: ``r * sum(d_in + d_out)`` over the adapted linears.
* ``prompt-tuning`` (`prompt_tuning.py`): PEFT prompt tuning, ``num_virtual_tokens`` virtual tokens
  (default 20) initialised from randomly sampled vocabulary embeddings (PEFT's ``SAMPLE_VOCAB``).
  Trainable: ``num_virtual_tokens * hidden_size``. PEFT's own forward drops
  ``position_ids`` (which left-padded batches need), so the wrapper builds the input
  embeddings itself from PEFT's prompt encoder: virtual tokens get positions
  ``0..n-1``, real tokens follow; the virtual positions are stripped from the logits.
* ``llama-adapter`` (`llama_adapter.py`): PEFT's adaption prompt (LLaMA-Adapter): ``adapter_len = 10``
  prompt vectors with a zero-init gate in the top ``min(8, layers)`` attention modules.
  Trainable per adapted layer: ``adapter_len * hidden_size + 1``. PEFT supports only the
  model types in ``adaption_prompt_types()`` (llama, mistral, gpt2); others raise a
  ``UserError`` saying so. Its parameters take the attention weights' dtype, so a bf16/fp16
  base is upcast to fp32 (otherwise bf16 rounding swallows the updates); ``method_info`` says so.
* ``full`` (`full.py`): every base parameter is trained; the base is upcast to fp32 (AdamW on bf16/fp16
  weights loses most small updates) and ``method_info`` says so. ``save_adapter`` writes the
  whole model with ``save_pretrained`` (about 4 bytes per parameter: ~540 MB for SmolLM2-135M),
  so the folder is itself a loadable ``model``.

`load_adapter_into(model, folder)` (``init_from``) reads the folder's recorded kind, finds its class
in the registry and loads the folder into `model`, which must be of that class; any mismatch (method,
allocation, depth, shapes) is a one-line `UserError` (`base.py`). `baseline.py` holds what the four
baselines share.
"""

from mola_search.adapter import METHOD_FILE, Adapter
from mola_search.methods.base import (ADAPTERS, BASELINES, METHODS, adapter_class, adapter_kind, check_method,
                                      load_adapter_into, register)
from mola_search.methods.baseline import BaselineModel, build_baseline
from mola_search.methods.full import FullModel
from mola_search.methods.llama_adapter import ADAPTER_LAYERS, ADAPTER_LEN, LlamaAdapterModel, adaption_prompt_types
from mola_search.methods.lora import LoraModel, lora_trainable, mola_trainable, resolve_lora_rank, target_linears
from mola_search.methods.prompt_tuning import PromptTuningModel

__all__ = [
    "ADAPTERS", "ADAPTER_LAYERS", "ADAPTER_LEN", "Adapter", "BASELINES", "BaselineModel", "FullModel",
    "LlamaAdapterModel", "LoraModel", "METHODS", "METHOD_FILE", "PromptTuningModel", "adaption_prompt_types",
    "adapter_class", "adapter_kind", "build_baseline", "check_method", "load_adapter_into", "lora_trainable",
    "mola_trainable", "register", "resolve_lora_rank", "target_linears",
]
