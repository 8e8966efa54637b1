"""MoLA adapter configuration: everything needed to rebuild the adapter on its base model.

Kept separate from the layer code so a saved adapter folder is self-describing
(`adapter_config.json`) and can be inspected without building a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mola_search._io import write_json
from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "qkv_proj", "gate_up_proj",  # fused projections (Phi-3 and similar): adapted like the separate ones
)

PER_MODULE, OFFICIAL = "per-module", "official"
MOLA_OFFICIAL = OFFICIAL
"""The official formulation's constant under its former name; its former value "mola-official" is an alias."""
BALANCE_LOSSES: tuple[str, ...] = (PER_MODULE, OFFICIAL)
"""The load-balancing formulations `MoLAConfig.balance_loss` accepts (see `MoLAConfig`)."""
BALANCE_LOSS_ALIASES: dict[str, str] = {"mola-official": OFFICIAL}
"""Other names accepted for a formulation: "mola-official" was the official one's name until it became "official"."""
BALANCE_LOSS_NAMES: tuple[str, ...] = (*BALANCE_LOSSES, *BALANCE_LOSS_ALIASES)
"""Every name a user may give (a CLI's choices)."""

DEFAULT_AUX_COEF = 0.01
"""The per-module balance loss's default coefficient."""
OFFICIAL_AUX_COEF = 0.001
"""`router_aux_loss_coef` of the official `LlamaForCausalLM_d` (a constant there, no flag): the default
coefficient of the official formulation."""


def canonical_balance_loss(name: str) -> str:
    """The formulation `name` means ("mola-official" -> "official"); a one-line UserError for an unknown one."""
    text = str(name).strip().lower()
    text = BALANCE_LOSS_ALIASES.get(text, text)
    if text not in BALANCE_LOSSES:
        raise UserError(f"`balance_loss` is {name!r}: use one of {', '.join(BALANCE_LOSSES)} "
                        f"(mola-official is accepted for official)")
    return text


def default_aux_coef(balance_loss: str) -> float:
    """The coefficient a formulation gets when none is given: 0.001 (the official code's) for the official
    formulation, 0.01 for the per-module one."""
    return OFFICIAL_AUX_COEF if canonical_balance_loss(balance_loss) == OFFICIAL else DEFAULT_AUX_COEF


@dataclass(frozen=True)
class MoLAConfig:
    """Per-layer experts / top-k / rank plus the LoRA and router hyper-parameters.

    `aux_loss_coef` weights a Switch-style load-balancing loss, N * sum_i f_i * P_i (f_i: share of the
    top-k selections that went to expert i, P_i: its mean router probability), added to the task loss
    during training. `balance_loss` says over which tokens and modules it is taken:

    * ``"per-module"`` (default): one loss per adapted linear over the real tokens (padding excluded),
      averaged over the modules. Every router is balanced on its own, and the loss does not grow with
      the model's depth, so one coefficient (0.01) suits any model.
    * ``"official"`` (alias ``"mola-official"``, its former name): what GCYZSL/MoLA computes
      (`load_balancing_loss_func` in `src/mola_modeling_llama_hacked.py`): the router logits of all
      adapted projections of a decoder layer pooled into one group (padding positions included), one
      loss per layer, summed over the layers. The official code weights it with 0.001 and adds it only
      with `obalance=True` (off by default in `mola_training.py`, on in `mola_training_instruction.py`).

    `aux_loss_coef=None` (the default) means the formulation's own coefficient: 0.01 per module, 0.001
    (`OFFICIAL_AUX_COEF`, the official code's) for the official one; a saved config holds the number.

    One more difference from the official code: it draws a dropout mask per expert (each expert applies
    its own `nn.Dropout` to the tokens routed to it), ours one per adapted input shared by its experts
    (and by q/k/v, gate/up, which read one tensor; see `layer.DropoutPool`), which is what lets all
    experts of a module run as one matmul.

    `init_seed` keys the initial weights: expert e of module m in layer l starts from a generator seeded
    with (init_seed, l, m, e), so allocations that differ in a layer's expert count share their common
    experts' initial weights (common random numbers for a search), on any device.
    """

    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    rank: tuple[int, ...]
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    aux_loss_coef: float | None = None  # None: default_aux_coef(balance_loss)
    balance_loss: str = PER_MODULE
    init: str = "kaiming"
    init_seed: int = 0
    base_model: str = ""
    source: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Re-use the allocation validation (lengths, bounds, top_k <= experts).
        AllocationSpec(tuple(self.experts), tuple(self.top_k), tuple(self.rank), self.source)
        object.__setattr__(self, "balance_loss", canonical_balance_loss(self.balance_loss))
        if self.aux_loss_coef is None:
            object.__setattr__(self, "aux_loss_coef", default_aux_coef(self.balance_loss))
        if self.init not in ("kaiming", "gaussian"):
            raise UserError(f"unknown LoRA init '{self.init}': use 'kaiming' or 'gaussian'")
        if not self.target_modules:
            raise UserError("target_modules is empty: name at least one linear module suffix, e.g. q_proj")
        for name in ("lora_alpha", "lora_dropout", "aux_loss_coef"):  # YAML gives `1e-2` as a string
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise ValueError
                object.__setattr__(self, name, float(value))
            except (TypeError, ValueError):
                raise UserError(f"{name} is {value!r}: use a number") from None
        if not (self.lora_alpha > 0 and 0.0 <= self.lora_dropout < 1.0 and self.aux_loss_coef >= 0):
            raise UserError("need lora_alpha > 0, 0 <= lora_dropout < 1 and aux_loss_coef >= 0")

    @classmethod
    def from_spec(cls, spec: AllocationSpec, **kwargs: Any) -> "MoLAConfig":
        return cls(experts=tuple(spec.experts), top_k=tuple(spec.top_k), rank=tuple(spec.rank),
                   source=spec.source, **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def spec(self) -> AllocationSpec:
        return AllocationSpec(tuple(self.experts), tuple(self.top_k), tuple(self.rank), self.source)

    def scaling(self, layer: int) -> float:
        return self.lora_alpha / self.rank[layer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("experts", "top_k", "rank", "target_modules"):
            d[key] = list(d[key])
        d["method"] = "mola"
        return d

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> "MoLAConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise UserError(f"{folder} is not a MoLA adapter folder: {CONFIG_NAME} is missing")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if raw.get("method", "mola") != "mola":
            raise UserError(f"{path} describes a '{raw.get('method')}' adapter, not a MoLA one")
        raw.pop("method", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{path}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        for key in ("experts", "top_k", "rank", "target_modules"):
            if key in raw:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise UserError(f"{path}: {exc}") from None
