"""One search trial: an allocation in, validation scores at each rung out.

The same function serves Ray Tune workers and the in-process executor; only the
`report` callback differs (tune.report + ASHA vs Optuna's pruner).  Anything a
trial raises becomes a failure *reason*, never a crashed study.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mola_search.allocation import AllocationSpec
from mola_search.search.config import StudyConfig
from mola_search.search.objective import Report, TrialPruned, run_objective
from mola_search.search.space import Fidelity
from mola_search.search.synthetic import is_synthetic, make_synthetic


FAULTS_ENV = "MOLA_SEARCH_FAULTS"  # test hook, e.g. "raise@3,nan@5,oom@7,kill@9" (trial numbers)


@dataclass(frozen=True)
class TrialRequest:
    number: int
    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    rank: tuple[int, ...]
    origin: str                        # "seed:<name>" or the sampler's name
    train_seed: int = 0
    min_experts: int = 1               # the space's bounds (the synthetic objective is defined over them)
    max_experts: int | None = None
    final: bool = False                # finalists: full fidelity, test split scored, run folder saved
    out: str | None = None

    @property
    def spec(self) -> AllocationSpec:
        return AllocationSpec(self.experts, self.top_k, self.rank, self.origin)

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "TrialRequest":
        d = dict(payload)
        for key in ("experts", "top_k", "rank"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class TrialOutcome:
    scores: list[float] = field(default_factory=list)      # validation score per reported rung
    example_scores: list[list[float] | None] = field(default_factory=list)  # per rung: per-example values
    metrics: dict[str, Any] = field(default_factory=dict)  # last rung's summary (accuracy, gold_logprob, ...)
    test_score: float | None = None
    pruned: bool = False
    failure: str | None = None
    wall_time_s: float = 0.0
    node: str = ""
    peak_rss_mb: float = 0.0                               # the trial process's peak resident memory

    @property
    def score(self) -> float | None:
        return self.scores[-1] if self.scores else None


def run_trial(study: StudyConfig, fidelity: Fidelity, request: TrialRequest, report: Report,
              num_layers: int, objective: Callable[..., Any] | None = None) -> TrialOutcome:
    """Run one trial (search trial, pilot run or finalist) with the study's objective: the MoLA fine-tune,
    the synthetic model, or `objective` (a user function, see search.objective)."""
    outcome = TrialOutcome(node=_node_name())
    start = time.perf_counter()
    try:
        _inject_fault(request.number)
        if objective is not None:
            run_objective(objective, request.spec, fidelity, (1.0,) if request.final else fidelity.rungs,
                          train_seed=request.train_seed, final=request.final, out=request.out, metric=study.metric,
                          report=report, outcome=outcome)
        elif is_synthetic(study.objective):
            _synthetic_trial(study, fidelity, request, report, num_layers, outcome)
        else:
            _mola_trial(study, fidelity, request, report, outcome)
        bad = [s for s in outcome.scores if not math.isfinite(s)]
        if bad and outcome.failure is None:
            outcome.failure = f"validation score is {bad[0]} (NaN or inf)"
    except TrialPruned:
        outcome.pruned = True
    except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason; the study goes on
        outcome.failure = _reason(exc)
    outcome.wall_time_s = time.perf_counter() - start
    outcome.peak_rss_mb = _peak_rss_mb()
    return outcome


def _peak_rss_mb() -> float:
    """This process's peak resident memory (a Ray trial runs in a process of its own; in-process, the
    driver's peak, which includes more than the trial)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _synthetic_trial(study: StudyConfig, fidelity: Fidelity, request: TrialRequest, report: Report,
                     num_layers: int, outcome: TrialOutcome) -> None:
    """The seeded synthetic model (search/synthetic.py) in place of a fine-tune: same reports, same files."""
    objective = make_synthetic(study.objective, num_layers, sum(request.experts), min_experts=request.min_experts,
                               max_experts=request.max_experts, **_synthetic_noise())
    delay = float(os.environ.get("MOLA_SYNTHETIC_DELAY", "0"))  # lets tests see trials overlap on a cluster
    train_n = (study.finalist_train_examples if request.final else None) or fidelity.max_train_examples
    n_val = (study.finalist_eval_examples if request.final else None) or fidelity.max_eval_examples or 200
    rungs = (1.0,) if request.final else fidelity.rungs
    key = "correct" if study.metric == "accuracy" else study.metric
    for i, fraction in enumerate(rungs, start=1):
        if delay:
            time.sleep(delay)
        examples = objective.observe_examples(request.experts, seed=request.train_seed, fidelity=fraction, n=n_val,
                                              train_examples=train_n)
        score = _nan_fault(request.number, math.fsum(examples) / len(examples))
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.metrics = {study.metric: score}
        if report(i, score, i == len(rungs), examples):
            raise TrialPruned
    if request.final:
        # The test split: the same run (same expected score), other examples with their own sampling noise.
        rng = random.Random(f"test|{study.objective}|{list(request.experts)}|{request.train_seed}")
        test_mean = outcome.scores[-1] + rng.gauss(0.0, objective.noise)
        test = [test_mean + objective.example_sd * rng.gauss(0.0, 1.0) for _ in range(n_val)]
        shift = test_mean - math.fsum(test) / len(test)
        test = [v + shift for v in test]
        outcome.test_score = test_mean
        ids = [f"ex{j}" for j in range(n_val)]
        outcome.metrics = {
            split: {study.metric: math.fsum(values) / len(values), "n": len(values),
                    "per_example": {"ids": ids, key: values}}
            for split, values in (("validation", outcome.example_scores[-1]), ("test", test))}
        outcome.metrics.update({"allocation": list(request.experts), "objective": study.objective,
                                "train_seed": request.train_seed})
        if request.out:
            _write_json(Path(request.out) / "metrics.json", outcome.metrics)


def _synthetic_noise() -> dict[str, float]:
    """Benchmark/test hook: MOLA_SYNTHETIC_NOISE="noise=0.02,seed_sd=0.05,example_sd=0.1"."""
    out = {}
    for item in filter(None, (x.strip() for x in os.environ.get("MOLA_SYNTHETIC_NOISE", "").split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = float(value)
    return out


def _mola_trial(study: StudyConfig, fidelity: Fidelity, request: TrialRequest, report: Report,
                outcome: TrialOutcome) -> None:
    import torch

    from mola_search.train.run import RunConfig, evaluate, execute, json_safe, prepare
    from mola_search.train.trainer import TrainConfig

    threads = max(1, int(study.cpus_per_trial))
    torch.set_num_threads(threads)
    train_examples = study.finalist_train_examples if request.final else None
    eval_examples = study.finalist_eval_examples if request.final else None
    train_cfg = TrainConfig(**{**study.train, "seed": request.train_seed,
                               **({"max_steps": fidelity.max_steps} if fidelity.max_steps else {}),
                               "epochs": fidelity.epochs})
    config = RunConfig(task=study.task, model=study.model, dtype=study.dtype, device=trial_device(study),
                       data_dir=study.data_dir,
                       train=train_cfg,
                       max_train_examples=train_examples or fidelity.max_train_examples,
                       max_eval_examples=eval_examples or fidelity.max_eval_examples,
                       eval_splits=("validation", "test") if request.final else (),
                       out=request.out, threads=threads)
    data = task_data(study.task, study.data_dir)
    # Common random numbers: the training subset, its order and the experts' initial weights are keyed by
    # the training seed, and every search trial trains with the study seed; pilot runs and finalists use
    # other seeds, so their spread is the seed noise a comparison has to beat.
    prepared = prepare(config, data=data, spec=request.spec)
    total = train_cfg.steps_for(len(prepared.splits["train"]))
    rungs = [] if request.final else [max(1, math.ceil(f * total)) for f in fidelity.rungs]
    state = {"model": None}

    def at_step(event) -> bool:
        if event.step not in rungs:
            return False
        i = rungs.index(event.step) + 1
        result = evaluate(state["model"], prepared, "validation")
        score, examples = metric_of(result, study.metric)
        score = _nan_fault(request.number, score)
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.metrics = summary_of(result)
        if not math.isfinite(score):
            raise FloatingPointError(f"validation {study.metric} is {score} at rung {i}")
        if report(i, score, i == len(rungs), examples):
            raise TrialPruned
        return False

    result = execute(prepared, callbacks=[at_step], progress=False, save=request.final,
                     on_model=lambda m: state.__setitem__("model", m))
    if request.final:
        score, examples = metric_of(result.metrics["validation"], study.metric)
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.test_score = metric_of(result.metrics["test"], study.metric)[0]
        outcome.metrics = json_safe(result.metrics)  # everything metrics.json holds travels back with the run


def trial_device(study: StudyConfig) -> str:
    """The device one trial trains on.

    In a Ray worker: the GPU(s) Ray assigned it, which Ray makes the only visible ones (so "cuda" is
    cuda:0 of the assignment, never the machine's first GPU), or the CPU when the trial asked for no
    GPU. In-process: `--device` (auto = CUDA when present).
    """
    try:
        import ray

        in_ray = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        in_ray = False
    if in_ray:
        return "cuda" if study.gpus_per_trial > 0 else "cpu"
    return study.device


def metric_of(result: dict[str, Any], metric: str) -> tuple[float, list[float] | None]:
    """The study metric's value on one split, and its per-example values where it has them."""
    value = result.get(metric)
    if value is None:
        raise ValueError(f"metric '{metric}' was not computed for this task/eval mode "
                         f"(available: {', '.join(k for k, v in result.items() if isinstance(v, float))})")
    per = result.get("per_example") or {}
    examples = per.get("correct" if metric == "accuracy" else metric)
    return float(value), [float(v) for v in examples] if examples is not None else None


def summary_of(result: dict[str, Any]) -> dict[str, Any]:
    """A split's scores without the per-example arrays (what travels in Optuna user attrs)."""
    return {k: v for k, v in result.items() if k != "per_example"}


@lru_cache(maxsize=4)
def task_data(task: str, data_dir: str | None):
    """Task data once per process: trials on the same worker (and, in-process, the driver's check) share it."""
    from mola_search.tasks import load_task

    return load_task(task, data_dir, val_seed=0)


def _faults() -> dict[int, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, number = item.partition("@")
        out[int(number)] = kind
    return out


def _inject_fault(number: int) -> None:
    kind = _faults().get(number)
    if kind == "raise":
        raise RuntimeError(f"injected failure in trial {number}")
    if kind == "oom":
        raise MemoryError(f"injected out-of-memory in trial {number}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def _nan_fault(number: int, score: float) -> float:
    return float("nan") if _faults().get(number) == "nan" else score


def _reason(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    kind = "out of memory" if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() else type(exc).__name__
    return f"{kind}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"[:500]


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001
        pass
    return socket.gethostname()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
