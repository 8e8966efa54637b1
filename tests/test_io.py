"""The ground floor's file helpers: atomic replacement and strict JSON."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mola_search._io import atomic_write_text, dumps, json_safe, read_json, write_json


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_json_with_nan_and_inf_as_null(tmp_path) -> None:
    path = write_json(tmp_path / "a" / "x.json", {"nan": math.nan, "inf": [math.inf, -math.inf, 1.5],
                                                  "np": np.float32(0.25), "arr": np.arange(3), "t": (1, 2)})
    assert _strict(path.read_text()) == {"nan": None, "inf": [None, None, 1.5], "np": 0.25, "arr": [0, 1, 2],
                                         "t": [1, 2]}


def test_dumps_refuses_what_json_safe_cannot_make_standard() -> None:
    assert json_safe({1: math.nan}) == {"1": None}
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    target = atomic_write_text(tmp_path / "f.txt", "old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_read_json_is_none_for_missing_broken_or_non_object_files(tmp_path) -> None:
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "broken.json").write_text("{")
    assert read_json(tmp_path / "broken.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "list.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
