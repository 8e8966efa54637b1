"""mola-search's on-disk cache, and folders that appear whole or not at all.

`materialize_atomically` is how a slow, shared artefact (the converted embedded model) gets into the
cache: built in a temporary folder beside its target, marked complete, then renamed into place, so
parallel search trials never read half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search._io import write_json
from mola_search.errors import UserError

_COMPLETE_MARKER = ".mola-complete.json"  # written last, inside the temp dir, before the atomic rename


def cache_dir() -> Path:
    """Root of mola-search's on-disk cache: ``$MOLA_CACHE_DIR`` if set, else ``~/.cache/mola-search``."""
    configured = os.environ.get("MOLA_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mola-search"


def model_cache_dir(alias: str) -> Path:
    """Folder holding the converted copy of a built-in model."""
    return cache_dir() / "models" / alias


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` was fully written by ``materialize_atomically`` (not half-written or foreign)."""
    return (folder / _COMPLETE_MARKER).is_file()


def materialize_atomically(target: Path, build: Callable[[Path], None],
                           metadata: dict[str, Any] | None = None,
                           stale_after_s: float = 3600.0) -> Path:
    """Make ``target`` exist with the content ``build`` writes, so no reader ever sees it half-written.

    ``build`` fills an empty temporary folder next to ``target`` (same file system, so the final
    ``rename`` is atomic); a completion marker is written last, then the folder is renamed into place.
    Parallel search trials may all find the cache missing and build at once: the first rename wins,
    the others see a complete ``target``, discard their own copy and use the winner's. A ``target``
    left without the marker (e.g. made by hand) is moved aside and replaced. Temporary folders older
    than ``stale_after_s`` are leftovers of killed writers (search trials get killed) and are removed.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(target, stale_after_s)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(staging)
        write_json(staging / _COMPLETE_MARKER, {"name": target.name, **(metadata or {})})
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache should be readable
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once renamed; otherwise the loser's copy
    return target


def _sweep_leftovers(target: Path, stale_after_s: float) -> None:
    """Delete temporary folders of ``target`` that no live writer can still be filling."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.stale-*"):
        for leftover in target.parent.glob(pattern):
            try:
                old = now - leftover.stat().st_mtime > stale_after_s
            except OSError:
                continue  # removed meanwhile
            if old:
                shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, tolerating another process having finished first."""
    for _ in range(3):
        try:
            os.rename(staging, target)  # atomic; fails if target is a non-empty folder
            return
        except OSError:
            if is_complete(target):
                return  # someone else won the race; their copy is as good as ours
            if not target.exists():
                continue  # a concurrent cleanup removed it in between: try again
            _discard_incomplete(target)
    raise UserError(f"could not write the model cache at {target}; remove that folder and retry")


def _discard_incomplete(target: Path) -> None:
    """Move an incomplete ``target`` aside (atomically) and delete it, so the rename can proceed."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    try:
        os.rename(target, aside / "old")
    except OSError:
        pass  # already moved or replaced by a concurrent writer; the caller re-checks
    shutil.rmtree(aside, ignore_errors=True)
