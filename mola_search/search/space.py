"""Search spaces as data: how a point Optuna proposes becomes a feasible MoLA allocation.

A space is a small YAML file (``search_spaces/*.yaml``) validated on load. Every
encoding maps *any* point of [0, 1]^d to per-layer weights, and `round_to_budget`
turns those weights into integer expert counts that sum exactly to the budget and
respect [min_experts, max_experts]. So the space is feasible by construction: a
sampler never proposes a point that has to be rejected, and its model of the
objective is never fed artificial failures. All-zero weights are valid too: they
mean "no preference", i.e. an even split.

Encodings:

* ``blocks``: K contiguous blocks of layers, one weight per block (the paper's
  granularity). Blocks are split with the same rule as the paper shapes
  (`block_sizes`) and rounded with the same tie-break, so the paper shapes are
  points of this space and `encode` finds them exactly.
* ``per_layer``: one weight per layer. Every feasible allocation is a point of it
  (weights = counts / max(counts)), at the price of a d = L dimensional search.
* ``profile``: a few knot values at evenly spaced depths, linearly interpolated to
  the layers: a smooth depth profile in few dimensions. Blocky allocations are
  only approximated; `encode` says whether its point is exact.

`suggest` (define-by-run, for Optuna) and `decode` (a pure function of the
parameters) share one code path, so a trial's stored ``params`` always decode to
the allocation that trial trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from scipy.optimize import nnls

from mola_search.allocation import AllocationSpec, block_sizes, round_to_budget
# The rounding tie-break of the paper shapes. Using the very same function (not a copy) is what
# makes the blocks encoding reproduce `shape_allocation` exactly; tests/test_space.py guards it.
from mola_search.allocation.shapes import _trend as shape_trend
from mola_search.errors import UserError

if TYPE_CHECKING:  # optuna is only needed by the caller that owns the trial
    import optuna

ENCODINGS: tuple[str, ...] = ("blocks", "per_layer", "profile")
DEFAULT_SPACE = "blocks"
TOP_K_PARAM = "top_k"
RANK_PARAM = "rank"

_REPO_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"

_DEFAULT_FIDELITY: dict[str, Any] = {
    "max_train_examples": 256,
    "max_eval_examples": 1000,  # the whole validation split where it is small (scoring is forward-only)
    "epochs": 1.0,
    "max_steps": None,
    "rungs": [0.25, 0.5, 1.0],
}
# The committed search_spaces/*.yaml files, embedded so a non-editable install (no repo checkout)
# still has them. tests/test_space.py checks that each YAML file loads to the same SearchSpace.
_BUILTIN_SPACES: dict[str, dict[str, Any]] = {
    "blocks": {"encoding": "blocks", "blocks": 4, "min_experts": 1, "max_experts": 8,
               "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
    "per_layer": {"encoding": "per_layer", "min_experts": 1, "max_experts": 8,
                  "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
    "profile": {"encoding": "profile", "knots": 4, "min_experts": 1, "max_experts": 8,
                "top_k": 2, "rank": 8, "fidelity": _DEFAULT_FIDELITY},
}


# --------------------------------------------------------------------------------------------------
# Fidelity


@dataclass(frozen=True)
class Fidelity:
    """How much training one search trial gets: a search ranks allocations, it need not converge them.

    ``rungs`` are the fractions of the trial's training at which validation is scored and
    reported to the pruner (ASHA milestones); they increase and end at 1.0, the full trial.
    ``None`` for a limit means "no limit".
    """

    max_train_examples: int | None = 256
    max_eval_examples: int | None = 1000
    epochs: float = 1.0
    max_steps: int | None = None
    rungs: tuple[float, ...] = (0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        for key in ("max_train_examples", "max_eval_examples", "max_steps"):
            _check_int(getattr(self, key), f"fidelity.{key}", low=1, optional=True)
        _check_number(self.epochs, "fidelity.epochs")
        if self.epochs <= 0:
            raise UserError(f"fidelity.epochs is {self.epochs}: use a number > 0")
        object.__setattr__(self, "epochs", float(self.epochs))
        object.__setattr__(self, "rungs", _check_rungs(self.rungs))

    @classmethod
    def from_dict(cls, raw: Any) -> "Fidelity":
        return cls(**_check_mapping(raw, "fidelity", cls))

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "rungs": list(self.rungs)}


def _check_rungs(rungs: Any) -> tuple[float, ...]:
    accepted = "a list of increasing fractions in (0, 1] ending at 1.0, e.g. [0.25, 0.5, 1.0]"
    if isinstance(rungs, (str, bytes)) or not isinstance(rungs, Sequence) or not rungs:
        raise UserError(f"fidelity.rungs is {rungs!r}: use {accepted}")
    for value in rungs:
        _check_number(value, "fidelity.rungs")
    values = tuple(float(v) for v in rungs)
    increasing = all(a < b for a, b in zip(values, values[1:]))
    if not increasing or values[0] <= 0 or values[-1] != 1.0:
        raise UserError(f"fidelity.rungs is {list(rungs)}: use {accepted}")
    return values


# --------------------------------------------------------------------------------------------------
# Search space


@dataclass(frozen=True)
class SearchSpace:
    """Which allocations a search may propose, and how Optuna's parameters encode them.

    ``top_k`` and ``rank`` are fixed unless ``search_top_k`` / ``search_rank`` is set; then
    one global value is searched over ``top_k_choices`` / ``rank_choices``. A layer never
    routes to more experts than it has: its top-k is ``min(top_k, experts)`` (see
    `per_layer_top_k`), which keeps a 1-expert layer valid under a global top_k of 2.
    """

    encoding: str
    blocks: int = 4
    knots: int = 4
    min_experts: int = 1
    max_experts: int | None = 8
    top_k: int = 2
    rank: int = 8
    search_top_k: bool = False
    top_k_choices: tuple[int, ...] = (1, 2, 3)
    search_rank: bool = False
    rank_choices: tuple[int, ...] = (4, 8, 16)
    fidelity: Fidelity = field(default_factory=Fidelity)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise UserError(f"unknown encoding {self.encoding!r}: use one of {', '.join(ENCODINGS)}")
        _check_int(self.blocks, "blocks", low=1)
        _check_int(self.knots, "knots", low=2)
        _check_int(self.min_experts, "min_experts", low=1)
        _check_int(self.max_experts, "max_experts", low=self.min_experts, optional=True)
        _check_int(self.top_k, "top_k", low=1, high=self.max_experts)
        _check_int(self.rank, "rank", low=1)
        for key in ("search_top_k", "search_rank"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"{key} is {getattr(self, key)!r}: use true or false")
        # Unused choices are only checked for shape, so narrowing max_experts needs no other edit.
        choice_cap = self.max_experts if self.search_top_k else None
        object.__setattr__(self, "top_k_choices",
                           _check_choices(self.top_k_choices, "top_k_choices", high=choice_cap))
        object.__setattr__(self, "rank_choices", _check_choices(self.rank_choices, "rank_choices"))
        if not isinstance(self.fidelity, Fidelity):
            raise UserError(f"fidelity is {self.fidelity!r}: use a mapping of {_accepted_keys(Fidelity)}")
        if not isinstance(self.name, str):
            raise UserError(f"name is {self.name!r}: use a string")

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, raw: Any, name: str = "custom") -> "SearchSpace":
        """Validate a parsed space; every error names the space, the key and what is accepted."""
        try:
            mapping = _check_mapping(raw, "search space", cls, exclude=("name",))
            if "encoding" not in mapping:
                raise UserError(f"'encoding' is missing: use one of {', '.join(ENCODINGS)}")
            if "fidelity" in mapping:
                mapping["fidelity"] = Fidelity.from_dict(mapping["fidelity"])
            return cls(**mapping, name=name)
        except UserError as error:
            raise UserError(f"search space '{name}': {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SearchSpace":
        """Read a YAML space file; the space is named after the file (``blocks.yaml`` -> "blocks")."""
        location = Path(path)
        if not location.is_file():
            what = "is a directory" if location.is_dir() else "does not exist"
            raise UserError(f"search space file '{location}' {what}: pass a YAML file or one of "
                            f"the built-in spaces {', '.join(_BUILTIN_SPACES)}")
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
        if name not in _BUILTIN_SPACES:
            raise UserError(f"unknown built-in search space '{name}': use one of "
                            f"{', '.join(_BUILTIN_SPACES)} or the path of a YAML file")
        return cls.from_dict(_BUILTIN_SPACES[name], name=name)

    def to_dict(self) -> dict[str, Any]:
        """The mapping `from_dict` accepts (without the name): what a run record stores."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        raw.update(top_k_choices=list(self.top_k_choices), rank_choices=list(self.rank_choices),
                   fidelity=self.fidelity.to_dict())
        return raw

    # ---------------------------------------------------------------------------------- feasibility

    def check_budget(self, num_layers: int, budget: int) -> None:
        """Refuse a (depth, budget) pair no point of this space can satisfy, before any trial runs."""
        _check_int(num_layers, "num_layers", low=1)
        if self.encoding == "blocks" and self.blocks > num_layers:
            raise UserError(f"search space '{self.name}' has {self.blocks} blocks but the model has "
                            f"{num_layers} layers: use blocks <= {num_layers}")
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

    def weight_names(self, num_layers: int) -> list[str]:
        """The float weight parameters only: ``w_block<b>``, ``w_layer<j>`` or ``w_knot<k>``."""
        if self.encoding == "blocks":
            return _indexed("w_block", self.blocks)
        if self.encoding == "per_layer":
            return _indexed("w_layer", num_layers, min_width=2)
        return _indexed("w_knot", self.knots)

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

    def layer_weights(self, params: Mapping[str, Any], num_layers: int) -> list[float]:
        """Per-layer weights before rounding: what the point 'wants', for reports and plots."""
        values = [self._weight(params, name) for name in self.weight_names(num_layers)]
        if self.encoding == "blocks":
            return [v for v, size in zip(values, block_sizes(num_layers, self.blocks)) for _ in range(size)]
        if self.encoding == "per_layer":
            return values
        return [float(w) for w in _interpolation_matrix(num_layers, self.knots) @ np.asarray(values)]

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
        for weights in self._candidate_weights(spec.experts):
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

    def _candidate_weights(self, experts: Sequence[int]) -> list[list[float]]:
        """Weight vectors worth trying for `encode`, most likely exact first; each scaled into [0, 1]."""
        counts = np.asarray(experts, dtype=float)
        if self.encoding == "per_layer":
            return [_unit_scale(counts)]
        if self.encoding == "blocks":
            sizes = block_sizes(len(experts), self.blocks)
            groups = np.split(counts, np.cumsum(sizes)[:-1])
            # The block mean is exact for rounded shapes; min/max cover blocks whose rounding spilled.
            return [_unit_scale(np.array([reduce(g) for g in groups])) for reduce in (np.mean, np.max, np.min)]
        matrix = _interpolation_matrix(len(experts), self.knots)
        fitted, _ = nnls(matrix, counts)
        depths = np.linspace(0.0, len(experts) - 1, self.knots)
        sampled = np.interp(depths, np.arange(len(experts)), counts)
        return [_unit_scale(fitted), _unit_scale(sampled)]

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


def builtin_space_path(name: str) -> Path:
    """Path of the committed ``search_spaces/<name>.yaml`` in a repo checkout.

    Only a source checkout has the folder; an installed package should call
    `SearchSpace.builtin` (or `load_space`), which need no file.
    """
    if name not in _BUILTIN_SPACES:
        raise UserError(f"unknown built-in search space '{name}': use one of {', '.join(_BUILTIN_SPACES)}")
    return _REPO_SPACES / f"{name}.yaml"


def builtin_space_names() -> tuple[str, ...]:
    return tuple(_BUILTIN_SPACES)


def load_space(value: str | os.PathLike[str] | None = None) -> SearchSpace:
    """A CLI's ``--space``: None for the default, a built-in name, or the path of a YAML file."""
    if value is None:
        return SearchSpace.builtin(DEFAULT_SPACE)
    if isinstance(value, str) and value.strip() in _BUILTIN_SPACES:
        return SearchSpace.builtin(value.strip())
    return SearchSpace.load(value)


# --------------------------------------------------------------------------------------------------
# Helpers


def _indexed(prefix: str, count: int, min_width: int = 1) -> list[str]:
    width = max(min_width, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _interpolation_matrix(num_layers: int, knots: int) -> np.ndarray:
    """(layers x knots) linear interpolation: knot k sits at depth k/(knots-1), layer j at j/(L-1).

    Both ends are pinned (first layer = first knot, last layer = last knot), so a knot's
    value is directly readable as "the weight at that depth".
    """
    depths = np.linspace(0.0, knots - 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    matrix = np.zeros((num_layers, knots))
    for j, position in enumerate(depths):
        below = min(int(math.floor(position)), knots - 2)
        share = position - below
        matrix[j, below] = 1.0 - share
        matrix[j, below + 1] = share
    return matrix


def _unit_scale(values: np.ndarray) -> list[float]:
    """Scale non-negative values so the largest is 1.0 (all zeros stay zeros: an even split)."""
    clipped = np.clip(values, 0.0, None)
    top = float(clipped.max()) if clipped.size else 0.0
    return [float(v) / top if top > 0 else 0.0 for v in clipped]


def _best_choice(choices: tuple[int, ...], expand: Any, target: Sequence[int]) -> int:
    """The choice whose per-layer expansion matches `target` in the most layers (first on ties)."""
    return max(choices, key=lambda c: sum(a == b for a, b in zip(expand(c), target)))


def _accepted_keys(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls) if f.name != "name")


def _check_mapping(raw: Any, what: str, cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise UserError(f"{what} must be a mapping of keys ({_accepted_keys(cls)}), got {type(raw).__name__}")
    known = [f.name for f in fields(cls) if f.name not in exclude]
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        raise UserError(f"unknown {what} key(s) {', '.join(unknown)}: accepted keys are {', '.join(known)}")
    return dict(raw)


def _check_int(value: Any, key: str, low: int, high: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        none = " (or null for no limit)" if optional else ""
        raise UserError(f"{key} is {value!r}: use an integer >= {low}{upper}{none}")


def _check_number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} has {value!r}: use a finite number")


def _check_choices(values: Any, key: str, high: int | None = None) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise UserError(f"{key} is {values!r}: use a non-empty list of distinct integers >= 1")
    for value in values:
        _check_int(value, key, low=1, high=high)
    if len(set(values)) != len(values):
        raise UserError(f"{key} {list(values)} repeats a value: list each choice once")
    return tuple(values)
