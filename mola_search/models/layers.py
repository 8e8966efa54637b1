"""Where a model's decoder layers are, found from its structure rather than from attribute names."""

from __future__ import annotations

from typing import Any

from torch import nn

from mola_search.errors import UserError


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(count, int):
        raise UserError(f"{type(model).__name__} has no config.num_hidden_layers, so its decoder "
                        "layers cannot be found")
    return count


def _decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and module of the decoder layer stack (see ``decoder_layers``)."""
    count = _num_layers(model)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == count]
    if not candidates:
        raise UserError(f"{type(model).__name__} has no list of {count} modules (its "
                        "num_hidden_layers), so its decoder layers cannot be found")

    def size(item: tuple[str, nn.ModuleList]) -> int:
        return sum(p.numel() for p in item[1].parameters())

    return max(candidates, key=size)  # max keeps the first (shallowest) on ties


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, found by structure rather than by attribute name.

    It is the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``; if several qualify, the one
    holding most parameters. This covers ``model.layers`` (LLaMA, Mistral, Qwen2), ``transformer.h``
    (GPT-2) and wrapped models (PEFT, MoLA) alike.
    """
    return _decoder_stack(model)[1]


def layer_index_of(model: nn.Module) -> dict[str, int]:
    """Decoder layer index of every module inside a decoder layer, keyed by qualified name.

    Names are those of ``model.named_modules()``: e.g. ``"model.layers.3.self_attn.q_proj" -> 3``;
    the layer itself (``"model.layers.3"``) is included.
    """
    prefix, stack = _decoder_stack(model)
    index: dict[str, int] = {}
    for i, layer in enumerate(stack):
        for sub, _ in layer.named_modules():
            index[".".join(part for part in (prefix, str(i), sub) if part)] = i
    return index


def model_summary(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready description of a base model for run records and reports."""
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    return {
        "name_or_path": str(getattr(config, "name_or_path", "") or type(model).__name__),
        "architecture": type(model).__name__,
        "num_layers": len(decoder_layers(model)),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }
