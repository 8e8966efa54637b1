"""Validation of configuration data: each check raises a one-line `UserError` that names the key and what
would be accepted. Ground floor: used by the trial fidelity, the search spaces and the study config."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from mola_search.errors import UserError


def accepted_keys(cls: type, exclude: tuple[str, ...] = ("name",)) -> str:
    return ", ".join(f.name for f in fields(cls) if f.name not in exclude)


def check_mapping(raw: Any, what: str, cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """`raw` as a dict whose keys are fields of the dataclass `cls` (less `exclude`)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{what} must be a mapping of keys ({accepted_keys(cls)}), got {type(raw).__name__}")
    known = [f.name for f in fields(cls) if f.name not in exclude]
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        raise UserError(f"unknown {what} key(s) {', '.join(unknown)}: accepted keys are {', '.join(known)}")
    return dict(raw)


def check_int(value: Any, key: str, low: int, high: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        none = " (or null for no limit)" if optional else ""
        raise UserError(f"{key} is {value!r}: use an integer >= {low}{upper}{none}")


def check_number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} has {value!r}: use a finite number")


def check_choices(values: Any, key: str, high: int | None = None) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise UserError(f"{key} is {values!r}: use a non-empty list of distinct integers >= 1")
    for value in values:
        check_int(value, key, low=1, high=high)
    if len(set(values)) != len(values):
        raise UserError(f"{key} {list(values)} repeats a value: list each choice once")
    return tuple(values)
