"""LoRA through PEFT, and the parameter arithmetic that matches its rank to a MoLA allocation."""

from __future__ import annotations

from typing import Any

from torch import nn

from mola_search.errors import UserError
from mola_search.methods.base import register
from mola_search.methods.baseline import BaselineModel, get_peft_model
from mola_search.models import layer_index_of


@register
class LoraModel(BaselineModel):
    """PEFT LoRA on the same linears as MoLA (`target_modules`), rank from `resolve_lora_rank`."""

    kind = "lora"

    @classmethod
    def build(cls, config, base_model: nn.Module, *, base_params: int, base_name: str,
              mola_spec=None) -> "LoraModel":
        from peft import LoraConfig

        _targets_or_error(base_model, config.target_modules)
        rank, info = resolve_lora_rank(config, base_model, mola_spec)
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=config.lora_alpha,
                                 lora_dropout=config.lora_dropout, target_modules=list(config.target_modules),
                                 bias="none")
        model = get_peft_model(base_model, peft_config, "lora")
        info.update(lora_alpha=config.lora_alpha, target_modules=list(config.target_modules))
        return cls(model, base_params=base_params, info=info, base_name=base_name)


# --------------------------------------------------------------------------------------------------
# Parameter arithmetic (no model build)


def target_linears(base_model: nn.Module, target_modules: tuple[str, ...] | list[str]) -> list[tuple[str, int, int, int]]:
    """(name, layer index, d_in, d_out) of every decoder-layer linear whose suffix is a target."""
    index = layer_index_of(base_model)
    return [(name, index[name], m.in_features, m.out_features) for name, m in base_model.named_modules()
            if name in index and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]


def lora_trainable(linears: list[tuple[str, int, int, int]], rank: int) -> int:
    return rank * sum(d_in + d_out for _, _, d_in, d_out in linears)


def mola_trainable(linears: list[tuple[str, int, int, int]], experts, ranks) -> int:
    """MoLA's trainable count: per linear, E experts of rank r (A: r x d_in, B: d_out x r) + a router (E x d_in)."""
    return sum(experts[j] * (ranks[j] * (d_in + d_out) + d_in) for _, j, d_in, d_out in linears)


def resolve_lora_rank(config, base_model: nn.Module, mola_spec=None) -> tuple[int, dict[str, Any]]:
    """The LoRA rank for `config` and a record of how it was chosen.

    `lora_rank: match` matches the trainable count of the MoLA allocation `mola_spec` (an AllocationSpec,
    resolved by the caller: `train.run.resolve_spec` for a run)."""
    value = config.lora_rank
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if value is None:
        value = config.rank
        rule = "rank (MoLA's per-expert rank)"
    elif isinstance(value, int) and not isinstance(value, bool):
        rule = "given"
    elif isinstance(value, str) and value.strip().lower() == "match":
        if mola_spec is None:
            raise UserError("lora_rank 'match' needs the MoLA allocation to match: pass mola_spec")
        linears = _targets_or_error(base_model, config.target_modules)
        spec = mola_spec
        target = mola_trainable(linears, spec.experts, spec.rank)
        per_rank = lora_trainable(linears, 1)
        value = max(1, round(target / per_rank))
        return value, {"lora_rank": value, "rank_rule": "match", "matched_mola_trainable": target,
                       "matched_allocation": list(spec.experts)}
    else:
        raise UserError(f"lora_rank must be a positive integer or 'match', got {value!r}")
    if value < 1:
        raise UserError(f"lora_rank must be >= 1, got {value}")
    return value, {"lora_rank": value, "rank_rule": rule}


def _targets_or_error(base_model: nn.Module, target_modules) -> list[tuple[str, int, int, int]]:
    linears = target_linears(base_model, tuple(target_modules))
    if not linears:
        index = layer_index_of(base_model)
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules()
                        if n in index and isinstance(m, nn.Linear)})
        raise UserError(f"no linear module in the decoder layers matches target_modules "
                        f"{list(target_modules)}; this model has {kinds}")
    return linears
