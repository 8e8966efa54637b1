"""Read a study folder into plain records: config, Optuna trials, finalists' run folders, noise floor.

Everything the report, `compare` and the importance analysis need comes from the
Optuna storage (`study.db`), the finalists' `metrics.json` files and `noise.json`,
so a study that is still running, or was interrupted, can be read at any time:
only what is finished is used, and `StudyData.notes` says what is missing.

Scores are those of the study's metric (`StudyConfig.metric`, default
"gold_logprob": the mean log-probability of the gold choice, continuous). A study
written before the metric existed recorded only accuracy: its trial values and
finalist scores are accuracy, and `StudyData.metric` says "accuracy".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mola_search.errors import UserError
from mola_search.search.study import HasOrigin, Origin, StudyFolder
from mola_search.search.study import records
from mola_search.search.study.folder import NOISE_JSON

MIN_COMPLETED = 2  # below this there is nothing to compare, let alone estimate
DEFAULT_METRIC = "gold_logprob"
EXTRA_METRICS = ("f1", "mcc")  # reported where a task defines them (mrpc: f1, cola: mcc)
PAPER_SHAPES = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond", "alphalora")



def per_example_key(metric: str) -> str:
    """The per_example array that averages to `metric` ("correct" for accuracy)."""
    return "correct" if metric == "accuracy" else metric


@dataclass
class TrialRecord(HasOrigin):
    """One Optuna trial, as the report sees it."""

    number: int
    state: str                              # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None                     # final validation score of the study metric (COMPLETE only)
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
    train_seed: int | None = None           # None: a study written before trials recorded it (the study seed)
    pilot: bool = False                     # a noise-floor run (seed shapes x several training seeds)
    metrics: dict[str, float] = field(default_factory=dict)   # validation metrics of the last rung

    @property
    def last_score(self) -> float | None:
        """The final score, or for a pruned trial the score of the last rung it reached."""
        if self.value is not None:
            return self.value
        return self.intermediate[max(self.intermediate)] if self.intermediate else None


@dataclass
class FinalistRecord(HasOrigin):
    """One allocation retrained with several training seeds (`finalists/<label>/seed<train_seed>/`).

    `validation` / `test` hold the study metric (`metric`; "accuracy" for a study
    written before the metric existed) per training seed; accuracy and the task's
    extra metrics are kept beside it. Only runs with a test score count.
    """

    label: str
    number: int
    origin: str
    allocation: tuple[int, ...] | None
    folder: Path
    metric: str = "accuracy"
    validation: dict[int, float] = field(default_factory=dict)      # train seed -> validation <metric>
    test: dict[int, float] = field(default_factory=dict)            # train seed -> test <metric>
    val_accuracy: dict[int, float] = field(default_factory=dict)
    test_accuracy: dict[int, float] = field(default_factory=dict)
    test_extra: dict[str, dict[int, float]] = field(default_factory=dict)   # "f1" | "mcc" -> train seed -> value
    trainable_params: int | None = None
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)        # train seed -> metrics.json
    dirs: dict[int, Path] = field(default_factory=dict)                     # train seed -> run folder

    @property
    def name(self) -> str:
        """Seed name ("rectangle") or "trial <n> (<sampler>)"."""
        return self.seed_name if self.is_seed else f"trial {self.number} ({self.origin})"

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.validation.values()) if self.validation else math.nan

    @property
    def val_accuracy_mean(self) -> float:
        return statistics.fmean(self.val_accuracy.values()) if self.val_accuracy else math.nan

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test.values()) if self.test else math.nan

    def per_example(self, split: str = "test", key: str | None = None) -> dict[int, dict[str, float]]:
        """Train seed -> example id -> per-example value (default: the array that averages to the metric).

        Seeds whose metrics.json has no per_example data (or not that array) are left out,
        so an old-format study gives {}.
        """
        key = key or per_example_key(self.metric)
        out: dict[int, dict[str, float]] = {}
        for seed, m in self.metrics.items():
            pe = (m.get(split) or {}).get("per_example") or {}
            ids, values = pe.get("ids"), pe.get(key)
            if isinstance(ids, list) and isinstance(values, list) and ids and len(ids) == len(values):
                out[seed] = {str(i): float(v) for i, v in zip(ids, values)}
        return out

    def run_folders(self) -> list[Path]:
        return [self.dirs[s] for s in sorted(self.dirs)]

    def adapters(self) -> list[Path]:
        return [StudyFolder.run_adapter(p) for p in self.run_folders() if StudyFolder.is_adapter(StudyFolder.run_adapter(p))]


def selection_key(f: FinalistRecord, on: str = "validation") -> tuple[float, float]:
    """How finalists are ranked: mean <metric> over seeds on `on`, then mean accuracy (NaN ranks last)."""
    def clean(v: float) -> float:
        return v if v == v else -math.inf

    if on == "validation":
        return clean(f.val_mean), clean(f.val_accuracy_mean)
    acc = statistics.fmean(f.test_accuracy.values()) if f.test_accuracy else math.nan
    return clean(f.test_mean), clean(acc)


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
    metric: str = "accuracy"                 # what trial values and finalist scores are
    noise: Any = None                        # mola_search.stats.NoiseFloor, when the pilot ran
    noise_rounds: list[Any] = field(default_factory=list)   # --auto-fidelity history (last = chosen)
    noise_note: str = ""                     # why there is no noise floor, when there is none
    decision: Any = None                     # search.study.decision.Decision, when the study raced (racing.json)

    @property
    def name(self) -> str:
        return self.config.study_name or self.folder.name

    @property
    def seed(self) -> int:
        """The search's training seed (every search trial trains with it)."""
        return int(getattr(self.config, "seed", 0) or 0)

    @property
    def configured_metric(self) -> str:
        return str(getattr(self.config, "metric", DEFAULT_METRIC) or DEFAULT_METRIC)

    def trial_seed(self, t: TrialRecord) -> int:
        return self.seed if t.train_seed is None else t.train_seed

    def completed(self, unique: bool = True, replicates: bool = False) -> list[TrialRecord]:
        """COMPLETE trials with a finite score.

        `unique` drops proposals answered from the duplicate cache; `replicates` keeps the
        noise-floor pilot runs trained with another seed than the study's (left out by
        default, so each allocation of the search appears once).
        """
        return [t for t in self.trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)
                and t.allocation is not None and not (unique and t.duplicate_of is not None)
                and (replicates or self.trial_seed(t) == self.seed)]

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials if t.state == state and t.duplicate_of is None)

    def census(self) -> dict[str, int]:
        """The trial counts every part of the report quotes (`search.study.tables.census`)."""
        from mola_search.search.study.tables import census

        rows = [{"state": t.state, "duplicate_of": t.duplicate_of, "train_seed": self.trial_seed(t),
                 "allocation": t.allocation, "top_k": t.top_k, "rank": t.rank} for t in self.trials]
        return census(rows, self.seed)

    def census_text(self) -> str:
        from mola_search.search.study.tables import census_text

        return census_text(self.census())

    def seed_trials(self) -> dict[str, TrialRecord]:
        """Seed name -> its search trial (trained with the study seed; a pilot replicate only if none is)."""
        out: dict[str, TrialRecord] = {}
        for t in sorted(self.trials, key=lambda t: (self.trial_seed(t) != self.seed, t.number)):
            if t.is_seed and t.allocation is not None and t.seed_name not in out:
                out[t.seed_name] = t
        return out

    def selected_on(self) -> str:
        """"validation" when the finalists recorded validation scores (the honest choice), else "test"."""
        scored = [f for f in self.finalists if f.test]
        return "validation" if scored and all(f.validation for f in scored) else "test"

    def best_finalist(self, seeds_only: bool = False, searched_only: bool = False) -> FinalistRecord | None:
        """The finalist with the highest mean validation score of the metric (ties: validation accuracy).

        Test scores are never looked at, unless no finalist has a validation score
        (`selected_on()` then says "test"). `seeds_only` / `searched_only` restrict the choice.
        """
        scored = [f for f in self.finalists if f.test and not (seeds_only and not f.is_seed)
                  and not (searched_only and f.is_seed)]
        if not scored:
            return None
        if self.decision is not None and not (seeds_only or searched_only):  # a race decided: its pick
            chosen = next((f for f in scored if f.label == self.decision.chosen), None)
            if chosen is not None:
                return chosen
        on = self.selected_on()
        return max(scored, key=lambda f: (*selection_key(f, on), -f.number))

    def exported_finalist(self) -> FinalistRecord | None:
        """The finalist best_allocation.json names (None without one, or when it names no finalist)."""
        number = (self.best or {}).get("trial")
        return next((f for f in self.finalists if f.test and f.number == number), None) if number is not None else None

    def finalist_for_seed(self, seed_name: str) -> FinalistRecord | None:
        for f in self.finalists:
            if f.origin == Origin.seed(seed_name).text and f.test:
                return f
        return None

    def noise_line(self) -> str:
        """The noise-floor sentence (noise.json), or why there is none."""
        return self.noise.line() if self.noise is not None else self.noise_note


def load_study(folder: str | Path) -> StudyData:
    """Read a study folder; a folder that is not a study, or has no storage, is a UserError."""
    from mola_search.search.config import StudyConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a study folder written by `mola-search`, e.g. runs/<study>")
    handle = StudyFolder(folder)
    config = StudyConfig.load(folder)  # "not a mola-search study folder" when there are no settings
    study = handle.open_optuna(config.storage, config.study_name)
    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    num_layers = study.user_attrs.get(records.NUM_LAYERS) or next(
        (len(t.allocation) for t in trials if t.allocation), 0)
    budget = study.user_attrs.get(records.BUDGET) or next((sum(t.allocation) for t in trials if t.allocation), None)
    space = _space(config)
    data = StudyData(folder, config, study, int(num_layers), budget, trials, [], handle.read_best(), space)
    runs = handle.finalist_runs()
    data.metric = _metric(data, runs)
    data.finalists = _finalists(handle, runs, {t.number: t for t in trials}, data.metric)
    data.noise, data.noise_rounds, data.noise_note = _noise(handle)
    data.decision = _decision(handle)
    _status(data)
    return data


def require_completed(data: StudyData, minimum: int = MIN_COMPLETED, what: str = "the report") -> None:
    n = len(data.completed())
    if n < minimum:
        raise UserError(f"{data.folder} has {n} completed trial{'s' if n != 1 else ''}; {what} needs at least "
                        f"{minimum} (importance analysis needs at least 10): run or resume the study "
                        f"(`mola-search --resume {data.folder}`)")


def _trial_record(t: Any) -> TrialRecord:
    a = t.user_attrs
    value = t.value if t.state.name == "COMPLETE" and t.value is not None else None

    def ints(key: str) -> tuple[int, ...] | None:
        v = a.get(key)
        return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) and v else None

    dup = a.get(records.DUPLICATE_OF)
    metrics = a.get(records.METRICS)
    seed = a.get(records.TRAIN_SEED)
    return TrialRecord(
        number=t.number, state=t.state.name, value=float(value) if value is not None else None,
        intermediate={int(k): float(v) for k, v in t.intermediate_values.items() if v == v},
        origin=str(a.get(records.ORIGIN, "")), allocation=ints(records.ALLOCATION), top_k=ints(records.TOP_K),
        rank=ints(records.RANK),
        params=dict(t.params), duplicate_of=int(dup) if dup is not None and dup != "" else None,
        failure=str(a.get(records.FAILURE, "") or ""), wall_time_s=_float(a.get(records.WALL_TIME)),
        node=str(a.get(records.NODE, "")),
        start=t.datetime_start, complete=t.datetime_complete,
        train_seed=int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
        pilot=bool(a.get(records.PILOT, False)),
        metrics={k: v for k, v in ((k, _float(v)) for k, v in metrics.items()) if v is not None}
        if isinstance(metrics, dict) else {})


def _metric(data: StudyData, runs: list) -> str:
    """The metric the study's scores carry: the configured one, or accuracy for an old-format study.

    A study is new-format when its finalists recorded the configured metric, or its
    trials recorded their metrics / training seed; an old one recorded accuracy only.
    """
    configured = data.configured_metric
    finals = [m for _, rs in runs for _, _, m in rs if (m.get("test") or {}).get("accuracy") is not None
              or (m.get("test") or {}).get(configured) is not None]
    if finals:
        return configured if any((m.get("test") or {}).get(configured) is not None for m in finals) else "accuracy"
    new = any(t.metrics or t.train_seed is not None for t in data.trials)
    old = any(t.state == "COMPLETE" for t in data.trials)
    return configured if new or not old else "accuracy"


def _finalists(handle: StudyFolder, runs: list, by_number: dict[int, TrialRecord],
               metric: str) -> list[FinalistRecord]:
    out = []
    for label, seeds in runs:
        number, origin = handle.parse_finalist_label(label)
        trial = by_number.get(number)
        origin = trial.origin if trial and trial.origin else origin
        rec = FinalistRecord(label, number, origin, trial.allocation if trial else None, handle.finalist_dir(label),
                             metric)
        for seed, run, metrics in seeds:
            test, val = metrics.get("test") or {}, metrics.get("validation") or {}
            score = _float(test.get(metric))
            if score is None:
                continue  # unfinished, or a run that did not record the study's metric
            rec.metrics[seed], rec.dirs[seed], rec.test[seed] = metrics, run, score
            for target, split, key in ((rec.validation, val, metric), (rec.val_accuracy, val, "accuracy"),
                                       (rec.test_accuracy, test, "accuracy")):
                v = _float(split.get(key))
                if v is not None:
                    target[seed] = v
            for key in EXTRA_METRICS:
                v = _float(test.get(key))
                if v is not None:
                    rec.test_extra.setdefault(key, {})[seed] = v
            if rec.trainable_params is None and metrics.get("trainable_params") is not None:
                rec.trainable_params = int(metrics["trainable_params"])
            if rec.allocation is None and metrics.get("allocation"):
                rec.allocation = tuple(int(x) for x in metrics["allocation"])
        out.append(rec)
    return out


def _noise(handle: StudyFolder) -> tuple[Any, list[Any], str]:
    """The pilot's noise floor: (chosen estimate, auto-fidelity rounds, why there is none)."""
    if not handle.has_noise():
        return None, [], (f"no noise floor was measured (the study has no {NOISE_JSON}): differences between "
                          "allocations cannot be told apart from seed-to-seed variation")
    try:
        noise, rounds = handle.read_noise(), handle.read_noise_rounds()
    except UserError as exc:
        return None, [], f"no noise floor: {exc}"
    return noise, rounds, ""


def _decision(handle: StudyFolder) -> Any:
    """The study's decision (racing.json), or None for a study made before races or still before its final stage."""
    from mola_search.search.study.decision import Decision

    raw = handle.read_racing()
    if not raw:
        return None
    try:
        return Decision.from_dict(raw)
    except (TypeError, ValueError, KeyError):
        return None


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
        elif not data.finalists and not StudyFolder(data.folder).has_summary():
            notes.append("no finalist has finished yet: the result table shows single search trials")
    if not StudyFolder(data.folder).has_summary():
        notes.append("the study has not written summary.md yet (still running, or interrupted before the end)")
    data.notes = notes
    data.finished = not notes


def _space(config: Any) -> Any:
    from mola_search.search.space import load_space

    try:
        return load_space(config.space)
    except (UserError, OSError):
        return None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
