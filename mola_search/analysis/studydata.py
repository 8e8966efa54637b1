"""Read a study folder into plain records: config, Optuna trials, finalists' run folders.

Everything the report, `compare` and the importance analysis need comes from the
Optuna storage (`study.db`) and the finalists' `metrics.json` files, so a study
that is still running, or was interrupted, can be read at any time: only what is
finished is used, and `StudyData.notes` says what is missing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mola_search.errors import UserError

MIN_COMPLETED = 2  # below this there is nothing to compare, let alone estimate

_LABEL = re.compile(r"^t(\d+)-(.*)$")


@dataclass
class TrialRecord:
    """One Optuna trial, as the report sees it."""

    number: int
    state: str                              # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None                     # final validation score (COMPLETE only)
    intermediate: dict[int, float]          # rung -> score
    origin: str
    allocation: tuple[int, ...] | None
    top_k: tuple[int, ...] | None
    rank: tuple[int, ...] | None
    params: dict[str, Any]
    duplicate_of: int | None = None
    failure: str = ""
    wall_time_s: float | None = None
    node: str = ""
    start: datetime | None = None
    complete: datetime | None = None

    @property
    def is_seed(self) -> bool:
        return self.origin.startswith("seed:")

    @property
    def seed_name(self) -> str:
        return self.origin[5:] if self.is_seed else ""

    @property
    def last_score(self) -> float | None:
        """The final score, or for a pruned trial the score of the last rung it reached."""
        if self.value is not None:
            return self.value
        return self.intermediate[max(self.intermediate)] if self.intermediate else None


@dataclass
class FinalistRecord:
    """One allocation retrained with several seeds (`finalists/<label>/seed<k>/`)."""

    label: str
    number: int
    origin: str
    allocation: tuple[int, ...] | None
    folder: Path
    test: dict[int, float] = field(default_factory=dict)          # training seed -> test accuracy
    validation: dict[int, float] = field(default_factory=dict)
    trainable_params: int | None = None
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_seed(self) -> bool:
        return self.origin.startswith("seed:")

    @property
    def name(self) -> str:
        """Seed name ("rectangle") or "trial <n> (<sampler>)"."""
        return self.origin[5:] if self.is_seed else f"trial {self.number} ({self.origin})"

    def run_folders(self) -> list[Path]:
        return [self.folder / f"seed{s}" for s in sorted(self.metrics)]

    def adapters(self) -> list[Path]:
        return [p / "adapter" for p in self.run_folders() if (p / "adapter" / "adapter_config.json").is_file()]


@dataclass
class StudyData:
    folder: Path
    config: Any                              # StudyConfig
    study: Any                               # optuna.Study
    num_layers: int
    budget: int | None
    trials: list[TrialRecord]
    finalists: list[FinalistRecord]
    best: dict[str, Any] | None              # best_allocation.json
    space: Any = None                        # SearchSpace, when its definition can still be read
    notes: list[str] = field(default_factory=list)
    finished: bool = True

    @property
    def name(self) -> str:
        return self.config.study_name or self.folder.name

    def completed(self, unique: bool = True) -> list[TrialRecord]:
        """COMPLETE trials with a finite score; `unique` drops proposals answered from the duplicate cache."""
        return [t for t in self.trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)
                and t.allocation is not None and not (unique and t.duplicate_of is not None)]

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials if t.state == state and t.duplicate_of is None)

    def seed_trials(self) -> dict[str, TrialRecord]:
        out: dict[str, TrialRecord] = {}
        for t in self.trials:
            if t.is_seed and t.allocation is not None and t.seed_name not in out:
                out[t.seed_name] = t
        return out

    def best_finalist(self) -> FinalistRecord | None:
        """The finalist best_allocation.json names, else the one with the highest mean test score."""
        scored = [f for f in self.finalists if f.test]
        if not scored:
            return None
        if self.best and self.best.get("trial") is not None:
            for f in scored:
                if f.number == self.best["trial"]:
                    return f
        return max(scored, key=lambda f: sum(f.test.values()) / len(f.test))

    def finalist_for_seed(self, seed_name: str) -> FinalistRecord | None:
        for f in self.finalists:
            if f.origin == f"seed:{seed_name}" and f.test:
                return f
        return None


def load_study(folder: str | Path) -> StudyData:
    """Read a study folder; a folder that is not a study, or has no storage, is a UserError."""
    import optuna

    from mola_search.search.config import StudyConfig
    from mola_search.search.study import default_storage

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a study folder written by `mola-search`, e.g. runs/<study>")
    config = StudyConfig.load(folder)  # "not a mola-search study folder" when study.json is missing
    storage = config.storage or default_storage(folder)
    if config.storage is None and not (folder / "study.db").is_file():
        raise UserError(f"{folder} has study.json but no study.db: the study never started "
                        f"(start it with `mola-search --resume {folder}`)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = config.study_name or folder.name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"{folder}: the storage has no Optuna study named '{name}'") from None
    except Exception as exc:  # noqa: BLE001 - an unreadable storage is bad input, not a bug
        raise UserError(f"{folder}: cannot open the Optuna storage {storage} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    num_layers = study.user_attrs.get("num_layers") or next(
        (len(t.allocation) for t in trials if t.allocation), 0)
    budget = study.user_attrs.get("budget") or next((sum(t.allocation) for t in trials if t.allocation), None)
    space = _space(config)
    best = _read_json(folder / "best_allocation.json")
    data = StudyData(folder, config, study, int(num_layers), budget, trials, [], best, space)
    data.finalists = _finalists(folder, {t.number: t for t in trials})
    _status(data)
    return data


def require_completed(data: StudyData, minimum: int = MIN_COMPLETED, what: str = "the report") -> None:
    n = len(data.completed())
    if n < minimum:
        raise UserError(f"{data.folder} has {n} completed trial{'s' if n != 1 else ''}; {what} needs at least "
                        f"{minimum} (importance analysis needs at least 10): run or resume the study "
                        f"(mola-search --resume {data.folder})")


def _trial_record(t: Any) -> TrialRecord:
    a = t.user_attrs
    value = t.value if t.state.name == "COMPLETE" and t.value is not None else None

    def ints(key: str) -> tuple[int, ...] | None:
        v = a.get(key)
        return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) and v else None

    dup = a.get("duplicate_of")
    return TrialRecord(
        number=t.number, state=t.state.name, value=float(value) if value is not None else None,
        intermediate={int(k): float(v) for k, v in t.intermediate_values.items() if v == v},
        origin=str(a.get("origin", "")), allocation=ints("allocation"), top_k=ints("top_k"), rank=ints("rank"),
        params=dict(t.params), duplicate_of=int(dup) if dup is not None and dup != "" else None,
        failure=str(a.get("failure", "") or ""), wall_time_s=_float(a.get("wall_time_s")), node=str(a.get("node", "")),
        start=t.datetime_start, complete=t.datetime_complete)


def _finalists(folder: Path, by_number: dict[int, TrialRecord]) -> list[FinalistRecord]:
    root = folder / "finalists"
    if not root.is_dir():
        return []
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _LABEL.match(sub.name)
        if not m:
            continue
        number = int(m.group(1))
        trial = by_number.get(number)
        origin = trial.origin if trial and trial.origin else m.group(2).replace("seed_", "seed:", 1)
        rec = FinalistRecord(sub.name, number, origin, trial.allocation if trial else None, sub)
        for run in sorted(sub.glob("seed*")):
            seed = run.name[4:]
            metrics = _read_json(run / "metrics.json")
            if not seed.isdigit() or not metrics:
                continue
            test = _float((metrics.get("test") or {}).get("accuracy"))
            val = _float((metrics.get("validation") or {}).get("accuracy"))
            if test is None:
                continue
            rec.metrics[int(seed)] = metrics
            rec.test[int(seed)] = test
            if val is not None:
                rec.validation[int(seed)] = val
            if rec.trainable_params is None and metrics.get("trainable_params") is not None:
                rec.trainable_params = int(metrics["trainable_params"])
            if rec.allocation is None and metrics.get("allocation"):
                rec.allocation = tuple(int(x) for x in metrics["allocation"])
        out.append(rec)
    return out


def _status(data: StudyData) -> None:
    """Say what is unfinished: trials still running (or killed), finalists missing, no final outputs."""
    notes = []
    running = [t.number for t in data.trials if t.state == "RUNNING"]
    waiting = [t.number for t in data.trials if t.state == "WAITING"]
    if running:
        notes.append(f"{len(running)} trial(s) ({', '.join(map(str, running[:8]))}{', ...' if len(running) > 8 else ''})"
                     " were still running when this report was made, or the study was interrupted while they ran; "
                     "they are left out")
    if waiting:
        notes.append(f"{len(waiting)} queued trial(s) had not started yet")
    expected = data.config.finalist_seeds
    if expected:
        short = [f for f in data.finalists if len(f.test) < expected]
        if short:
            notes.append(f"{len(short)} finalist(s) have fewer than {expected} finished seeds "
                         f"({', '.join(f'{f.label}: {len(f.test)}' for f in short[:4])}); "
                         "means and tests use the seeds that finished")
        elif not data.finalists and not (data.folder / "summary.md").is_file():
            notes.append("no finalist has finished yet: the result table shows single search trials")
    if not (data.folder / "summary.md").is_file():
        notes.append("the study has not written summary.md yet (still running, or interrupted before the end)")
    data.notes = notes
    data.finished = not notes


def _space(config: Any) -> Any:
    from mola_search.search.space import load_space

    try:
        return load_space(config.space)
    except (UserError, OSError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
