"""Search spaces as data: how a point Optuna proposes becomes a feasible MoLA allocation.

A space is a small YAML file (``search_spaces/*.yaml``) validated on load. Every
encoding maps *any* point of [0, 1]^d to per-layer weights, and `round_to_budget`
turns those weights into integer expert counts that sum exactly to the budget and
respect [min_experts, max_experts]. So the space is feasible by construction: a
sampler never proposes a point that has to be rejected, and its model of the
objective is never fed artificial failures. All-zero weights are valid too: they
mean "no preference", i.e. an even split.

`SearchSpace` is the abstract base; one subclass per encoding (``blocks``,
``per_layer``, ``profile``: one module each) registers itself under its name with
`register_encoding`. A new encoding is a new module with a subclass that implements
`weight_names`, `layer_weights` and `candidate_weights`.

Call order: `SearchSpace.from_dict` / `load` / `builtin` (validated data) ->
`check_budget(num_layers, budget)` -> `suggest(trial, ...)` in an Optuna trial, or
`decode(params, ...)` (a pure function, the same code path, so a trial's stored
``params`` always decode to the allocation that trial trained) -> `encode(spec)` to
enqueue a known allocation (a paper shape) as a point.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from mola_search._checks import check_choices, check_int
from mola_search.allocation import DEFAULT_MAX_EXPERTS, AllocationSpec, round_to_budget
# The rounding tie-break of the paper shapes. Using the very same function (not a copy) is what
# makes the blocks encoding reproduce `shape_allocation` exactly; tests/test_space.py guards it.
from mola_search.allocation.shapes import _trend as shape_trend
from mola_search.errors import UserError
from mola_search.trial.fidelity import Fidelity

if TYPE_CHECKING:  # optuna is only needed by the caller that owns the trial
    import optuna

TOP_K_PARAM = "top_k"
RANK_PARAM = "rank"
DEFAULT_SPACE = "blocks"

_DEFAULT_FIDELITY: dict[str, Any] = {
    "max_train_examples": 256,
    "max_eval_examples": 1000,  # the whole validation split where it is small (scoring is forward-only)
    "epochs": 1.0,
    "max_steps": None,
    "rungs": [0.25, 0.5, 1.0],
}
# The committed search_spaces/*.yaml files, embedded so a non-editable install (no repo checkout)
# still has them. tests/test_space.py checks that each YAML file loads to the same SearchSpace.
BUILTIN_SPACES: dict[str, dict[str, Any]] = {
    "blocks": {"encoding": "blocks", "blocks": 4, "min_experts": 1, "max_experts": DEFAULT_MAX_EXPERTS,
               "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
    "per_layer": {"encoding": "per_layer", "min_experts": 1, "max_experts": DEFAULT_MAX_EXPERTS,
                  "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
    "profile": {"encoding": "profile", "knots": 4, "min_experts": 1, "max_experts": DEFAULT_MAX_EXPERTS,
                "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
}

ENCODINGS: dict[str, type["SearchSpace"]] = {}
"""Encoding name -> its `SearchSpace` subclass (filled by `register_encoding`)."""


def register_encoding(cls: type["SearchSpace"]) -> type["SearchSpace"]:
    """Class decorator: make `cls` the space of encoding `cls.encoding`."""
    ENCODINGS[cls.encoding] = cls
    return cls


@dataclass(frozen=True)
class SearchSpace(ABC):
    """Which allocations a search may propose, and how Optuna's parameters encode them.

    ``top_k`` and ``rank`` are fixed unless ``search_top_k`` / ``search_rank`` is set; then
    one global value is searched over ``top_k_choices`` / ``rank_choices``. A layer never
    routes to more experts than it has: its top-k is ``min(top_k, experts)`` (see
    `per_layer_top_k`), which keeps a 1-expert layer valid under a global top_k of 2.
    """

    encoding: ClassVar[str]

    min_experts: int = 1
    max_experts: int | None = DEFAULT_MAX_EXPERTS
    top_k: int = 2
    rank: int = 8
    search_top_k: bool = False
    top_k_choices: tuple[int, ...] = (1, 2, 3)
    search_rank: bool = False
    rank_choices: tuple[int, ...] = (4, 8, 16)
    fidelity: Fidelity = field(default_factory=Fidelity)
    name: str = "custom"

    def __post_init__(self) -> None:
        check_int(self.min_experts, "min_experts", low=1)
        check_int(self.max_experts, "max_experts", low=self.min_experts, optional=True)
        check_int(self.top_k, "top_k", low=1, high=self.max_experts)
        check_int(self.rank, "rank", low=1)
        for key in ("search_top_k", "search_rank"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"{key} is {getattr(self, key)!r}: use true or false")
        # Unused choices are only checked for shape, so narrowing max_experts needs no other edit.
        choice_cap = self.max_experts if self.search_top_k else None
        object.__setattr__(self, "top_k_choices", check_choices(self.top_k_choices, "top_k_choices", high=choice_cap))
        object.__setattr__(self, "rank_choices", check_choices(self.rank_choices, "rank_choices"))
        if not isinstance(self.fidelity, Fidelity):
            raise UserError(f"fidelity is {self.fidelity!r}: use a mapping of "
                            + ", ".join(f.name for f in fields(Fidelity)))
        if not isinstance(self.name, str):
            raise UserError(f"name is {self.name!r}: use a string")

    # ---------------------------------------------------------------------------------- what an encoding defines

    @abstractmethod
    def weight_names(self, num_layers: int) -> list[str]:
        """The float weight parameters, in suggestion order (``w_block<b>``, ``w_layer<j>``, ``w_knot<k>``)."""

    @abstractmethod
    def layer_weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        """Per-layer weights before rounding: what the point 'wants', for reports and plots."""

    @abstractmethod
    def candidate_weights(self, experts: Sequence[int]) -> list[list[float]]:
        """Weight vectors worth trying for `encode`, most likely exact first; each scaled into [0, 1]."""

    def check_depth(self, num_layers: int) -> None:
        """Refuse a depth this encoding cannot split (blocks: more blocks than layers)."""

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, raw: Any, name: str = "custom") -> "SearchSpace":
        """Validate a parsed space; every error names the space, the key and what is accepted."""
        try:
            if not isinstance(raw, Mapping):
                raise UserError(f"search space must be a mapping of keys (encoding, min_experts, max_experts, "
                                f"...), got {type(raw).__name__}")
            if "encoding" not in raw:
                raise UserError(f"'encoding' is missing: use one of {', '.join(ENCODINGS)}")
            encoding = raw["encoding"]
            if encoding not in ENCODINGS:
                raise UserError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
            space_cls = ENCODINGS[encoding]
            own = [f.name for f in fields(space_cls) if f.name not in {g.name for g in fields(SearchSpace)}]
            known = ["encoding", *own, *(f.name for f in fields(SearchSpace) if f.name != "name")]
            unknown = sorted(str(key) for key in raw if key not in known)
            if unknown:
                raise UserError(f"unknown search space key(s) {', '.join(unknown)}: accepted keys are "
                                f"{', '.join(known)}")
            mapping = {k: v for k, v in raw.items() if k != "encoding"}
            if "fidelity" in mapping:
                mapping["fidelity"] = Fidelity.from_dict(mapping["fidelity"])
            return space_cls(**mapping, name=name)
        except UserError as error:
            raise UserError(f"search space '{name}': {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SearchSpace":
        """Read a YAML space file; the space is named after the file (``blocks.yaml`` -> "blocks")."""
        location = Path(path)
        if not location.is_file():
            what = "is a directory" if location.is_dir() else "does not exist"
            raise UserError(f"search space file '{location}' {what}: pass a YAML file or one of "
                            f"the built-in spaces {', '.join(BUILTIN_SPACES)}")
        try:
            raw = yaml.safe_load(location.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as error:
            reason = " ".join(str(error).split())
            raise UserError(f"search space file '{location}' is not valid YAML ({reason}): "
                            f"fix the file, see search_spaces/blocks.yaml for an example") from None
        return cls.from_dict(raw, name=location.stem)

    @classmethod
    def builtin(cls, name: str = DEFAULT_SPACE) -> "SearchSpace":
        """A built-in space from the values embedded in code: needs no file, so works when installed."""
        if name not in BUILTIN_SPACES:
            raise UserError(f"unknown built-in search space '{name}': use one of "
                            f"{', '.join(BUILTIN_SPACES)} or the path of a YAML file")
        return cls.from_dict(BUILTIN_SPACES[name], name=name)

    def to_dict(self) -> dict[str, Any]:
        """The mapping `from_dict` accepts (without the name): what a run record stores."""
        raw: dict[str, Any] = {"encoding": self.encoding}
        raw.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"})
        raw.update(top_k_choices=list(self.top_k_choices), rank_choices=list(self.rank_choices),
                   fidelity=self.fidelity.to_dict())
        return raw

    # ---------------------------------------------------------------------------------- feasibility

    def check_budget(self, num_layers: int, budget: int) -> None:
        """Refuse a (depth, budget) pair no point of this space can satisfy, before any trial runs."""
        check_int(num_layers, "num_layers", low=1)
        self.check_depth(num_layers)
        least = num_layers * self.min_experts
        most = None if self.max_experts is None else num_layers * self.max_experts
        is_int = isinstance(budget, int) and not isinstance(budget, bool)
        if is_int and least <= budget and (most is None or budget <= most):
            return
        if most is None:
            bounds, accepted = f"at least {self.min_experts} experts", f"a budget >= {least}"
        else:
            bounds, accepted = f"{self.min_experts}..{self.max_experts} experts", f"a budget in [{least}, {most}]"
        raise UserError(f"budget {budget} is infeasible for {num_layers} layers with {bounds} per layer: "
                        f"choose {accepted}")

    # ---------------------------------------------------------------------------------- parameters

    def param_names(self, num_layers: int) -> list[str]:
        """Every parameter `suggest` defines, in suggestion order (weights, then top_k, then rank).

        Indices are zero-padded (``w_layer00``..``w_layer29``) so that sorting by name, as
        Optuna's plots and importance tables do, is depth order.
        """
        names = self.weight_names(num_layers)
        if self.search_top_k:
            names.append(TOP_K_PARAM)
        if self.search_rank:
            names.append(RANK_PARAM)
        return names

    def suggest(self, trial: "optuna.Trial", num_layers: int, budget: int) -> AllocationSpec:
        """Define this space's parameters on `trial` (define-by-run) and return the allocation."""
        self.check_budget(num_layers, budget)
        params: dict[str, Any] = {name: trial.suggest_float(name, 0.0, 1.0)
                                  for name in self.weight_names(num_layers)}
        if self.search_top_k:
            params[TOP_K_PARAM] = trial.suggest_categorical(TOP_K_PARAM, list(self.top_k_choices))
        if self.search_rank:
            params[RANK_PARAM] = trial.suggest_categorical(RANK_PARAM, list(self.rank_choices))
        return self.decode(params, num_layers, budget)

    def decode(self, params: Mapping[str, Any], num_layers: int, budget: int) -> AllocationSpec:
        """The allocation a parameter point stands for; a pure function, equal to what `suggest` gives."""
        self.check_budget(num_layers, budget)
        weights = self.layer_weights(params, num_layers)
        experts = round_to_budget(weights, budget, self.min_experts, self.max_experts,
                                  priority=shape_trend(weights))
        top_k = self._categorical(params, TOP_K_PARAM, self.search_top_k, self.top_k, self.top_k_choices)
        rank = self._categorical(params, RANK_PARAM, self.search_rank, self.rank, self.rank_choices)
        return AllocationSpec.build(experts, per_layer_top_k(experts, top_k), rank,
                                    source=f"search:{self.encoding}")

    def encode(self, spec: AllocationSpec) -> tuple[dict[str, Any], bool]:
        """Parameters that best reproduce `spec`, and whether `decode` gives it back exactly.

        Used to enqueue known allocations (the paper shapes, AlphaLoRA) as trials. The flag
        is computed by decoding, never assumed; "exactly" means the same experts, top_k and
        rank in every layer (the source string always differs).
        """
        num_layers = spec.num_layers
        extra: dict[str, Any] = {}
        if self.search_top_k:
            extra[TOP_K_PARAM] = _best_choice(self.top_k_choices,
                                              lambda k: per_layer_top_k(spec.experts, k), spec.top_k)
        if self.search_rank:
            extra[RANK_PARAM] = _best_choice(self.rank_choices, lambda r: [r] * num_layers, spec.rank)
        best: tuple[dict[str, Any], bool] | None = None
        best_distance = math.inf
        for weights in self.candidate_weights(spec.experts):
            params = {**dict(zip(self.weight_names(num_layers), weights)), **extra}
            decoded = self._try_decode(params, num_layers, spec.budget)
            if decoded is None:  # the spec's budget is infeasible here: no candidate can be exact
                return params, False
            distance = sum(abs(a - b) for a, b in zip(decoded.experts, spec.experts))
            if distance < best_distance:
                exact = decoded.experts == spec.experts and decoded.top_k == spec.top_k \
                    and decoded.rank == spec.rank
                best, best_distance = (params, exact), distance
            if distance == 0:
                break
        assert best is not None
        return best

    # ---------------------------------------------------------------------------------- internals

    def _weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        return [self._weight(params, name) for name in self.weight_names(num_layers)]

    def _try_decode(self, params: Mapping[str, Any], num_layers: int, budget: int) -> AllocationSpec | None:
        try:
            return self.decode(params, num_layers, budget)
        except UserError:
            return None

    def _weight(self, params: Mapping[str, Any], name: str) -> float:
        if name not in params:
            raise UserError(f"parameters lack '{name}': they were not made by search space "
                            f"'{self.name}' (encoding {self.encoding}); pass that space's parameters")
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"parameter '{name}' is {value!r}: weights are numbers in [0, 1]")
        return float(value)

    def _categorical(self, params: Mapping[str, Any], key: str, searched: bool, fixed: int,
                     choices: tuple[int, ...]) -> int:
        if not searched:
            return fixed
        if params.get(key) not in choices:
            raise UserError(f"parameter '{key}' is {params.get(key)!r}: search space '{self.name}' "
                            f"searches {key} over {list(choices)}")
        return int(params[key])


def per_layer_top_k(experts: Sequence[int], top_k: int) -> list[int]:
    """Top-k of each layer: the global value, capped by the layer's expert count.

    A layer with fewer experts than top_k routes to all of them; refusing such a layer
    instead would make low-budget points of a feasible space infeasible.
    """
    return [min(top_k, count) for count in experts]


def indexed(prefix: str, count: int, min_width: int = 1) -> list[str]:
    width = max(min_width, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def unit_scale(values: Any) -> list[float]:
    """Scale non-negative values so the largest is 1.0 (all zeros stay zeros: an even split)."""
    import numpy as np

    clipped = np.clip(np.asarray(values, dtype=float), 0.0, None)
    top = float(clipped.max()) if clipped.size else 0.0
    return [float(v) / top if top > 0 else 0.0 for v in clipped]


def _best_choice(choices: tuple[int, ...], expand: Any, target: Sequence[int]) -> int:
    """The choice whose per-layer expansion matches `target` in the most layers (first on ties)."""
    return max(choices, key=lambda c: sum(a == b for a, b in zip(expand(c), target)))
