"""Load a base model and its tokenizer by name: the embedded alias, a ``tiny-llama`` alias, a folder or a Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola_search.errors import UserError
from mola_search.models.devices import parse_device, resolve_dtype
from mola_search.models.embedded import DEFAULT_MODEL, ensure_embedded_model, is_default_alias
from mola_search.models.ready import ready
from mola_search.models.tiny import TINY_MODEL, tiny_layers, tiny_llama


def resolve_model_source(name: str | None) -> str:
    """Where to load ``name`` from: a local folder path, or a Hub id passed through unchanged.

    ``None`` / the default alias give the cached conversion of the embedded model (converting it if
    needed). An existing folder is used as is but must hold a ``config.json``. Something that is plainly
    a path (absolute, ``./``, ``~``) but does not exist is an error here rather than a Hub lookup.
    A ``tiny-llama`` alias has no folder (it is built in code) and is returned unchanged.
    """
    if is_default_alias(name):
        return str(ensure_embedded_model())
    assert name is not None
    if tiny_layers(name) is not None:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{name}' has no config.json; pass a folder written by "
                            f"save_pretrained, a Hugging Face Hub id, or '{DEFAULT_MODEL}'")
        return str(path)
    if path.exists():
        raise UserError(f"model '{name}' is a file; pass a model folder (with config.json), "
                        f"a Hugging Face Hub id, or '{DEFAULT_MODEL}'")
    if path.is_absolute() or name.startswith((".", "~")):
        raise UserError(f"model folder '{name}' does not exist")
    return name


def load_base_model(name: str | None = None, dtype: str = "auto",
                    device: str | None = None) -> tuple[Any, Any]:
    """Load a base model and its tokenizer, ready to have adapters put on it.

    The model is in eval mode with every parameter frozen (adapters add the trainable ones); the
    tokenizer pads on the right with a pad token (eos if it had none), as the trainers expect.
    Returns ``(PreTrainedModel, PreTrainedTokenizerBase)``.
    """
    target = parse_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    layers = tiny_layers(name)
    if layers is not None:
        tokenizer = _load_tokenizer(str(ensure_embedded_model()), name)
        model = tiny_llama(num_layers=layers, vocab_size=len(tokenizer))
        model.config.name_or_path = f"{TINY_MODEL}-L{layers}"
    else:
        # The embedded model is read from its copy in the dtype it computes in (no float32 copy in memory).
        source = str(ensure_embedded_model(torch_dtype)) if is_default_alias(name) else resolve_model_source(name)
        tokenizer = _load_tokenizer(source, name)  # first: a Hub miss fails once, not twice
        model = _load_model(source, name, torch_dtype)
    model = model.to(device=target, dtype=torch_dtype)
    _prepare_tokenizer(tokenizer, model)
    return ready(model), tokenizer


def _hub_kwargs(source: str) -> dict[str, Any]:
    """Offline: only the local Hugging Face cache, so a miss fails at once instead of after retries."""
    from mola_search.hub import offline_reason

    return {"local_files_only": True} if not Path(source).is_dir() and offline_reason() else {}


def _unknown_model(name: str | None, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"unknown model '{name}': not a local folder with config.json, not the embedded "
                     f"'{DEFAULT_MODEL}', and the Hugging Face Hub could not provide it ({reason})")


def _load_tokenizer(source: str, name: str | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(source))
    except (OSError, ValueError) as error:  # hub misses raise OSError; unknown configs ValueError
        if Path(source).is_dir():
            raise UserError(f"could not load a tokenizer from '{source}': {error}") from error
        raise _unknown_model(name, error) from error


def _load_model(source: str, name: str | None, torch_dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **_hub_kwargs(source))
    except (OSError, ValueError) as error:
        if Path(source).is_dir():
            raise UserError(f"could not load a causal LM from '{source}': {error}") from error
        raise _unknown_model(name, error) from error


def _prepare_tokenizer(tokenizer: Any, model: nn.Module) -> None:
    """Pad on the right with a real token, and tell the model which one it is."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
