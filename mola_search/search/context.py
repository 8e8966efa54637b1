"""The study handle every phase receives (`StudyContext`): settings, folder, space, Optuna driver, executor
and progress, in one object instead of five loose arguments.

Made by `open_study` once every check has passed (bad input leaves no folder behind); the pilot sets
`fidelity`; strategies and final stages read and add to it. Call order of a study (search.runner):
`open_study` -> `pilot.run_pilot` -> strategy `queue` -> `search` -> strategy `contenders` -> final stage
`run` -> strategy `conclude` -> outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mola_search.errors import UserError
from mola_search.search.config import StudyConfig, pin_paths
from mola_search.search.executors import EXECUTORS, Executor, make_executor
from mola_search.search.progress import Progress
from mola_search.search.seeds import Seed, all_seeds
from mola_search.search.space import SearchSpace, load_space
from mola_search.search.study import StudyDriver, StudyFolder
from mola_search.search.study.records import PEAK_RSS
from mola_search.trial import Fidelity
from mola_search.trial.objective import import_objective, is_python_objective, objective_name, ship_by_value
from mola_search.trial.synthetic import is_synthetic


@dataclass
class StudyContext:
    config: StudyConfig
    folder: StudyFolder
    space: SearchSpace
    driver: StudyDriver
    executor: Executor
    progress: Progress
    num_layers: int
    budget: int
    seeds: list[Seed]
    objective: Callable[..., Any] | None = None
    started: float = field(default_factory=time.time)
    fidelity: Fidelity | None = None     # the trial fidelity the pilot chose (the space's without a pilot)
    trial_mb_estimate: float = 4096.0    # one trial's peak memory before any trial measured its own

    def message(self, text: str) -> None:
        self.progress.message(text)

    def concurrency(self, phase: str, more_mb: Sequence[float] = ()) -> int:
        """Trials at once for the next phase: `max_concurrent`, or what the executor's CPUs, GPUs and memory
        hold at the largest peak memory this study's trials reached (+15%), or the estimate before any ran."""
        measured = [float(t.user_attrs[PEAK_RSS]) for t in self.driver.study.get_trials(deepcopy=False)
                    if t.user_attrs.get(PEAK_RSS)] + [m for m in more_mb if m]
        trial_mb = 1.15 * max(measured) if measured else self.trial_mb_estimate
        n, line = self.executor.concurrency(trial_mb, measured=bool(measured))
        if line:
            self.message(f"{phase}: {line}")
        self.progress.concurrency = n  # the search's ETA and time_budget's forecast divide by it
        return n

    def train_size(self) -> int | None:
        """Training examples the task has (None for an objective that owns its data, or a synthetic one)."""
        if is_synthetic(self.config.objective) or self.objective is not None:
            return None
        from mola_search.trial.mola import task_data

        return len(task_data(self.config.task, self.config.data_dir).splits["train"])


def open_study(config: StudyConfig, folder: str | Path, *, resume: bool = False,
               objective: Callable[..., Any] | None = None) -> StudyContext:
    """Check everything that can be checked before a trial runs, then create the folder and the storage.

    `objective(trial)` replaces the built-in MoLA fine-tune (trial.objective says what it gets and returns);
    the study records its name, and a ``python:<module>:<name>`` objective is imported when none is passed
    (so a resume finds it again)."""
    folder = StudyFolder(folder).resolved()  # finalists write their run folders from Ray trials' own directories
    config = pin_paths(config)
    if objective is not None:
        config = replace(config, objective=objective_name(objective))
    elif is_python_objective(config.objective):
        objective = import_objective(config.objective)
    if objective is not None and config.executor == "ray":
        ship_by_value(objective)
    if config.strategy == "one-shot" and config.scheduler != "none" and not resume:
        config = replace(config, scheduler="none")  # a pruned check has no score to compare with its one-shot one
    space = resolve_space(config)
    _check_task_data(config)
    _check_storage(config)
    EXECUTORS[config.executor].check(config)
    num_layers, budget, seeds, trial_mb = inspect_model(config, space)  # an infeasible budget is refused here
    folder.create()  # only once every check passed: bad input leaves no folder
    progress = Progress(config.trials, config.max_concurrent or 1)
    driver = StudyDriver(config, folder, space, num_layers, budget, None, progress, objective=objective,
                         trial_mb=trial_mb, live_csv=True)
    if not resume:  # written once the storage exists: study.json marks a study others may open
        config.save(folder.root)
    executor = make_executor(config, folder, num_layers, objective)
    executor.say = progress.message
    return StudyContext(config, folder, space, driver, executor, progress, num_layers, budget, seeds, objective,
                        trial_mb_estimate=trial_mb)


def finished_search_fidelity(study: StudyContext) -> Fidelity:
    """The trial fidelity a study's search ran at; a study whose pilot never finished has not searched yet."""
    from mola_search.search.study.records import FIDELITY, PILOT_DONE

    attrs = study.driver.study.user_attrs
    if study.config.pilot and not attrs.get(PILOT_DONE):
        raise UserError(f"{study.folder.root} has not finished its pilot and search yet: continue it first "
                        f"(`mola-search --resume {study.folder.root}`)")
    return Fidelity.from_dict(attrs[FIDELITY]) if attrs.get(FIDELITY) else study.space.fidelity


def effective_fidelity(folder: str | Path, config: StudyConfig) -> Fidelity:
    """The trial fidelity a study searched at, read from its storage (the pilot's choice when it ran), else the
    space's with the study's overrides: what an export reproduces."""
    from mola_search.search.study.records import FIDELITY

    handle = StudyFolder(folder)
    attrs = handle.open_optuna(config.storage, config.study_name).user_attrs if handle.has_storage() or \
        config.storage else {}
    return Fidelity.from_dict(attrs[FIDELITY]) if attrs.get(FIDELITY) else resolve_space(config).fidelity


def raced_contenders(study: StudyContext) -> list[Any]:
    """The allocations a study already raced (racing.json's contenders, failed ones included) or retrained at
    finalist fidelity (its finalists/ folders: a study made before races), in label order, as contenders: a race
    continues with them rather than with a new choice."""
    from mola_search.search.study import Contender
    from mola_search.search.study.records import trial_spec

    trials = {t.number: t for t in study.driver.study.get_trials(deepcopy=False)}
    racing = study.folder.read_racing() or {}
    labels = {str(c.get("label")) for c in racing.get("contenders") or [] if isinstance(c, dict)}
    labels |= {label for label, _ in study.folder.finalist_runs()}
    out = []
    for label in sorted(labels):
        parsed = study.folder.parse_finalist_label(label)
        if parsed is None or parsed[0] not in trials:
            continue
        number, origin = parsed
        out.append(Contender(number, origin, replace(trial_spec(trials[number]), source=origin)))
    return out


def resolve_space(config: StudyConfig) -> SearchSpace:
    """The study's search space, with the study's fidelity overrides applied."""
    space = load_space(config.space)
    if config.fidelity:
        space = replace(space, fidelity=Fidelity.from_dict({**space.fidelity.to_dict(), **config.fidelity}))
    return space


def inspect_model(config: StudyConfig, space: SearchSpace) -> tuple[int, int, list[Seed], float]:
    """Depth, budget, seeds and an estimate of one trial's peak memory (MB); the model is loaded once here
    (also converting/caching it for the workers)."""
    from mola_search.models import cache_dir, decoder_layers, load_base_model

    want_alpha = "alphalora" in config.seed_names
    model, _ = load_base_model(config.model, dtype="fp32" if want_alpha else config.dtype,
                               device="cpu")  # the driver only reads depth and weight spectra: GPUs stay free
    num_layers = len(decoder_layers(model))
    budget = config.budget if config.budget is not None else 5 * num_layers
    space.check_budget(num_layers, budget)
    seeds = all_seeds(model if want_alpha else None, num_layers, budget, space.min_experts, space.max_experts,
                      top_k=space.top_k, rank=space.rank,
                      alpha_cache=cache_dir() / "alphas" / f"{_slug(config.model)}.json" if want_alpha else None)
    unknown = sorted(set(config.seed_names) - {s.name for s in seeds})
    if unknown:
        raise UserError(f"unknown seed names {unknown}: choose from {[s.name for s in seeds]}")
    # Before any trial has run: 1.2 GB (interpreter, torch, tokenizer, data) + 8x the base weights in the trial's
    # dtype (weights, activations kept for backward, adapter state). Measured on SmolLM2-135M (0.27 GB in bf16),
    # cpu-quick settings: 3.1 GB. Once trials finish, their measured peaks replace it (StudyContext.concurrency).
    weight_bytes = sum(p.numel() for p in model.parameters()) * (2 if config.dtype in ("auto", "bf16", "fp16") else 4)
    estimate_mb = 1200 + 8 * weight_bytes / 2**20
    return num_layers, budget, [s for s in seeds if s.name in config.seed_names], estimate_mb


def _check_task_data(config: StudyConfig) -> None:
    """Load the task once in the driver: missing data is one error now, not a failure in every trial.
    With a synthetic objective nothing is loaded, but the task must still be one that exists; a user
    objective owns its data (config.task only names it)."""
    if is_python_objective(config.objective):
        return
    if not is_synthetic(config.objective):
        from mola_search.trial.mola import task_data

        task_data(config.task, config.data_dir)
        return
    from mola_search.tasks import TASKS

    if config.task.lower() not in TASKS and not config.task.startswith(("custom:", "instruct:")):
        raise UserError(f"unknown task {config.task!r}; valid: {', '.join(TASKS)}, custom:<task.yaml>, "
                        "instruct:<path>")


def _check_storage(config: StudyConfig) -> None:
    """A `storage` URL SQLAlchemy cannot use is one line now, not a traceback after the folder exists."""
    if not config.storage:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        create_engine(config.storage).dispose()  # parses the URL and loads the dialect; connects to nothing
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"`storage` {config.storage!r} is not a usable database URL ({first}); use e.g. "
                        "sqlite:////abs/path/study.db or postgresql://user@host/db") from None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
