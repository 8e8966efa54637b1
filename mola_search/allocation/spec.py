"""The allocation spec: per-layer experts, top-k and LoRA rank, and its JSON file.

A spec is the hand-off between every stage (search writes it, training and the
official MoLA code read it), so it validates itself on construction and its file
carries a schema version: an old mola-search must refuse a newer file instead of
misreading it. Extra keys in the file (score, model, task, ...) are metadata and
never change the allocation.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mola_search._io import atomic_write_text, dumps
from mola_search.allocation.rounding import Bound, as_count, expand_bound
from mola_search.allocation.shapes import SHAPES, normalize_shape, parse_counts, shape_allocation
from mola_search.errors import UserError

SCHEMA_VERSION = 1

_SPEC_KEYS = ("schema_version", "num_layers", "budget", "experts", "top_k", "rank", "source")
_REQUIRED_KEYS = ("schema_version", "experts", "top_k", "rank")


@dataclass(frozen=True)
class AllocationSpec:
    """Per-layer MoLA hyper-parameters; layer j (0 = closest to the embeddings) is index j."""

    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    rank: tuple[int, ...]
    source: str = "custom"

    def __post_init__(self) -> None:
        # Normalise lists to tuples so a spec built from JSON is hashable and equal to one built in code.
        for name in ("experts", "top_k", "rank"):
            object.__setattr__(self, name, _int_tuple(getattr(self, name), name))
        if not self.experts:
            raise UserError("allocation has no layers: give at least one expert count")
        for name in ("top_k", "rank"):
            if len(getattr(self, name)) != len(self.experts):
                raise UserError(f"{name} has {len(getattr(self, name))} values but experts has "
                                f"{len(self.experts)}: give one {name} per layer (or a single value)")
        for j, (experts, top_k) in enumerate(zip(self.experts, self.top_k)):
            if top_k > experts:
                raise UserError(f"layer {j}: top_k {top_k} is larger than its {experts} expert(s); "
                                f"use top_k <= the layer's expert count")
        if not isinstance(self.source, str):
            raise UserError(f"source must be a string describing the allocation, got {self.source!r}")

    @classmethod
    def build(cls, experts: Sequence[int], top_k: int | Sequence[int] = 2,
              rank: int | Sequence[int] = 8, source: str = "custom") -> "AllocationSpec":
        """Spec with `top_k` / `rank` given once for all layers or per layer."""
        num_layers = len(experts)
        return cls(tuple(experts), _broadcast(top_k, num_layers), _broadcast(rank, num_layers), source)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def budget(self) -> int:
        return sum(self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "num_layers": self.num_layers,
            "budget": self.budget,
            "experts": list(self.experts),
            "top_k": list(self.top_k),
            "rank": list(self.rank),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllocationSpec":
        """Validate a parsed spec file; derived keys (num_layers, budget) must agree with the lists."""
        if not isinstance(data, Mapping):
            raise UserError(f"an allocation spec must be a JSON object, got {type(data).__name__}")
        missing = [key for key in _REQUIRED_KEYS if key not in data]
        if missing:
            raise UserError(f"allocation spec is missing {', '.join(missing)}: "
                            f"a spec needs {', '.join(_REQUIRED_KEYS)}")
        _check_schema_version(data["schema_version"])
        source = data.get("source", "custom")
        spec = cls.build(_json_list(data["experts"], "experts"), _json_scalar_or_list(data["top_k"], "top_k"),
                         _json_scalar_or_list(data["rank"], "rank"), source)
        for key, actual in (("num_layers", spec.num_layers), ("budget", spec.budget)):
            if key in data and data[key] != actual:
                raise UserError(f"allocation spec says {key} {data[key]!r} but its experts give {actual}: "
                                f"fix or drop the {key} key")
        return spec

    def to_json(self, path: str | os.PathLike[str], **metadata: Any) -> Path:
        return save_spec(self, path, **metadata)

    @classmethod
    def load_spec(cls, path: str | os.PathLike[str]) -> "AllocationSpec":
        return load_spec(path)

    def to_mola_flags(self, **settings: Any) -> str:
        return to_mola_flags(self, **settings)


def save_spec(spec: AllocationSpec, path: str | os.PathLike[str], **metadata: Any) -> Path:
    """Write the spec as JSON with `metadata` (score, model, task, ...) merged in at the top level.

    The file is replaced atomically so a crashed trial never leaves half a spec behind, and is strict
    JSON: a NaN or infinite value in the metadata is written as null.
    """
    clashes = sorted(set(metadata) & set(_SPEC_KEYS))
    if clashes:
        raise UserError(f"metadata key(s) {', '.join(clashes)} would overwrite spec fields: "
                        f"rename them (reserved: {', '.join(_SPEC_KEYS)})")
    try:
        text = dumps({**spec.to_dict(), **metadata})
    except (TypeError, ValueError) as exc:
        raise UserError(f"spec metadata is not JSON-serialisable ({exc}): "
                        f"pass str, number, bool, None, list or dict values") from None
    target = atomic_write_text(path, text)
    return target


def load_spec_with_metadata(path: str | os.PathLike[str]) -> tuple[AllocationSpec, dict[str, Any]]:
    """Read a spec file; the second item holds every key that is not a spec field."""
    location = Path(path)
    if not location.is_file():
        what = "is a directory" if location.is_dir() else "does not exist"
        raise UserError(f"allocation spec '{location}' {what}: pass the path of a JSON spec file")
    try:
        data = json.loads(location.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"allocation spec '{location}' is not valid JSON ({reason}): "
                        f"pass a file written by mola-search or save_spec") from None
    spec = AllocationSpec.from_dict(data)
    return spec, {key: value for key, value in data.items() if key not in _SPEC_KEYS}


def load_spec(path: str | os.PathLike[str]) -> AllocationSpec:
    return load_spec_with_metadata(path)[0]


def check_depth(spec: AllocationSpec, num_layers: int) -> None:
    """Refuse a spec made for another depth: silently truncating or padding would change the profile."""
    if spec.num_layers != num_layers:
        raise UserError(f"allocation has {spec.num_layers} layers but the model has {num_layers}; "
                        f"resample it with mola_search.allocation.resample_depth(experts, {num_layers}) "
                        f"or pass a spec for {num_layers} layers")


# The official script's own default target list, in its order (GCYZSL/MoLA mola_training.py).
OFFICIAL_TARGET_MODULES = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"


def to_mola_flags(spec: AllocationSpec, **settings: Any) -> str:
    """Command-line flags of the official MoLA training script (GCYZSL/MoLA `mola_training.py`) for this allocation.

    `settings` are more of its flags by their names (`base_model`, `lora_alpha`, `obalance`, ...), written
    after the allocation's in the order given: booleans as True/False (as fire reads them), numbers
    shortest, sequences as comma lists, text shell-quoted. A one-element sequence gets a trailing comma:
    fire would read `q_proj` as a string, which the script splits into characters, and `q_proj,` as a tuple. Which settings match a study, and whether the official code can run it at
    all, is `mola_search.mola.official.official_flags`'s business.

    `--lora_target_modules` is always written, the script's own default list unless `settings` gives one:
    with its pinned fire==0.5.0, "2,2,..." arrives as a tuple, the script then takes the branch that
    converts every list argument with `[str(x) for x in value]`, and the default *string* of target modules
    becomes a list of single characters, which crashes model construction. Given explicitly, it arrives as
    a tuple too.
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (tuple, list)):
            return ",".join(str(x) for x in v) + ("," if len(v) == 1 else "")
        return shlex.quote(str(v))

    settings = {**settings, "lora_target_modules": settings.get("lora_target_modules", OFFICIAL_TARGET_MODULES)}
    flags = {"number_experts": spec.experts, "top_k": spec.top_k, "lora_r": spec.rank, **settings}
    return " ".join(f"--{name} {value(v)}" for name, v in flags.items())


def resolve_allocation(value: str, num_layers: int, budget: int, top_k: int | Sequence[int] = 2,
                       rank: int | Sequence[int] = 8, min_count: Bound = 1,
                       max_count: Bound | None = None) -> AllocationSpec:
    """Read a CLI `--allocation`: a shape name, a JSON spec file, a comma list or digit notation.

    Only a shape is scaled to `budget`; explicit counts and spec files keep their own
    total, and a spec file keeps its own top_k and rank. Explicit counts must still
    lie within [min_count, max_count].
    """
    text = value.strip()
    if normalize_shape(text) in SHAPES:
        experts = shape_allocation(text, num_layers, budget, min_count, max_count)
        return AllocationSpec.build(experts, top_k, rank, source=normalize_shape(text))
    if text.endswith(".json") or os.sep in text or Path(text).is_file():
        spec = load_spec(text)
        check_depth(spec, num_layers)
        _check_count_bounds(spec.experts, min_count, max_count)
        return spec
    if text.replace(",", "").replace(" ", "").isdigit():
        experts = parse_counts(text, num_layers)
        _check_count_bounds(experts, min_count, max_count)
        return AllocationSpec.build(experts, top_k, rank, source=text.replace(" ", ""))
    raise UserError(f"cannot read allocation '{value}': use a shape ({', '.join(SHAPES)}), "
                    f"a JSON spec path, digit notation like 2468, or a comma list of {num_layers} counts")


def _check_count_bounds(experts: Sequence[int], min_count: Bound, max_count: Bound | None) -> None:
    lows = expand_bound(min_count, len(experts), "min_count")
    highs = [None] * len(experts) if max_count is None else expand_bound(max_count, len(experts), "max_count")
    for j, (count, low, high) in enumerate(zip(experts, lows, highs)):
        if count < low or (high is not None and count > high):
            allowed = f"at least {low}" if high is None else f"{low}..{high}"
            raise UserError(f"layer {j} has {count} experts but {allowed} are allowed: "
                            f"change the allocation or the expert bounds")


def _check_schema_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"allocation spec has schema_version {version!r}: "
                        f"expected the integer {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise UserError(f"allocation spec has schema_version {version}, newer than the {SCHEMA_VERSION} "
                        f"this mola-search reads: upgrade mola-search or re-export the spec")


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise UserError(f"{name} must be a sequence of integers >= 1, got {values!r}")
    counts = tuple(as_count(value) for value in values)
    for j, (value, count) in enumerate(zip(values, counts)):
        if count is None or count < 1:
            raise UserError(f"{name} for layer {j} is {value!r}: use an integer >= 1")
    return counts


def _broadcast(value: int | Sequence[int], num_layers: int) -> Any:
    """A scalar repeated per layer; anything else is passed on for `__post_init__` to judge."""
    count = as_count(value)
    if count is not None:
        return (count,) * num_layers
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _json_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise UserError(f"allocation spec key '{name}' must be a list of integers, got {value!r}")
    return value


def _json_scalar_or_list(value: Any, name: str) -> int | list[Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _json_list(value, name)
