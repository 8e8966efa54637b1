"""Where rows come from (local JSON Lines or the Hugging Face Hub) and how splits are completed.

Local files are read with plain `json`: it is faster than `datasets` for these
sizes and keeps `datasets` (slow to import) off the common path. The Hub is only
touched when no local file exists, and every Hub failure becomes a one-line
`UserError`, never a traceback.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Literal

from mola_search.errors import UserError
from mola_search.tasks.example import SPLITS, Example, TaskData

Row = dict[str, Any]

DATA_DIR_ENV = "MOLA_DATA_DIR"
CARVE_FRACTION = 0.1
CARVE_CAP = 500
LAYOUT_HINT = (
    f"pass `data_dir` or set {DATA_DIR_ENV} to a folder laid out as <task>/<split>.jsonl"
)


class HubUnavailable(Exception):
    """Internal: the Hub could not deliver; the caller words the user-facing error."""


def one_line(text: object, limit: int = 200) -> str:
    """First line of `text`, shortened, so error messages stay single-line."""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Explicit argument first, then `$MOLA_DATA_DIR`, else None (meaning: use the Hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else None


def read_rows(path: Path) -> list[Row]:
    """Rows of a `.jsonl` file (one object per line) or a `.json` array file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {path}: {one_line(err)}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {one_line(err)}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path} must hold a JSON array of objects")
        return data
    rows: list[Row] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno} is not valid JSON: {one_line(err)}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno} must be a JSON object")
        rows.append(row)
    return rows


def local_rows(folder: Path, required: tuple[str, ...] = ("train", "validation")) -> dict[str, list[Row]]:
    """Rows of `<folder>/<split>.jsonl` for each split present; raises FileNotFoundError
    naming the first missing required file so the caller can fall back to the Hub."""
    for split in required:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(str(path))
    return {
        split: read_rows(folder / f"{split}.jsonl")
        for split in SPLITS
        if (folder / f"{split}.jsonl").is_file()
    }


def hub_offline_reason() -> str | None:
    """Why the Hub must not be contacted, or None.

    Checked here rather than left to `datasets`, which reads these variables only
    once at import time; this way setting them later (tests, notebooks) still works.
    """
    from mola_search.hub import offline_reason

    return offline_reason()


def hub_rows(
    path: str,
    config: str | None = None,
    prepare: Callable[[Any], Any] | None = None,
) -> dict[str, list[Row]]:
    """Rows per split from `datasets.load_dataset(path, config)`.

    `prepare` may filter/cast the `DatasetDict` before rows are materialised (e.g.
    drop image problems without decoding images). Raises `HubUnavailable` on any
    failure, because network, auth and missing-dataset errors all mean "no data".
    """
    reason = hub_offline_reason()
    if reason:
        raise HubUnavailable(reason)
    try:
        import datasets  # deferred: heavy import, only needed for the Hub path

        dsd = datasets.load_dataset(path, config)
        if prepare is not None:
            dsd = prepare(dsd)
        return {split: dsd[split].to_list() for split in SPLITS if split in dsd}
    except Exception as err:  # noqa: BLE001 - any Hub failure means "no data" to the user
        raise HubUnavailable(f"{type(err).__name__}: {one_line(err)}") from None


def carve_size(n: int) -> int:
    """10% of train, at most 500, at least 1 (for n >= 2)."""
    return max(1, min(CARVE_CAP, int(n * CARVE_FRACTION))) if n >= 2 else 0


def carve(train: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Split `train` into (rest, validation) by a seeded sample of positions.

    Both parts keep their original order, are disjoint and cover `train`; the same
    seed always gives the same split, independent of Python's hash seed.
    """
    k = carve_size(len(train))
    picked = set(random.Random(seed).sample(range(len(train)), k))
    rest = [ex for i, ex in enumerate(train) if i not in picked]
    val = [ex for i, ex in enumerate(train) if i in picked]
    return rest, val


MissingTest = Literal["validation_becomes_test", "test_is_validation"]


def assemble(
    name: str,
    found: dict[str, list[Example]],
    *,
    source: str,
    val_seed: int,
    notes: list[str] | tuple[str, ...] = (),
    missing_test: MissingTest = "validation_becomes_test",
    hidden_test_note: str = "test labels are hidden",
) -> TaskData:
    """Complete the three splits and record how.

    `validation_becomes_test` (benchmarks): the official validation split is the
    test set and validation is carved from train, so model selection never sees
    test. `test_is_validation` (instruction data): there is no held-out benchmark
    to protect, so test simply repeats validation.
    """
    out_notes = list(notes)
    train = found.get("train") or []
    if not train:
        raise UserError(f"task {name!r}: no usable train examples in {source}")
    val, test = found.get("validation"), found.get("test")

    def do_carve() -> list[Example]:
        nonlocal train
        n = len(train)
        train, carved = carve(train, val_seed)
        out_notes.append(
            f"validation = {len(carved)} examples carved from the {n} train examples with "
            f"seed {val_seed} ({CARVE_FRACTION:.0%} of train, at most {CARVE_CAP}); "
            f"train = the remaining {len(train)}, disjoint"
        )
        return carved

    if test:
        if val:
            out_notes.append("train / validation / test as shipped")
        else:
            val = do_carve()
    elif missing_test == "validation_becomes_test" and val:
        test = val
        out_notes.append(f"test = official validation split ({len(test)} examples; {hidden_test_note})")
        val = do_carve()
    else:
        if not val:
            val = do_carve()
        test = list(val)
        out_notes.append(f"test = validation ({len(test)} examples; no test split)")
    return TaskData(
        name=name,
        splits={"train": train, "validation": val, "test": test},
        notes=tuple(out_notes),
        source=source,
    )
