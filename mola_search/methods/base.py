"""The adapter registry and the kind record: which class a saved folder belongs to, and loading it.

Every method's class is registered under its `kind` (`register`); `ADAPTERS` maps kind -> class.
Every folder an adapter saves holds the kind record, ``mola_method.json``, with a ``"kind"`` key
(`adapter.Adapter.save_adapter` writes it). Loading (`load_adapter_into`) reads that key and
dispatches through the registry; it never guesses a kind from which files a folder holds.

Why ``mola_method.json`` and not ``adapter_config.json``: that name belongs to PEFT in the LoRA,
prompt-tuning and LLaMA-Adapter folders (PEFT reads it back and validates its keys), and a fully
fine-tuned folder has none (it is a Hugging Face model folder). ``mola_method.json`` is ours in
every kind of folder, and four of the five already wrote it before the kind record existed.

Folders saved before the ``"kind"`` key existed still load, through `_legacy_kind` only: a baseline
folder whose ``mola_method.json`` names its ``"method"``, a MoLA folder with only its
``adapter_config.json``, and a PEFT folder whose ``adapter_config.json`` has a ``peft_type``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mola_search.adapter import METHOD_FILE, Adapter
from mola_search.errors import UserError
from mola_search.mola import MoLAModel

METHODS: tuple[str, ...] = ("mola", "lora", "prompt-tuning", "llama-adapter", "full")
"""The values `method` accepts, MoLA first: every one is a registered kind."""
BASELINES: tuple[str, ...] = METHODS[1:]

ADAPTERS: dict[str, type[Adapter]] = {}
"""kind -> the `Adapter` subclass that saves and loads folders of that kind."""

_CONFIG_FILE = "adapter_config.json"  # MoLA's and PEFT's adapter config: read only by the legacy fallback
_PEFT_KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt-tuning", "ADAPTION_PROMPT": "llama-adapter"}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `cls` the loader of folders recording its `kind`."""
    kind = getattr(cls, "kind", None)
    if not (isinstance(cls, type) and issubclass(cls, Adapter) and isinstance(kind, str) and kind):
        raise TypeError(f"{cls!r} is not an Adapter subclass with a `kind`")
    if ADAPTERS.setdefault(kind, cls) is not cls:
        raise ValueError(f"kind '{kind}' is registered already, to {ADAPTERS[kind].__qualname__}")
    return cls


register(MoLAModel)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return method


def known_kinds() -> list[str]:
    """The registered kinds, in `METHODS` order, then any others by name."""
    return sorted(ADAPTERS, key=lambda kind: (METHODS.index(kind) if kind in METHODS else len(METHODS), kind))


def adapter_class(kind: str, folder: str | Path) -> type[Adapter]:
    """The registered class of `kind`, which `folder` records; an unknown kind is a one-line UserError."""
    cls = ADAPTERS.get(kind)
    if cls is None:
        raise UserError(f"`init_from` {folder} holds a '{kind}' adapter, a kind mola-search does not know; "
                        f"known kinds: {', '.join(known_kinds())}")
    return cls


def adapter_kind(folder: str | Path) -> tuple[str, Path]:
    """(kind, adapter folder) of a saved adapter; a run folder holding adapter/ is accepted too."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"`init_from` {folder}: no such folder")
    if not (path / _CONFIG_FILE).is_file() and not (path / METHOD_FILE).is_file() and (path / "adapter").is_dir():
        path = path / "adapter"
    record = _read_object(path / METHOD_FILE) if (path / METHOD_FILE).is_file() else None
    if record is not None and "kind" in record:
        return str(record["kind"]), path
    kind = _legacy_kind(path, record)
    if kind is None:
        raise UserError(f"`init_from` {folder}: not an adapter folder (no {_CONFIG_FILE} or {METHOD_FILE})")
    return kind, path


def _legacy_kind(path: Path, record: dict[str, Any] | None) -> str | None:
    """The kind of a folder saved before the kind record had its ``"kind"`` key; None: not an adapter folder.

    A baseline folder of then has ``mola_method.json`` naming its ``"method"``; a MoLA folder has only
    ``adapter_config.json`` (with ``"method": "mola"``, or no method at all); a PEFT folder's
    ``adapter_config.json`` names its ``peft_type``.
    """
    if record is not None:
        return str(record.get("method"))
    if not (path / _CONFIG_FILE).is_file():
        return None
    config = _read_object(path / _CONFIG_FILE)
    if config.get("method", "mola") == "mola" and "peft_type" not in config:
        return "mola"
    return _PEFT_KINDS.get(str(config.get("peft_type")), str(config.get("peft_type")))


def _read_object(path: Path) -> dict[str, Any]:
    """A JSON object file; what is wrong with it is a one-line UserError. (Not `_io.read_json`: that
    folds a broken file into None, and the user needs to hear which file is broken and how.)"""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def load_adapter_into(model: nn.Module, folder: str | Path) -> None:
    """Start `model` from the adapter saved in `folder` (two-stage training, `init_from`).

    The folder's recorded kind picks the registered class; `model` must be one (the run's `method`
    is that kind), and that class's `load_adapter` checks the rest (allocation, rank, depth, shapes).
    """
    kind, path = adapter_kind(folder)
    cls = adapter_class(kind, folder)
    if not isinstance(model, cls):
        current = getattr(model, "kind", None) or type(model).__name__
        raise UserError(f"`init_from` {folder} holds a '{kind}' adapter but this run's method is "
                        f"'{current}'; pass `method` {kind}")
    model.load_adapter(path)
