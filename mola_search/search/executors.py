"""How trials run: in this process one after another, or as Ray Tune trials.

Both executors drive the same `StudyDriver`.  In-process, the study's Optuna
pruner (successive halving, or Wilcoxon paired over validation examples) stops
weak trials at a rung; under Ray, Tune's ASHA does, or for Wilcoxon a Tune
scheduler that asks the same Optuna pruner. A trial stopped either way is told
to Optuna as PRUNED (never as a completed trial with a partial score).

Independent runs (the pilot, the finalists) come back as `TrialOutcome`s through
the executor itself (Ray's trial results), not through a shared disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search.search.config import StudyConfig
from mola_search.search.space import Fidelity
from mola_search.search.study import Proposal, StudyDriver
from mola_search.search.trial import TrialOutcome, TrialRequest, run_trial


def run_local(driver: StudyDriver, fidelity: Fidelity) -> None:
    """Sequential, in-process: what tests, benchmarks and single-core users need."""
    while driver.remaining() > 0:
        proposal = driver.ask()
        if proposal is None:
            driver.progress.message("sampler only proposes allocations already trained: stopping early")
            return
        prune = driver.config.scheduler != "none"
        outcome = run_trial(driver.config, fidelity, proposal.request,
                            lambda rung, score, last, examples: (driver.report(proposal, rung, score, examples)
                                                                 and prune and not last),
                            driver.num_layers, driver.objective)
        driver.finish(proposal, outcome)


# on_done(request, outcome): called in the driver as each independent run finishes
RunDone = Callable[[TrialRequest, TrialOutcome], None]


def run_local_requests(config: StudyConfig, fidelity: Fidelity, requests: list[TrialRequest],
                       num_layers: int, on_done: RunDone | None = None,
                       objective: Callable[..., Any] | None = None) -> list[TrialOutcome]:
    """Independent runs (pilot, finalists) one after another; never pruned."""
    outcomes = []
    for r in requests:
        outcomes.append(run_trial(config, fidelity, r, lambda *_: False, num_layers, objective))
        if on_done:
            on_done(r, outcomes[-1])
    return outcomes


# --- Ray Tune ------------------------------------------------------------------------------

def init_ray(config: StudyConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stops the study (KeyboardInterrupt: "interrupted", exit 130, `--resume` continues it). Tune's own
    # handler would instead end the phase quietly, and the study would go on to summarise runs it never finished.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    # Workers on a running cluster are started by its raylets, not by this process: hand them this
    # process's MOLA_* settings (data/cache folders, test hooks such as MOLA_SEARCH_FAULTS).
    env = {k: v for k, v in os.environ.items() if k.startswith("MOLA_")}
    for key in ("MOLA_DATA_DIR", "MOLA_CACHE_DIR"):  # trials run in their own working directories
        if env.get(key):
            env[key] = str(Path(env[key]).expanduser().resolve())
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if config.address:
        ray.init(address=config.address, **kwargs)
    else:  # a fresh local instance: never attach to whatever cluster happens to run on this machine
        ray.init(address="local", **kwargs)


def auto_concurrency(cpus: float, gpus: float, memory_mb: float, *, cpus_per_trial: float, gpus_per_trial: float,
                     trial_mb: float) -> tuple[int, dict[str, int]]:
    """How many trials fit at once: the fewest of the CPU, GPU and memory slots (at least 1).

    `memory_mb` is what the cluster offers to tasks; `trial_mb` one trial's peak resident memory."""
    slots = {"cpu": int(cpus // cpus_per_trial) if cpus_per_trial > 0 else 1,
             "memory": int(memory_mb // trial_mb) if trial_mb > 0 else 1}
    if gpus_per_trial > 0:
        slots["gpu"] = int(gpus // gpus_per_trial)
    return max(1, min(slots.values())), slots


def ray_concurrency(config: StudyConfig, trial_mb: float, measured: bool) -> tuple[int, str]:
    """`config.max_concurrent` when set; otherwise what the Ray cluster's CPUs, GPUs and memory hold at
    `trial_mb` per trial (measured on this study's finished trials, or estimated before the first), and
    a line saying so for the progress output."""
    if config.max_concurrent:
        return config.max_concurrent, f"max concurrent {config.max_concurrent} (--max-concurrent)"
    import ray

    init_ray(config)
    resources = ray.cluster_resources()
    memory_mb = float(resources.get("memory", 0.0)) / 2**20
    n, slots = auto_concurrency(float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0)), memory_mb,
                                cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial,
                                trial_mb=trial_mb)
    checkpointing = bool(config.train.get("activation_checkpointing"))
    return n, concurrency_line(n, slots, memory_mb, trial_mb, measured=measured, checkpointing=checkpointing)


def concurrency_line(n: int, slots: dict[str, int], memory_mb: float, trial_mb: float, *, measured: bool,
                     checkpointing: bool) -> str:
    """What `auto_concurrency` chose and why, for the progress output. When memory rather than cores or GPUs
    is the limit and trials keep every activation, it says that activation checkpointing would fit more."""
    line = (f"max concurrent {n} (auto: {slots['cpu']} CPU slots"
            + (f", {slots['gpu']} GPU slots" if "gpu" in slots else "")
            + f", {slots['memory']} memory slots: {memory_mb / 1024:.1f} GB for tasks / "
            f"{trial_mb / 1024:.1f} GB per trial, {'measured' if measured else 'estimated'})")
    compute = min(v for k, v in slots.items() if k != "memory")
    if slots["memory"] < compute and not checkpointing:
        line += (f"; memory, not compute, limits this to {n} of {compute}: --activation-checkpointing trains the "
                 "same numbers with about half the memory per trial (README, Performance)")
    return line


def check_resources(config: StudyConfig) -> None:
    """Fail before any study folder exists when trials could never be placed.

    In-process: `--device` must exist here, and `--gpus-per-trial` > 0 needs a visible GPU. Under Ray:
    the cluster must be reachable, and must have the CPUs and GPUs one trial asks for (otherwise Tune
    would wait forever for an infeasible placement).
    """
    from mola_search.errors import UserError
    from mola_search.models import parse_device

    if config.executor == "local":
        if config.gpus_per_trial > 0:
            try:
                parse_device("cuda")
            except UserError:
                raise UserError(f"`gpus_per_trial` {config.gpus_per_trial:g} with `executor` local: no CUDA GPU is "
                                "visible here; set it to 0 (trials run on the CPU) or run on a GPU machine") from None
        parse_device(config.device)
        return
    import ray

    where = f"the Ray cluster at '{config.address}'" if config.address else "a local Ray instance"
    try:
        _reachable(config.address)
        init_ray(config)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ... here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot connect to {where} ({first[:200]}); start the head with `ray start --head "
                        "--node-ip-address <ip>`, and on a cluster with token authentication (Ray's default) set "
                        "RAY_AUTH_MODE=token and the head's token on this machine (README: Running on a cluster)"
                        ) from None
    resources = ray.cluster_resources()
    for kind, need, flag in (("CPU", config.cpus_per_trial, "`cpus_per_trial`"),
                             ("GPU", config.gpus_per_trial, "`gpus_per_trial`")):
        have = float(resources.get(kind, 0.0))
        if need > 0 and have < need:
            ray.shutdown()
            raise UserError(f"{flag} {need:g}: the Ray cluster has {have:g} {kind}(s) in all, so no trial could ever "
                            f"start; lower {flag}" + (" or add GPU nodes (`ray start ... --num-gpus N`)" if kind == "GPU"
                                                      else ""))


SINK_NAMESPACE = "mola-search"  # Tune's trial actors look the sink up by name from their own job context


class RunFolderSink:
    """A Ray actor on the driver's node that writes finished runs' files into the study folder.

    A finalist trains on whatever node Ray picks and writes its run folder there; it then sends
    every file of that folder here, so the study folder on the driver holds every finalist's
    metrics, router statistics and adapter with no shared filesystem. Paths are relative to the
    study folder and may not leave it.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()

    def write(self, relative: str, data: bytes) -> int:
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{relative} is outside the study folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return len(data)


def start_sink(folder: Path) -> tuple[str, Any]:
    """Start the study folder's sink on this (the driver's) node; returns its name and handle. The actor
    lives as long as the handle: keep it until the runs are done."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"sink-{uuid.uuid4().hex[:12]}"
    here = ray.get_runtime_context().get_node_id()
    sink = ray.remote(num_cpus=0)(RunFolderSink).options(
        name=name, namespace=SINK_NAMESPACE, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote(str(folder))
    ray.get(sink.__ray_ready__.remote())  # up before any run may look for it
    return name, sink


def stop_sink(name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=SINK_NAMESPACE))
    except ValueError:  # already gone
        pass


def send_run_folder(sink_name: str, out: Path, study_folder: Path) -> int:
    """Send every file under `out` to the driver's sink; returns the bytes sent."""
    import ray

    sink = ray.get_actor(sink_name, namespace=SINK_NAMESPACE)
    sent = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        sent += ray.get(sink.write.remote(str(path.relative_to(study_folder)), path.read_bytes()))
    return sent


def _reachable(address: str | None, timeout: float = 10.0) -> None:
    """A host:port address must accept a TCP connection (Ray itself retries a dead address for minutes)."""
    import socket

    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {address}: {exc}") from None


def _trainable(config: dict[str, Any], study: dict[str, Any], fidelity: dict[str, Any], num_layers: int,
               sink: str | None = None, study_folder: str | None = None,
               objective: Callable[..., Any] | None = None) -> None:
    """Runs inside a Ray worker: one trial, reported rung by rung; a finished finalist's run folder is
    sent to the driver's sink."""
    from ray import tune

    study_cfg = StudyConfig.from_dict(study)
    fid = Fidelity.from_dict(fidelity)
    request = TrialRequest.from_payload(config["request"])

    def report(rung: int, score: float, last: bool, examples: list[float] | None) -> bool:
        if last or score != score:  # the last rung is reported once, with the outcome, below
            return False
        tune.report({"rung": rung, "score": score, "examples": examples, "node": _node()})
        return False

    outcome = run_trial(study_cfg, fid, request, report, num_layers, objective)
    if sink and request.out and outcome.failure is None and Path(request.out).is_dir():
        try:
            send_run_folder(sink, Path(request.out), Path(study_folder))
        except Exception as exc:  # noqa: BLE001 - the run is lost to the study: say so, never drop it silently
            outcome.failure = f"could not send the run folder to the driver: {type(exc).__name__}: {exc}"[:500]
    score = outcome.score if outcome.score is not None and outcome.score == outcome.score else -1e9
    tune.report({"rung": len(outcome.scores) or 1, "score": score, "final": True, "outcome": outcome_payload(outcome),
                 "node": outcome.node})


def outcome_payload(outcome: TrialOutcome) -> str:
    """A trial's outcome as one JSON string in Ray's result dict: Tune flattens nested dicts in results
    (and drops or coerces some values); a string reaches the driver exactly as it was sent."""
    return json.dumps(dataclasses.asdict(outcome), allow_nan=True)


def outcome_from_payload(payload: str) -> TrialOutcome:
    return TrialOutcome(**json.loads(payload))


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _resources(config: StudyConfig) -> dict[str, float]:
    res = {"cpu": config.cpus_per_trial}
    if config.gpus_per_trial:
        res["gpu"] = config.gpus_per_trial
    return res


MAX_TUNE_RESTARTS = 3


def run_ray(driver: StudyDriver, fidelity: Fidelity, folder: Path, concurrency: int | None = None) -> None:
    """Trials as Ray Tune trials; if Tune itself gives up (e.g. Ray's memory monitor killed a trial's
    actor while it started), the trials it had in flight are FAILED with the reason and Tune is
    started again for the trials still to run."""
    for attempt in range(MAX_TUNE_RESTARTS + 1):
        if driver.remaining() == 0:
            return
        live: dict[str, Proposal] = {}
        try:
            _run_ray_once(driver, fidelity, folder, live, concurrency)
            return
        except Exception as exc:  # noqa: BLE001 - Tune raised out of fit(): record it, keep the study going
            reason = tune_failure(exc)
            for proposal in list(live.values()):
                driver.finish(proposal, TrialOutcome(failure=reason))
            driver.progress.message(f"Ray Tune stopped ({reason}); "
                                    + ("starting it again for the remaining trials" if attempt < MAX_TUNE_RESTARTS
                                       else "giving up: continue later with mola-search --resume"))


def tune_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.removeprefix("Caught unexpected exception: ")
    kind = "out of memory" if "memory" in text.lower() else type(exc).__name__
    return f"{kind}: {text}"[:500]


def _run_ray_once(driver: StudyDriver, fidelity: Fidelity, folder: Path, live: dict[str, Proposal],
                  concurrency: int | None = None) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import Searcher

    config = driver.config
    remaining = driver.remaining()
    if remaining == 0:
        return
    init_ray(config)

    class OptunaBridge(Searcher):
        """Ray's view of our StudyDriver: suggest = ask, results = report, complete = tell."""

        def __init__(self, driver: StudyDriver) -> None:
            super().__init__(metric="score", mode="max")
            self.driver = driver  # an attribute, not a closure variable, so that __getstate__ can leave it out
            self.live: dict[str, Proposal] = live
            self.exhausted = False

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its search algorithm into ray/tune/tuner.pkl (for Tuner.restore, which this
            # executor never uses: `mola-search --resume` continues from the Optuna storage). The live
            # driver (storage connection, sampler, output stream) is not state to pickle, and may not pickle.
            return {**self.__dict__, "driver": None, "live": {}}

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if self.exhausted:
                return Searcher.FINISHED
            proposal = self.driver.ask()
            if proposal is None:
                self.exhausted = True
                self.driver.progress.message("sampler only proposes allocations already trained: stopping early")
                return Searcher.FINISHED
            self.live[trial_id] = proposal
            return {"request": proposal.request.to_payload()}

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            proposal = self.live.get(trial_id)
            if proposal is not None and not result.get("final"):  # (the Wilcoxon scheduler reported it already)
                self.driver.report(proposal, int(result["rung"]), float(result["score"]), result.get("examples"))

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            proposal = self.live.pop(trial_id, None)
            if proposal is None:
                return
            if error or result is None:
                outcome = TrialOutcome(failure="the Ray worker died or raised outside the trial (killed, or out of "
                                               f"memory); see {folder / 'ray'}")
            elif result.get("final"):
                outcome = outcome_from_payload(result["outcome"])
                if outcome.scores and not outcome.failure and not outcome.pruned:
                    self.driver.report(proposal, len(outcome.scores), outcome.scores[-1],
                                       outcome.example_scores[-1] if outcome.example_scores else None)
            else:  # stopped by the scheduler after a rung: pruned, with the rung scores it reached
                if "rung" in result and "score" in result:
                    self.driver.report(proposal, int(result["rung"]), float(result["score"]), result.get("examples"))
                outcome = TrialOutcome(pruned=True, node=str(result.get("node", "")))
            self.driver.finish(proposal, outcome)

    bridge = OptunaBridge(driver)
    if config.scheduler == "asha" and len(fidelity.rungs) > 1:
        scheduler = ASHAScheduler(time_attr="rung", max_t=len(fidelity.rungs), grace_period=1,
                                  reduction_factor=config.asha_reduction_factor)
    elif config.scheduler == "wilcoxon" and len(fidelity.rungs) > 1:
        scheduler = _optuna_pruning_scheduler(bridge)
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=config.to_dict(), fidelity=fidelity.to_dict(),
                             num_layers=driver.num_layers, objective=driver.objective),
        _resources(config))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=bridge, scheduler=scheduler, num_samples=remaining,
                                    max_concurrent_trials=concurrency, metric="score", mode="max"),
        run_config=tune.RunConfig(name="tune", storage_path=str((folder / "ray").resolve()), verbose=0,
                                  log_to_file=True),
    )
    tuner.fit()


def _optuna_pruning_scheduler(bridge):
    """A Tune scheduler that stops a trial when the study's Optuna pruner (Wilcoxon) says so.

    Tune asks the scheduler before the search algorithm, so the rung (with its per-example
    values) is reported to Optuna here; the bridge's later report of the same rung is a no-op.
    """
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class OptunaPruning(FIFOScheduler):
        def __init__(self, bridge) -> None:
            super().__init__()
            self.bridge = bridge

        def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl like the bridge: no live driver
            return {**self.__dict__, "bridge": None}

        def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
            proposal = self.bridge.live.get(trial.trial_id) if self.bridge is not None else None
            if proposal is None or result.get("final") or "rung" not in result:
                return TrialScheduler.CONTINUE
            prune = self.bridge.driver.report(proposal, int(result["rung"]), float(result["score"]),
                                              result.get("examples"))
            return TrialScheduler.STOP if prune else TrialScheduler.CONTINUE

    return OptunaPruning(bridge)


def run_ray_requests(config: StudyConfig, fidelity: Fidelity, requests: list[TrialRequest], folder: Path,
                     num_layers: int, on_done: RunDone | None = None, name: str = "runs",
                     objective: Callable[..., Any] | None = None, concurrency: int | None = None) -> None:
    """Independent runs (pilot, finalists) spread over the Ray cluster, never pruned.

    Each run's outcome (scores, per-example values, metrics) comes back in its last Tune
    result and is handed to `on_done` in this process as the run ends; a run whose worker
    died comes back as an outcome with a failure.
    """
    from ray import tune

    class Finished(tune.Callback):
        """Tune calls back in this process as each run ends: the user sees progress, not silence."""

        def __init__(self, on_done: RunDone | None, told: list[dict[str, Any]]) -> None:
            # arguments and attributes, not closure variables: Tune pickles this callback (class
            # included) into tuner.pkl, and __getstate__ can leave out an attribute, not a closure cell
            self.on_done, self.told = on_done, told

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "on_done": None, "told": []}

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            if result.get("final") and "outcome" in result:
                self._tell(trial, outcome_from_payload(result["outcome"]))
            else:
                self._tell(trial, TrialOutcome(failure="the run ended without reporting an outcome"))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._tell(trial, TrialOutcome(failure="the Ray worker died or raised outside the run "
                                                   "(killed, or out of memory)"))

        def _tell(self, trial, outcome: TrialOutcome) -> None:
            request = TrialRequest.from_payload(trial.config["request"])
            self.told.append(request.to_payload())
            if self.on_done:
                self.on_done(request, outcome)

    told: list[dict[str, Any]] = []  # requests whose outcome reached on_done
    init_ray(config)
    sink, sink_handle = start_sink(folder) if any(r.out for r in requests) else (None, None)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=config.to_dict(), fidelity=fidelity.to_dict(), num_layers=num_layers,
                             sink=sink, study_folder=str(folder.resolve()), objective=objective),
        _resources(config))
    tuner = tune.Tuner(
        trainable, param_space={"request": tune.grid_search([r.to_payload() for r in requests])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, metric="score", mode="max"),
        run_config=tune.RunConfig(name=name, storage_path=str((folder / "ray").resolve()), verbose=0,
                                  log_to_file=True, callbacks=[Finished(on_done, told)]),
    )
    try:
        tuner.fit()
    except Exception as exc:  # noqa: BLE001 - Tune gave up: the runs it never finished are failed, with why
        reason = tune_failure(exc)
        for r in requests:
            if r.to_payload() not in told and on_done:
                on_done(r, TrialOutcome(failure=f"{reason}; resume the study to run it again"))
    finally:
        if sink:
            stop_sink(sink)
        del sink_handle
