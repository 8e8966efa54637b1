"""The built-in objective: fine-tune MoLA with the requested allocation and score the validation split.

Common random numbers: the training subset, its order and the experts' initial weights are keyed by the
training seed, and every search trial trains with the study seed; pilot runs and finalists use other seeds,
so their spread is the seed noise a comparison has to beat.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from mola_search._io import json_safe
from mola_search.trial import _hooks
from mola_search.trial.fidelity import Fidelity
from mola_search.trial.objective import Report, TrialPruned
from mola_search.trial.request import TrialOutcome, TrialRequest
from mola_search.trial.settings import TrialSettings


def mola_trial(settings: TrialSettings, fidelity: Fidelity, request: TrialRequest, report: Report,
               outcome: TrialOutcome) -> None:
    """Train at `fidelity` (a search trial, scored at each rung) or at finalist fidelity (`request.final`:
    validation and test scored at the end, the run folder saved to `request.out`); fills `outcome`."""
    from mola_search.train.run import evaluate, execute, prepare

    config = _run_config(settings, fidelity, request)
    prepared = prepare(config, data=task_data(settings.task, settings.data_dir), spec=request.spec)
    total = config.train.steps_for(len(prepared.splits["train"]))
    rungs = [] if request.final else [max(1, math.ceil(f * total)) for f in fidelity.rungs]
    state: dict[str, Any] = {"model": None}

    def at_step(event) -> bool:
        if event.step not in rungs:
            return False
        i = rungs.index(event.step) + 1
        result = evaluate(state["model"], prepared, "validation")
        score, examples = metric_of(result, settings.metric)
        score = _hooks.nan_fault(request.number, score)
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.metrics = summary_of(result)
        if not math.isfinite(score):
            raise FloatingPointError(f"validation {settings.metric} is {score} at rung {i}")
        if report(i, score, i == len(rungs), examples):
            raise TrialPruned
        return False

    result = execute(prepared, callbacks=[at_step], progress=False, save=request.final,
                     on_model=lambda m: state.__setitem__("model", m))
    if request.final:
        score, examples = metric_of(result.metrics["validation"], settings.metric)
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.test_score = metric_of(result.metrics["test"], settings.metric)[0]
        outcome.metrics = json_safe(result.metrics)  # everything metrics.json holds travels back with the run


def _run_config(settings: TrialSettings, fidelity: Fidelity, request: TrialRequest):
    """The `RunConfig` of one trial: the study's training overrides, the request's seed, the fidelity's
    limits (a finalist's own limits where the study sets them), one torch thread per CPU of the trial."""
    import torch

    from mola_search.train.run import RunConfig
    from mola_search.train.trainer import TrainConfig

    threads = max(1, int(settings.cpus))
    torch.set_num_threads(threads)
    train_examples = settings.final_train_examples if request.final else None
    eval_examples = settings.final_eval_examples if request.final else None
    train_cfg = TrainConfig(**{**settings.train, "seed": request.train_seed,
                               **({"max_steps": fidelity.max_steps} if fidelity.max_steps else {}),
                               "epochs": fidelity.epochs})
    return RunConfig(task=settings.task, model=settings.model, dtype=settings.dtype, device=trial_device(settings),
                     data_dir=settings.data_dir, train=train_cfg, balance_loss=settings.balance_loss,
                     aux_loss_coef=settings.aux_loss_coef,
                     max_train_examples=train_examples or fidelity.max_train_examples,
                     max_eval_examples=eval_examples or fidelity.max_eval_examples,
                     eval_splits=("validation", "test") if request.final else (),
                     out=request.out, threads=threads)


def trial_device(settings: TrialSettings) -> str:
    """The device one trial trains on.

    In a Ray worker: the GPU(s) Ray assigned it, which Ray makes the only visible ones (so "cuda" is
    cuda:0 of the assignment, never the machine's first GPU), or the CPU when the trial asked for no
    GPU. In-process: the study's `device` (auto = CUDA when present).
    """
    try:
        import ray

        in_ray = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        in_ray = False
    if in_ray:
        return "cuda" if settings.gpus > 0 else "cpu"
    return settings.device


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
