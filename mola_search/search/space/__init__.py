"""Search spaces: how a point Optuna proposes becomes a feasible allocation (see `space.base`).

One module per encoding (`blocks`, `per_layer`, `profile`); `ENCODINGS` maps each name to its class.
"""

from __future__ import annotations

import os
from pathlib import Path

from mola_search.errors import UserError
from mola_search.search.space.base import (BUILTIN_SPACES, DEFAULT_SPACE, ENCODINGS, RANK_PARAM, TOP_K_PARAM,
                                           SearchSpace, per_layer_top_k, register_encoding)
from mola_search.search.space.blocks import BlocksSpace
from mola_search.search.space.per_layer import PerLayerSpace
from mola_search.search.space.profile import ProfileSpace
from mola_search.trial.fidelity import Fidelity

__all__ = ["BUILTIN_SPACES", "DEFAULT_SPACE", "ENCODINGS", "RANK_PARAM", "TOP_K_PARAM", "BlocksSpace", "Fidelity",
           "PerLayerSpace", "ProfileSpace", "SearchSpace", "builtin_space_names", "builtin_space_path",
           "load_space", "make_space", "per_layer_top_k", "register_encoding"]

_REPO_SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


def make_space(encoding: str, **settings) -> SearchSpace:
    """The space of `encoding` with `settings` (the fields of its class, validated on construction)."""
    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    return ENCODINGS[encoding](**settings)


def builtin_space_path(name: str) -> Path:
    """Path of the committed ``search_spaces/<name>.yaml`` in a repo checkout.

    Only a source checkout has the folder; an installed package should call
    `SearchSpace.builtin` (or `load_space`), which need no file.
    """
    if name not in BUILTIN_SPACES:
        raise UserError(f"unknown built-in search space '{name}': use one of {', '.join(BUILTIN_SPACES)}")
    return _REPO_SPACES / f"{name}.yaml"


def builtin_space_names() -> tuple[str, ...]:
    return tuple(BUILTIN_SPACES)


def load_space(value: str | os.PathLike[str] | None = None) -> SearchSpace:
    """A study's ``space``: None for the default, a built-in name, or the path of a YAML file."""
    if value is None:
        return SearchSpace.builtin(DEFAULT_SPACE)
    if isinstance(value, str) and value.strip() in BUILTIN_SPACES:
        return SearchSpace.builtin(value.strip())
    return SearchSpace.load(value)
