"""Put MoLA layers into a Hugging Face causal LM, and take them out to disk and back.

`MoLAModel` wraps the base model rather than subclassing it, so any architecture
whose decoder layers hold `nn.Linear` modules with the target suffixes works; the
layer index of each linear comes from the model's structure (`layer_index_of`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mola_search.errors import UserError
from mola_search.mola.config import CONFIG_NAME, WEIGHTS_NAME, MoLAConfig
from mola_search.mola.layer import MoLALinear, RoutingState
from mola_search.models import decoder_layers, layer_index_of


class MoLAModel(nn.Module):
    """A frozen causal LM with MoLA experts in its decoder layers.

    Call it like the base model; after a training-mode forward, `auxiliary_loss()`
    returns the coefficient-weighted load-balancing loss the trainer adds to the
    task loss.
    """

    def __init__(self, base_model: nn.Module, config: MoLAConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.state = RoutingState()
        self.mola_layers: dict[str, MoLALinear] = {}
        _inject(self, base_model, config)

    # --- forward -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self.state.token_mask = attention_mask
        self.state.aux_losses = []
        try:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.state.token_mask = None

    @property
    def device(self) -> torch.device:
        """Where the base model (and so every adapter, created beside its linear) computes."""
        base = getattr(self.base_model, "device", None)
        return base if isinstance(base, torch.device) else next(self.base_model.parameters()).device

    def auxiliary_loss(self) -> torch.Tensor | None:
        """coef * mean of the per-linear balance losses of the last training forward."""
        if not self.state.aux_losses or self.config.aux_loss_coef == 0:
            return None
        return self.config.aux_loss_coef * torch.stack(self.state.aux_losses).mean()

    # --- parameters ----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(layer, p).detach().contiguous()
                for name, layer in self.mola_layers.items() for p in ("lora_A", "lora_B", "router")}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def num_base(self) -> int:
        return sum(p.numel() for n, p in self.base_model.named_parameters()
                   if not n.endswith(("lora_A", "lora_B", "router")))

    # --- routing statistics --------------------------------------------------------
    @contextmanager
    def collecting_router_stats(self) -> Iterator[None]:
        """Count expert selections and routing weights during the forwards inside the block."""
        for layer in self.mola_layers.values():
            layer.reset_stats()
        self.state.collect_stats = True
        try:
            yield
        finally:
            self.state.collect_stats = False

    def router_stats(self) -> list[dict[str, Any]]:
        """Per decoder layer and module: selection counts, selection share, mean routing weight (renormalised
        top-k gate) and mean router probability (full softmax, the P_i of the balance loss) per expert."""
        rows = []
        for name, layer in self.mola_layers.items():
            tokens = float(layer.stat_tokens)
            counts = layer.stat_counts.tolist()
            rows.append({
                "module": name, "layer": layer.layer_index, "kind": name.rsplit(".", 1)[-1],
                "experts": layer.num_experts, "top_k": layer.top_k, "tokens": tokens,
                "counts": counts,
                "share": [c / (tokens * layer.top_k) if tokens else 0.0 for c in counts],
                "mean_weight": [w / tokens if tokens else 0.0 for w in layer.stat_weights.tolist()],
                "mean_prob": [q / tokens if tokens else 0.0 for q in layer.stat_probs.tolist()],
            })
        return rows

    # --- persistence ---------------------------------------------------------------
    def save_adapter(self, folder: str | Path, **metadata: Any) -> Path:
        """Write only the adapter: safetensors weights + a self-describing JSON config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        if metadata:
            config = MoLAConfig(**{**config.__dict__, "extra": {**config.extra, **metadata}})
        config.save(folder)
        save_file(self.adapter_state_dict(), str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder: str | Path) -> "MoLAModel":
        """Rebuild the adapter from `folder` on top of `base_model` (which must match its depth)."""
        config = MoLAConfig.load(folder)
        weights = Path(folder) / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        model = cls(base_model, config)
        model.load_adapter_weights(load_file(str(weights)))
        return model

    def load_adapter_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise UserError(f"adapter weights miss {len(missing)} tensors (e.g. {missing[0]}); "
                            "the adapter was saved for another model or allocation")
        for key, value in own.items():
            if tensors[key].shape != value.shape:
                raise UserError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, "
                                f"the model needs {tuple(value.shape)}")
        with torch.no_grad():
            for name, layer in self.mola_layers.items():
                for p in ("lora_A", "lora_B", "router"):
                    getattr(layer, p).copy_(tensors[f"{name}.{p}"])


def _inject(owner: MoLAModel, base_model: nn.Module, config: MoLAConfig) -> None:
    num_layers = len(decoder_layers(base_model))
    if config.num_layers != num_layers:
        raise UserError(f"allocation has {config.num_layers} layers but the model has {num_layers}; "
                        f"pass an allocation for {num_layers} layers (or resample it to that depth)")
    for p in base_model.parameters():
        p.requires_grad_(False)
    index = layer_index_of(base_model)
    targets = [(name, module) for name, module in base_model.named_modules()
               if name in index and isinstance(module, nn.Linear)
               and name.rsplit(".", 1)[-1] in config.target_modules]
    if not targets:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules()
                        if n in index and isinstance(m, nn.Linear)})
        raise UserError(f"no linear module in the decoder layers matches target_modules "
                        f"{list(config.target_modules)}; this model has {kinds}")
    for name, linear in targets:
        j = index[name]
        layer = MoLALinear(linear, config.experts[j], config.top_k[j], config.rank[j],
                           alpha=config.lora_alpha, dropout=config.lora_dropout, layer_index=j,
                           state=owner.state, init=config.init, module_kind=name.rsplit(".", 1)[-1],
                           init_seed=config.init_seed)
        parent_name, _, child = name.rpartition(".")
        setattr(base_model.get_submodule(parent_name), child, layer)
        owner.mola_layers[name] = layer
