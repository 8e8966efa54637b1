"""Task definitions: prompts, verbalizers and data loading for MoLA fine-tuning.

`load_task(name)` is the one entry point. `name` is one of `TASKS`, or
`custom:<task.yaml>` (a user classification task, see `custom.py`), or
`instruct:<file | folder | hub id>` (Alpaca-style instruction data).

Data for the built-in tasks comes from `data_dir`, else `$MOLA_DATA_DIR`, else the
Hugging Face Hub; local layout is `<data_dir>/<task>/<split>.jsonl`. Tasks without
a labelled test split use the official validation split as test and carve a
seeded validation split out of train (10%, at most 500); `TaskData.notes` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from mola_search.errors import UserError
from mola_search.tasks.builtin import ANSWER_MARKER, BUILTIN, TASKS, TaskSpec, load_builtin
from mola_search.tasks.custom import build_custom, build_instruct
from mola_search.tasks.example import SPLITS, Example, TaskData
from mola_search.tasks.sources import DATA_DIR_ENV, resolve_data_dir

__all__ = [
    "ANSWER_MARKER",
    "BUILTIN",
    "DATA_DIR_ENV",
    "SPLITS",
    "TASKS",
    "Example",
    "TaskData",
    "TaskSpec",
    "load_task",
    "task_name",
]


def load_task(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, val_seed: int = 0
) -> TaskData:
    """Load one task with train / validation / test splits of `Example`s.

    `val_seed` only matters where validation is carved out of train; the same seed
    always yields the same split so trials of a search are comparable.
    Raises `UserError` (one line) for unknown names, missing data or bad custom specs.
    """
    text = str(name).strip()
    resolved = resolve_data_dir(data_dir)
    if text.startswith("custom:"):
        return build_custom(_ref(text, "custom:"), val_seed)
    if text.startswith("instruct:"):
        return build_instruct(_ref(text, "instruct:"), resolved, val_seed)
    spec = BUILTIN.get(text.lower())
    if spec is None:
        raise UserError(
            f"unknown task {text!r}; valid: {', '.join(TASKS)}, "
            "custom:<task.yaml> or instruct:<file.jsonl | folder | hub id>"
        )
    return load_builtin(spec, resolved, val_seed)


def task_name(task: str) -> str:
    """What a task calls itself, read without loading its data: a custom task's `name:` (its YAML's file name
    when the file cannot be read: loading it will say why), an instruction set's file or folder name, else the
    task as given. Study folders are named after it."""
    text = str(task).strip()
    if text.startswith("custom:"):
        import yaml

        path = Path(text[len("custom:"):].strip()).expanduser()
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            cfg = None
        name = cfg.get("name") if isinstance(cfg, dict) else None
        return str(name) if isinstance(name, (str, int)) and str(name).strip() else path.stem
    if text.startswith("instruct:"):
        return Path(text[len("instruct:"):].strip().rstrip("/")).name or "instruct"
    return text


def _ref(text: str, prefix: str) -> str:
    ref = text[len(prefix):].strip()
    if not ref:
        raise UserError(f"{prefix} needs a path after the colon, e.g. {prefix}path/to/...")
    return ref
