"""Randomly initialised LLaMA models built in code: the ``tiny-llama[-L<N>]`` alias and benchmark shapes.

They learn nothing useful; they exist so tests and smoke runs can drive a whole pipeline in seconds
(``tiny_llama``), and so benchmarks can time the paper's model size without its weights (``random_llama``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mola_search.errors import UserError
from mola_search.models.devices import parse_device
from mola_search.models.ready import ready

TINY_MODEL = "tiny-llama"
"""Alias of the code-built test model; ``tiny-llama-L<N>`` picks N decoder layers."""

SMOLLM2_VOCAB_SIZE = 49152
"""Vocabulary of the embedded SmolLM2 tokenizer: ``tiny_llama``'s default, so the two fit together."""

# LLaMA-2-7B's shapes (the paper's model), for benchmarks that need its size without its weights.
LLAMA2_7B_SHAPE: dict[str, int] = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}

_TINY_LAYERS_DEFAULT = 4
_TINY_ALIAS = re.compile(r"tiny-llama(?:-l(\d+))?")


def tiny_layers(name: str | None) -> int | None:
    """Number of layers if ``name`` is a ``tiny-llama[-L<N>]`` alias, else None."""
    match = _TINY_ALIAS.fullmatch(name.strip().lower()) if name else None
    if match is None:
        return None
    layers = int(match.group(1)) if match.group(1) else _TINY_LAYERS_DEFAULT
    if layers < 1:
        raise UserError(f"'{name}' asks for {layers} layers; use tiny-llama-L<N> with N >= 1")
    return layers


def random_llama(shape: dict[str, int], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> Any:
    """A randomly initialised, frozen ``LlamaForCausalLM`` of the given `LlamaConfig` shape, built directly
    on `device` in `dtype` (a 7B-shaped model never exists on the CPU first): step-time and memory benchmarks
    of the paper's model size with no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]), torch.device(parse_device(str(device))):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.name_or_path = "random-llama-" + "x".join(str(shape[k]) for k in ("num_hidden_layers", "hidden_size"))
    return ready(model)


def tiny_llama(num_layers: int = 4, hidden_size: int = 64, vocab_size: int | None = None,
               seed: int = 0) -> Any:
    """A small randomly initialised ``LlamaForCausalLM`` (fp32, frozen), for tests and smoke runs.

    Same architecture family as SmolLM2 (tied embeddings, GQA: 4 heads, 2 kv heads, SmolLM2's special
    token ids) so adapter code exercised on it behaves as on the real model, just in milliseconds.
    ``vocab_size`` defaults to SmolLM2's, so the embedded tokenizer fits. Initialisation uses its own
    generator seeded with ``seed``: the same arguments give the same weights, and the global RNG is
    left alone.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or SMOLLM2_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = f"{TINY_MODEL}-L{num_layers}"
    return ready(model.float())
