"""Put MoLA layers into a Hugging Face causal LM, and take them out to disk and back.

`MoLAModel` wraps the base model rather than subclassing it, so any architecture
whose decoder layers hold `nn.Linear` modules with the target suffixes works; the
layer index of each linear comes from the model's structure (`layer_index_of`).
It follows PEFT's `PeftModel` where a training library looks: `config` is the base
model's config, unknown attributes and `generate` come from the base model,
`save_pretrained` / `from_pretrained` move only the adapter, and a forward with
`labels` returns a loss that already holds the load-balancing term. It is an
`adapter.Adapter` (kind "mola"), the contract the baselines share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mola_search.adapter import Adapter
from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.mola.config import CONFIG_NAME, WEIGHTS_NAME, MoLAConfig
from mola_search.mola.layer import InputGroup, MoLALinear, RoutingState, balance_loss
from mola_search.models import decoder_layers, layer_index_of

IGNORE_INDEX = -100  # the label Hugging Face losses skip
# Projections of one module (attention, MLP) that read the same input: their adapters share input-side matmuls.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def get_mola_model(model: nn.Module, spec_or_config: AllocationSpec | MoLAConfig, **config_kwargs: Any) -> "MoLAModel":
    """Put MoLA experts into `model` (any Hugging Face causal LM, modified in place), as PEFT's `get_peft_model`.

    `spec_or_config` is an allocation (`AllocationSpec`: experts, top-k and rank per layer) or a full
    `MoLAConfig`; `config_kwargs` set or override the other `MoLAConfig` fields (`lora_alpha`,
    `aux_loss_coef`, `balance_loss`, `target_modules`, ...). The base model's weights are frozen.
    """
    if isinstance(spec_or_config, AllocationSpec):
        name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
        config = MoLAConfig.from_spec(spec_or_config, **{"base_model": name, **config_kwargs})
    elif isinstance(spec_or_config, MoLAConfig):
        config = replace(spec_or_config, **config_kwargs) if config_kwargs else spec_or_config
    else:
        raise UserError(f"spec_or_config is a {type(spec_or_config).__name__}: pass an AllocationSpec "
                        "(e.g. mola_search.allocation.load_spec('best_allocation.json')) or a MoLAConfig")
    return MoLAModel(model, config)


class MoLAModel(Adapter):
    """A frozen causal LM with MoLA experts in its decoder layers.

    Call it like the base model. With `labels` in training mode the returned `loss` includes the
    coefficient-weighted load-balancing loss, so `transformers.Trainer`, accelerate or any loop that
    back-propagates `outputs.loss` trains MoLA as intended; a loop that computes its own task loss
    (mola_search's trainer) calls without labels and adds `auxiliary_loss()` itself.
    """

    kind = "mola"

    def __init__(self, base_model: nn.Module, config: MoLAConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.mola_config = config
        self.state = RoutingState(balance_loss=config.balance_loss)
        self.mola_layers: dict[str, MoLALinear] = {}
        _inject(self, base_model, config)
        # On the base model, not in our forward: `generate` and any direct call run its forward too.
        base_model.register_forward_pre_hook(partial(_track_tokens, self.state), with_kwargs=True)
        base_model.register_forward_hook(partial(_forget_tokens, self.state), always_call=True)

    # --- the base model's face ----------------------------------------------------------
    @property
    def config(self) -> Any:
        """The base model's config (as in PEFT), which Trainer and `generate` read and set (`use_cache`, ...);
        the adapter's own is `mola_config`."""
        return self.base_model.config

    def __getattr__(self, name: str) -> Any:
        """Attributes MoLAModel lacks come from the base model (`generation_config`, `main_input_name`,
        `gradient_checkpointing_enable`, ...), as PEFT's wrappers do."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not registered yet (inside __init__): nothing to forward to
                raise
            return getattr(self.base_model, name)

    @property
    def device(self) -> torch.device:
        """Where the base model (and so every adapter, created beside its linear) computes."""
        base = getattr(self.base_model, "device", None)
        return base if isinstance(base, torch.device) else next(self.base_model.parameters()).device

    # --- forward -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward; with `labels` in training mode, `loss` also holds `auxiliary_loss()`.

        Under Trainer with gradient accumulation, `num_items_in_batch` (the accumulated batch's label
        count) makes the base loss this micro-batch's share of the accumulated mean; the balance term
        gets the same share (its label count over `num_items_in_batch`), so it is counted once per
        optimizer step rather than once per micro-batch.
        """
        outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if labels is None or not self.training:
            return outputs
        aux = self.auxiliary_loss()
        if aux is None:
            return outputs
        accumulated = kwargs.get("num_items_in_batch")
        if accumulated is not None:
            aux = aux * (labels[..., 1:] != IGNORE_INDEX).sum() / accumulated
        if isinstance(outputs, tuple):  # return_dict=False
            return (outputs[0] + aux, *outputs[1:])
        outputs.loss = outputs.loss + aux
        return outputs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate`: the MoLA layers sit inside it, so every decoding step runs them,
        with the KV cache (they wrap the projections, so the cached keys and values include the experts')."""
        return self.base_model.generate(*args, **kwargs)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """coef * the load-balancing loss (`mola_config.balance_loss`) of the last training forward;
        None when the coefficient is 0 or no training forward ran."""
        coef = self.mola_config.aux_loss_coef
        loss = balance_loss(self.state.balance_terms, self.mola_config.balance_loss) if coef else None
        return None if loss is None else coef * loss

    # --- activation checkpointing ---------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        **kwargs: Any) -> None:
        """Keep only each decoder layer's input for backward and run the layer again there (the base
        model's activation checkpointing, non-reentrant): about a forward more per step for far fewer
        activations kept. Training computes the same numbers as without it: a replayed layer gets the same
        dropout masks and token mask, and records no balance term twice (`RoutingState.recording`).

        The reentrant variant is refused: it runs the first pass without autograd, so the balance loss
        would reach the routers with no gradient.
        """
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            raise UserError("activation checkpointing with use_reentrant=True would train MoLA's routers "
                            "without the balance loss's gradient; use use_reentrant=False (the default)")
        options["use_reentrant"] = False
        base = self.base_model
        try:
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
            else:  # transformers < 5
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)
        except (AttributeError, ValueError) as error:
            raise UserError(f"{type(base).__name__} does not support activation checkpointing ({error}); "
                            "train without it") from error
        self.state.keep_token_mask = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """`activation_checkpointing_enable` under the name `transformers.Trainer` calls."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Back to keeping every activation. transformers' enable also made the input embeddings' output require
        grad (a hook its disable leaves on unless PEFT loaded the model); it is removed here, or every later step
        would compute the first layer's input gradient, which nothing uses."""
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
        self.state.keep_token_mask = False

    # --- parameters ----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(layer, p).detach().contiguous()
                for name, layer in self.mola_layers.items() for p in ("lora_A", "lora_B", "router")}

    def num_base(self) -> int:
        return sum(p.numel() for n, p in self.base_model.named_parameters()
                   if not n.endswith(("lora_A", "lora_B", "router")))

    def print_trainable_parameters(self) -> None:
        """One line in PEFT's format: trainable, all (base + adapter) and the trainable share."""
        trainable, total = self.num_trainable(), sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- sub-networks (one-shot supernet) -------------------------------------------
    def use_allocation(self, spec: AllocationSpec | None) -> None:
        """Compute with the first `spec.experts[l]` experts of every module in layer l and `spec.top_k[l]`
        of them per token, as a standalone model with that allocation would (the one-shot supernet's
        sub-network); None goes back to every expert. Training then moves only the active experts and
        balances the router over them."""
        if spec is None:
            for layer in self.mola_layers.values():
                layer.activate(None)
            return
        config = self.mola_config
        if spec.num_layers != config.num_layers:
            raise UserError(f"allocation has {spec.num_layers} layers, the supernet {config.num_layers}")
        wider = [j for j in range(config.num_layers) if spec.experts[j] > config.experts[j]]
        if wider:
            j = wider[0]
            raise UserError(f"allocation gives layer {j} {spec.experts[j]} experts but the supernet has "
                            f"{config.experts[j]} there: use `experts` <= the supernet's in every layer")
        if any(r != config.rank[j] for j, r in enumerate(spec.rank)):
            raise UserError(f"allocation ranks {list(spec.rank)} differ from the supernet's "
                            f"{list(config.rank)}: a sub-network shares the supernet's rank")
        for layer in self.mola_layers.values():
            j = layer.layer_index
            layer.activate(spec.experts[j], spec.top_k[j])

    @contextmanager
    def allocation(self, spec: AllocationSpec | None) -> Iterator[None]:
        """`use_allocation(spec)` inside the block, every expert again after it."""
        self.use_allocation(spec)
        try:
            yield
        finally:
            self.use_allocation(None)

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
    @property
    def base_model_name(self) -> str:
        return self.mola_config.base_model

    def write_adapter_files(self, folder: Path, metadata: dict[str, Any]) -> None:
        """Only the adapter (the frozen base stays where it came from): `adapter_model.safetensors` and a
        self-describing `adapter_config.json`, with `metadata` kept in its `extra`. `save_pretrained` /
        `save_adapter` call it, then add the kind record."""
        config = self.mola_config
        if metadata:
            config = replace(config, extra={**config.extra, **metadata})
        config.save(folder)
        save_file(self.adapter_state_dict(), str(folder / WEIGHTS_NAME))

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

    def load_adapter(self, folder: Path) -> None:
        """Load the adapter saved in `folder` into this model (`init_from`): its allocation, depth and
        target modules must be this model's."""
        path = Path(folder)
        saved, own = MoLAConfig.load(path), self.mola_config
        if saved.num_layers != own.num_layers:
            raise UserError(f"`init_from` {path}: its allocation is for {saved.num_layers} layers but this model "
                            f"has {own.num_layers}; use an adapter trained on the same base model")
        if (saved.experts, saved.top_k, saved.rank) != (own.experts, own.top_k, own.rank):
            hint = path.parent / "allocation.json"
            raise UserError(f"`init_from` {path}: its allocation (experts {_digits(saved.experts)}, top-k "
                            f"{_digits(saved.top_k)}, rank {_digits(saved.rank)}) differs from this run's (experts "
                            f"{_digits(own.experts)}, top-k {_digits(own.top_k)}, rank {_digits(own.rank)}); pass "
                            f"`allocation` {hint if hint.is_file() else '<its allocation.json>'}")
        if tuple(saved.target_modules) != tuple(own.target_modules):
            raise UserError(f"`init_from` {path}: it adapts {list(saved.target_modules)} but this run adapts "
                            f"{list(own.target_modules)}; pass `target_modules` {','.join(saved.target_modules)}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        self.load_adapter_weights(load_file(str(weights)))

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


def _digits(values) -> str:
    return ",".join(str(v) for v in values)


def _track_tokens(state: RoutingState, _module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before each forward of the base model: start a new set of balance terms, and record which of the
    positions it computes are real tokens. With a KV cache the attention mask also covers the cached
    positions, so its last `seq` columns are the ones this call computes."""
    state.balance_terms = []
    state.recording = True
    state.dropout.new_forward()
    mask = kwargs.get("attention_mask")
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    usable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and inputs is not None
    state.token_mask = mask[:, -inputs.shape[1]:] if usable else None


def _forget_tokens(state: RoutingState, _module: nn.Module, _args: tuple, _output: Any) -> None:
    """After each forward of the base model: stop recording, let the dropout pool forget the last input it masked,
    and drop the token mask unless a checkpointed layer's replay during backward still needs it."""
    state.recording = False
    state.dropout.release()
    if not state.keep_token_mask:
        state.token_mask = None


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
    owner.state.dropout.width = max(layer.base_layer.in_features for layer in owner.mola_layers.values())
    siblings: dict[tuple[str, int], list[MoLALinear]] = {}
    for name, layer in owner.mola_layers.items():
        parent, _, kind = name.rpartition(".")
        for i, kinds in enumerate(SHARED_INPUT_GROUPS):
            if kind in kinds:
                siblings.setdefault((parent, i), []).append(layer)
    for members in siblings.values():
        if len(members) > 1:
            group = InputGroup(members)
            for layer in members:
                layer.group = group
