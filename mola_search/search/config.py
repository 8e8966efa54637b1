"""What a study is: task, model, budget, space, sampler, resources, fidelity, finalists.

Stored as `study.json` in the study folder, so `mola-search --resume <folder>`
continues with exactly the settings it started with.  Presets are plain dicts of
these fields, sized for the hardware they name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mola_search.errors import UserError
from mola_search.mola.config import canonical_balance_loss
from mola_search.search.samplers import SAMPLERS
from mola_search.trial.settings import TrialSettings
from mola_search.trial.synthetic import SYNTHETIC_NAMES, SYNTHETIC_PREFIX

PRUNERS = ("asha", "wilcoxon", "none")
# Must match mola_search.train.evaluate.METRICS (not imported: this module stays free of torch).
METRICS = ("gold_logprob", "margin", "accuracy", "f1", "mcc")
# Finalists train with seeds FINALIST_SEED_BASE + i: never a seed a search or pilot trial used, so no
# finalist run can reproduce the run that selected it.
FINALIST_SEED_BASE = 1000
PILOT_SHAPES = ("triangle", "inverted_triangle", "rectangle")
# The names of mola_search.search.strategies.STRATEGIES and .executors.EXECUTORS (tests/test_search.py checks
# they agree): listed here so that validating a config imports neither.
STRATEGIES = ("standalone", "one-shot")
EXECUTORS = ("ray", "local")
FINAL_STAGES = ("racing", "finalists")
# The smallest difference worth telling apart (`min_effect`), per metric, in the metric's own units. For
# gold_logprob: a calibrated classifier at accuracy q has mean gold log-prob -H(q), so one accuracy point near
# q = 0.68 (MRPC's range here) moves it by |ln((1 - q) / q)| / 100 = 0.0075; 0.01 is about 1.3 points. The
# docs (strategies.md) give the measured relation and how to choose another value.
MIN_EFFECTS = {"gold_logprob": 0.01, "margin": 0.02, "accuracy": 0.01, "f1": 0.01, "mcc": 0.02}
# The race's budget: at the noise measured on MRPC (docs/strategies.md, benchmarks/decision_benchmark.py) 40
# fine-tunes over four contenders declared the true best at 2 delta in 81% of 100 races (32.2 spent on average).
DEFAULT_FINALIST_RUNS = 40
# Minutes a Ray study waits while no node can run a trial (a node lost, no free CPUs or GPUs) before it ends with
# its finished trials kept: long enough for a preempted or restarted node to come back, short enough that a batch
# job does not sit out its allocation on an empty cluster (docs/gpus-and-clusters.md).
DEFAULT_RESOURCE_TIMEOUT = 30.0

PRESETS: dict[str, dict[str, Any]] = {
    # A whole study (the pilot's 9 runs and 5 more trials, then 4 finalists x 2 seeds = 22 fine-tunes) in about
    # 10 min on 2 CPU cores (10.2 min measured at e02908f, docs/strategies.md). Enough to show the pipeline and
    # its noise floor, not to separate allocations on MRPC; give real searches more data or a GPU.
    "cpu-quick": {
        "model": "smollm2-135m-instruct", "trials": 14, "max_concurrent": None, "cpus_per_trial": 1,
        "finalist_top_n": 1, "finalist_seeds": 2, "finalist_eval_examples": 200, "max_finalist_runs": 16,
        "train": {"batch_size": 8, "micro_batch_size": 8, "cutoff_len": 128, "lr": 1e-3},
        "fidelity": {"max_train_examples": 64, "max_eval_examples": 200, "rungs": [0.5, 1.0]},
        "seed_names": ["triangle", "inverted_triangle", "hourglass", "rectangle", "diamond", "alphalora"],
        "finalist_shapes": ["triangle", "inverted_triangle", "rectangle"],
    },
    # Longer than cpu-quick: trials of 16 steps ranked on the whole validation split, finalists trained 4x
    # longer. Measured on 2 cores / 24 GB (docs/strategies.md): the pilot and search take ~30 min on RTE but 16 steps do not
    # learn RTE. Batches of 16 run as two micro-batches of 8: a finalist process then peaks at 2.5 GiB instead of
    # 3.7 GiB for 7 % more CPU (docs/performance.md, "Memory over a whole run"); --micro-batch-size 16 trades back.
    "cpu-standard": {
        "model": "smollm2-135m-instruct", "trials": 14, "max_concurrent": None, "cpus_per_trial": 1,
        "finalist_top_n": 1, "finalist_seeds": 3, "finalist_train_examples": 1024, "max_finalist_runs": 40,
        "train": {"batch_size": 16, "micro_batch_size": 8, "cutoff_len": 128, "lr": 1e-3},
        "fidelity": {"max_train_examples": 256, "max_eval_examples": None, "rungs": [0.5, 1.0]},
        "seed_names": ["triangle", "inverted_triangle", "hourglass", "rectangle", "diamond", "alphalora"],
        "finalist_shapes": ["triangle", "inverted_triangle", "rectangle"],
        "time_budget": 120.0,
    },
    # The paper's setting (LLaMA-2-7B, 160 experts, cutoff 256, batch 128, lr 3e-4): for GPU boxes.
    "paper": {
        "model": "meta-llama/Llama-2-7b-hf", "budget": 160, "trials": 40, "gpus_per_trial": 1.0,
        "cpus_per_trial": 4, "max_concurrent": None, "finalist_top_n": 3, "finalist_seeds": 3, "max_finalist_runs": 48,
        "train": {"batch_size": 128, "micro_batch_size": 8, "cutoff_len": 256, "lr": 3e-4, "epochs": 1.0},
        "fidelity": {"max_train_examples": 2000, "max_eval_examples": 500, "rungs": [0.25, 0.5, 1.0]},
    },
}


@dataclass(frozen=True)
class StudyConfig:
    """One study. Every field is a `mola-search` flag; `train` holds TrainConfig overrides."""

    task: str = "mrpc"
    model: str = "smollm2-135m-instruct"
    budget: int | None = None                 # default 5 x layers
    space: str = "blocks"                     # builtin name or YAML path
    objective: str = "mola"                   # "mola", "python:<module>:<function>" or "synthetic[:name]"
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"                      # local executor: auto | cpu | cuda | cuda:N (Ray: what Ray assigns)
    storage: str | None = None                # default: sqlite file in the study folder
    study_name: str | None = None
    out: str | None = None
    executor: str = "ray"                     # "ray" or "local" (in-process, sequential)
    address: str | None = None                # Ray cluster address ("auto" = running cluster)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    resource_timeout: float | None = DEFAULT_RESOURCE_TIMEOUT  # minutes no trial can be placed before the study
                                              # ends cleanly (Ray; 0 or None: wait forever)
    scheduler: str = "asha"                   # the pruner: "asha", "wilcoxon" or "none" (--pruner)
    asha_reduction_factor: float = 2.0
    seed_names: tuple[str, ...] = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond", "alphalora")
    finalist_top_n: int = 2
    finalist_seeds: int = 3
    finalist_train_examples: int | None = None   # default: the space's fidelity
    finalist_eval_examples: int | None = None
    finalist_shapes: tuple[str, ...] | None = None  # seeds retrained as finalists (None = every seed that trained)
    final_stage: str = "racing"               # "racing" (rounds until decided) or "finalists" (a fixed block)
    min_effect: float | None = None           # delta of the race, in the metric's units (None: MIN_EFFECTS)
    max_finalist_runs: int | None = None      # the race's budget of fine-tunes (None: DEFAULT_FINALIST_RUNS)
    race_min_seeds: int = 2                   # the race's first look comes after this many seeds
    race_level: float = 0.05                  # family-wise error rate of the race's claims
    metric: str = "gold_logprob"              # what Optuna optimises (validation split)
    pilot: bool = True                        # noise floor first: PILOT_SHAPES x pilot_seeds at trial fidelity
    pilot_seeds: int = 3
    auto_fidelity: bool = False               # double the trial fidelity until allocations separate
    noise_threshold: float = 0.5              # allocation share of variance that --auto-fidelity aims for
    max_doublings: int = 4
    time_budget: float | None = None          # minutes for the whole study (--auto-fidelity stays within it)
    train: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)   # overrides of the space's fidelity
    balance_loss: str = "per-module"          # "per-module" or "official" (GCYZSL/MoLA's; MoLAConfig.balance_loss)
    aux_loss_coef: float | None = None        # None: the balance loss's own coefficient (0.01, official 0.001)
    preset: str | None = None
    # --strategy one-shot: a supernet trained once, allocations scored by masking (search.supernet)
    strategy: str = "standalone"
    supernet_factor: float = 4.0              # supernet optimizer steps = factor x one trial's
    oneshot_trials: int = 200                 # distinct allocations scored one-shot
    oneshot_eval_examples: int | None = 256   # validation examples per one-shot score (None = all)
    oneshot_checks: int = 6                   # one-shot-ranked allocations also trained standalone (for tau)

    def __post_init__(self) -> None:
        """Validate the settings as data: each check raises a one-line UserError naming the parameter."""
        for check in (self._check_choices, self._check_pilot, self._check_counts, self._check_final,
                      self._check_oneshot, self._check_resources):
            check()
        object.__setattr__(self, "balance_loss", canonical_balance_loss(self.balance_loss))

    def _check_choices(self) -> None:
        objective = str(self.objective).strip().lower()
        prefix, _, name = objective.partition(":")
        python = prefix == "python" and all(name.partition(":")[::2])
        if objective != "mola" and not python and not (prefix == SYNTHETIC_PREFIX
                                                       and (not name or name in SYNTHETIC_NAMES)):
            # checked up front: an unknown name would otherwise train the real model, or fail every trial
            raise UserError(f"unknown objective '{self.objective}': use mola, python:<module>:<function>, "
                            f"{SYNTHETIC_PREFIX} or " + ", ".join(f"{SYNTHETIC_PREFIX}:{n}" for n in SYNTHETIC_NAMES))
        for value, choices, what in ((self.sampler, SAMPLERS, "sampler"), (self.executor, EXECUTORS, "executor"),
                                     (self.scheduler, PRUNERS, "pruner"), (self.metric, METRICS, "metric"),
                                     (self.strategy, STRATEGIES, "strategy"),
                                     (self.final_stage, FINAL_STAGES, "final stage")):
            if value not in choices:
                raise UserError(f"unknown {what} '{value}': use one of {', '.join(choices)}")
        if self.scheduler == "wilcoxon" and self.metric in ("f1", "mcc"):
            raise UserError(f"`scheduler` wilcoxon pairs per-example scores, and {self.metric} has none: "
                            "use `metric` gold_logprob|margin|accuracy or `scheduler` asha|none")

    def _check_pilot(self) -> None:
        if not 0 <= self.pilot_seeds < FINALIST_SEED_BASE:
            raise UserError(f"`pilot_seeds` is {self.pilot_seeds}: use 2..{FINALIST_SEED_BASE - 1}")
        if self.pilot and self.trials < len(PILOT_SHAPES) * self.pilot_seeds:
            raise UserError(f"`trials` {self.trials} is fewer than the pilot's {len(PILOT_SHAPES) * self.pilot_seeds} "
                            f"runs ({len(PILOT_SHAPES)} shapes x {self.pilot_seeds} seeds, which count as trials): "
                            "raise `trials` or turn the pilot off (`pilot=False`)")
        if self.pilot and self.pilot_seeds < 2:
            raise UserError(f"`pilot_seeds` is {self.pilot_seeds}: a noise floor needs at least 2 seeds "
                            "(or turn the pilot off: `pilot=False`)")
        if not 0 < self.noise_threshold < 1:
            raise UserError(f"`noise_threshold` is {self.noise_threshold}: use a fraction in (0, 1)")
        if self.max_doublings < 0:
            raise UserError(f"`max_doublings` is {self.max_doublings}: use an integer >= 0")
        if self.auto_fidelity and not self.pilot:
            raise UserError("`auto_fidelity` chooses the fidelity from the pilot's noise floor: drop `pilot=False`")

    def _check_counts(self) -> None:
        if self.time_budget is not None and not self.time_budget > 0:
            raise UserError(f"`time_budget` is {self.time_budget}: use minutes > 0")
        if self.trials < 1:
            raise UserError(f"`trials` must be at least 1, got {self.trials}")
        if self.finalist_seeds < 0 or self.finalist_top_n < 0:
            raise UserError("finalist counts must be >= 0")
        if self.aux_loss_coef is not None and not self.aux_loss_coef >= 0:
            raise UserError(f"`aux_loss_coef` is {self.aux_loss_coef}: use a weight >= 0 (or leave it out: the "
                            "balance loss's own)")

    def _check_final(self) -> None:
        if self.min_effect is not None and not self.min_effect > 0:
            raise UserError(f"`min_effect` is {self.min_effect}: use a difference > 0 in the metric's units "
                            f"(default for {self.metric}: {MIN_EFFECTS.get(self.metric)})")
        if self.max_finalist_runs is not None and self.max_finalist_runs < 1:
            raise UserError(f"`max_finalist_runs` is {self.max_finalist_runs}: use a number of fine-tunes >= 1")
        if self.race_min_seeds < 2:
            raise UserError(f"`race_min_seeds` is {self.race_min_seeds}: a look needs at least 2 seeds")
        if not 0 < self.race_level < 1:
            raise UserError(f"`race_level` is {self.race_level}: use a probability in (0, 1), e.g. 0.05")

    def _check_oneshot(self) -> None:
        if self.strategy != "one-shot":
            return
        if str(self.objective).strip().lower() != "mola":
            raise UserError(f"`strategy` one-shot trains a MoLA supernet, so it needs `objective` mola "
                            f"(got {self.objective!r})")
        if not self.supernet_factor > 0:
            raise UserError(f"`supernet_factor` is {self.supernet_factor}: use a number > 0")
        if self.oneshot_trials < 1 or self.oneshot_checks < 0:
            raise UserError(f"`oneshot_trials` {self.oneshot_trials} / `oneshot_checks` {self.oneshot_checks}: "
                            "use >= 1 allocations scored and >= 0 checks")
        if self.oneshot_eval_examples is not None and self.oneshot_eval_examples < 1:
            raise UserError(f"`oneshot_eval_examples` is {self.oneshot_eval_examples}: use >= 1 (or None: all)")

    def _check_resources(self) -> None:
        if self.resource_timeout is not None and not self.resource_timeout >= 0:
            raise UserError(f"`resource_timeout` is {self.resource_timeout}: use minutes >= 0 (0: wait for "
                            "resources forever)")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise UserError("`cpus_per_trial` must be > 0 and `gpus_per_trial` >= 0")
        if self.gpus_per_trial > 1:
            # A trial trains one model on one device (`cuda` of what Ray assigns it): a second GPU would sit idle.
            raise UserError(f"`gpus_per_trial` {self.gpus_per_trial:g}: a trial trains on one GPU, so more would sit "
                            "idle; use 1 (a whole GPU) or a fraction to share one (e.g. 0.5), and run more trials at "
                            "once instead")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"unknown study settings {unknown}; known: {sorted(known)}")
        raw = dict(raw)
        if "seed_names" in raw:
            raw["seed_names"] = tuple(raw["seed_names"])
        if raw.get("finalist_shapes") is not None:
            raw["finalist_shapes"] = tuple(raw["finalist_shapes"])
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seed_names"] = list(self.seed_names)
        if self.finalist_shapes is not None:
            d["finalist_shapes"] = list(self.finalist_shapes)
        return d

    def final_runs(self) -> int:
        """Fine-tunes the final stage may spend (a forecast for `time_budget`)."""
        if self.final_stage == "racing":
            return self.finalist_budget()
        shapes = len(self.finalist_shapes) if self.finalist_shapes is not None else len(self.seed_names)
        return (shapes + self.finalist_top_n) * self.finalist_seeds

    def finalist_budget(self) -> int:
        """The race's budget of fine-tunes."""
        return self.max_finalist_runs if self.max_finalist_runs is not None else DEFAULT_FINALIST_RUNS

    def effect_size(self) -> float:
        """delta: the smallest difference of the metric the race tries to tell apart (`min_effect`)."""
        return self.min_effect if self.min_effect is not None else MIN_EFFECTS.get(self.metric, 0.01)

    def finalist_train_seeds(self) -> list[int]:
        """The finalists' training seeds: disjoint from every search and pilot seed."""
        return [FINALIST_SEED_BASE + self.seed + i for i in range(self.finalist_seeds)]

    def pilot_train_seeds(self) -> list[int]:
        """The pilot's seeds; the first is the study seed every search trial trains with."""
        return [self.seed + i for i in range(self.pilot_seeds)]

    def trial_settings(self) -> TrialSettings:
        """What each of this study's trials needs to know of it."""
        return TrialSettings(task=self.task, model=self.model, objective=self.objective, metric=self.metric,
                             dtype=self.dtype, device=self.device, data_dir=self.data_dir, train=dict(self.train),
                             balance_loss=self.balance_loss, aux_loss_coef=self.aux_loss_coef,
                             cpus=self.cpus_per_trial, gpus=self.gpus_per_trial,
                             final_train_examples=self.finalist_train_examples,
                             final_eval_examples=self.finalist_eval_examples)

    def save(self, folder: str | Path) -> None:
        """Write study.json into `folder` (`StudyFolder.write_config`)."""
        from mola_search.search.study.folder import StudyFolder

        StudyFolder(folder).write_config(self.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> "StudyConfig":
        """The settings a study in `folder` started with; a folder that is not a study is a one-line UserError."""
        from mola_search.search.study.folder import StudyFolder

        return cls.from_dict(StudyFolder(folder).read_config())


def apply_preset(name: str | None, overrides: dict[str, Any]) -> StudyConfig:
    """Preset values first, then the user's flags (nested train/fidelity dicts are merged)."""
    base: dict[str, Any] = {}
    if name:
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
        base = json.loads(json.dumps(PRESETS[name]))
        base["preset"] = name
    merged = {**base, **{k: v for k, v in overrides.items() if k not in ("train", "fidelity")}}
    for key in ("train", "fidelity"):
        merged[key] = {**base.get(key, {}), **overrides.get(key, {})}
    return StudyConfig.from_dict(merged)


def default_preset() -> str:
    """cpu-quick where no GPU is visible (the common laptop/CI case), else none."""
    try:
        import torch

        return "cpu-quick" if not torch.cuda.is_available() else ""
    except ImportError:  # pragma: no cover
        return "cpu-quick"


def with_out(config: StudyConfig, out: str) -> StudyConfig:
    return replace(config, out=out)


def pin_paths(config: StudyConfig) -> StudyConfig:
    """Relative paths made absolute, in the driver, before any trial sees them.

    Ray Tune runs every trial in a working directory of its own (and a cluster node in
    another file system), where `../shared/data` or `custom:task.yaml` names nothing.
    `$MOLA_DATA_DIR` is folded into `data_dir` here too, so study.json records where the
    data came from and `--resume` reads the same files.
    """
    data_dir = config.data_dir or os.environ.get("MOLA_DATA_DIR", "").strip() or None
    task = config.task
    for prefix in ("custom:", "instruct:"):
        if task.startswith(prefix):
            task = prefix + _absolute_if_exists(task[len(prefix):].strip())
    return replace(config, task=task, model=_absolute_if_exists(config.model) if config.model else config.model,
                   data_dir=str(Path(data_dir).expanduser().resolve()) if data_dir else None)


def _absolute_if_exists(ref: str) -> str:
    """A path that exists here, made absolute; anything else (a Hub id, an alias) unchanged."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref
