"""Files written whole or not at all, and JSON that a strict reader accepts: the one implementation.

Every file mola-search writes goes through `atomic_write_bytes` / `atomic_write_text`: the content goes
to a temporary file in the same folder, which then replaces the target (`os.replace`, atomic on POSIX and
Windows). A reader (a resumed study, the report, another process, a crash) sees the old file or the new
one, never half of one.

`write_json` writes strict JSON: `json_safe` turns NaN and +-inf into null (JSON has no such numbers, and
Python's `json` would otherwise write them), tuples into lists and numpy scalars into Python numbers, and
the encoder runs with ``allow_nan=False`` so nothing non-standard slips through. `read_json` is its
forgiving twin: a missing, unreadable or non-object file is None, for callers that treat "not there yet"
and "broken" alike (a study that is still being written).

This module sits on the ground floor: it imports nothing from mola_search, so every layer may use it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "dumps", "json_safe", "read_json", "write_json"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (parents are created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """`obj` with every value JSON can hold as it is: NaN/inf -> None, tuples -> lists, numpy scalars and
    arrays -> Python numbers and lists, paths -> str. Mapping keys become str, as `json` would make them."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return json_safe(tolist())
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `obj` (through `json_safe`), with a final newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as strict JSON, atomically; returns the path."""
    return atomic_write_text(path, dumps(obj, indent=indent))


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
