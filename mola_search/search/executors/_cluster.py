"""Joining a Ray cluster (or starting a local instance), and sizing how many trials fit on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mola_search.errors import UserError
from mola_search.search.config import StudyConfig


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


def check_cluster(config: StudyConfig) -> None:
    """The cluster must be reachable, and must have the CPUs and GPUs one trial asks for (otherwise Tune
    would wait forever for an infeasible placement)."""
    import ray

    where = f"the Ray cluster at '{config.address}'" if config.address else "a local Ray instance"
    try:
        _reachable(config.address)
        init_ray(config)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ... here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot connect to {where} ({first[:200]}); start the head with `ray start --head "
                        "--node-ip-address <ip>`, and on a cluster with token authentication (Ray's default) set "
                        "RAY_AUTH_MODE=token and the head's token on this machine (docs: GPUs and clusters)"
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


def auto_concurrency(cpus: float, gpus: float, memory_mb: float, *, cpus_per_trial: float, gpus_per_trial: float,
                     trial_mb: float) -> tuple[int, dict[str, int]]:
    """How many trials fit at once: the fewest of the CPU, GPU and memory slots (at least 1).

    `memory_mb` is what the cluster offers to tasks; `trial_mb` one trial's peak resident memory."""
    slots = {"cpu": int(cpus // cpus_per_trial) if cpus_per_trial > 0 else 1,
             "memory": int(memory_mb // trial_mb) if trial_mb > 0 else 1}
    if gpus_per_trial > 0:
        slots["gpu"] = int(gpus // gpus_per_trial)
    return max(1, min(slots.values())), slots


CHECKPOINTED_MEMORY = 0.61
"""A trial's peak memory with activation checkpointing over its peak without (bench_trial.py, cpu-quick: 1.70 of
2.78 GB; docs/performance.md)."""


def cluster_resources(config: StudyConfig) -> tuple[float, float, float]:
    """(CPUs, GPUs, MB of memory for tasks) of the Ray cluster."""
    import ray

    init_ray(config)
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0)), float(resources.get("memory", 0.0)) / 2**20


def ray_concurrency(config: StudyConfig, trial_mb: float, measured: bool, *, checkpointed: bool = False,
                    can_checkpoint: bool = False) -> tuple[int, str, bool]:
    """`config.max_concurrent` when set; otherwise what the Ray cluster's CPUs, GPUs and memory hold at
    `trial_mb` per trial (measured on this study's finished trials, or estimated before the first), a line
    saying so for the progress output, and whether activation checkpointing should be on.

    When memory rather than cores or GPUs limits the count and `can_checkpoint` (the trials fine-tune MoLA and
    the user chose nothing about checkpointing), the trials recompute each decoder layer in backward: the same
    numbers in about CHECKPOINTED_MEMORY of the memory, so more of them fit. `checkpointed`: the trials already
    do (then `trial_mb`, the largest peak measured, may include runs without it: it is used as it is)."""
    if config.max_concurrent:
        return config.max_concurrent, f"max concurrent {config.max_concurrent} (--max-concurrent)", False
    cpus, gpus, memory_mb = cluster_resources(config)
    per = dict(cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial)
    n, slots = auto_concurrency(cpus, gpus, memory_mb, trial_mb=trial_mb, **per)
    compute = min(v for k, v in slots.items() if k != "memory")
    if slots["memory"] < compute and can_checkpoint and not checkpointed:
        fewer = n
        n, slots = auto_concurrency(cpus, gpus, memory_mb, trial_mb=CHECKPOINTED_MEMORY * trial_mb, **per)
        line = concurrency_line(n, slots, memory_mb, CHECKPOINTED_MEMORY * trial_mb, measured=measured,
                                checkpointing=True)
        return n, (f"{line}; memory, not compute, limited this to {fewer} of {compute}: activation checkpointing is "
                   f"on for these trials (the same numbers in about {CHECKPOINTED_MEMORY:.0%} of the memory)"), True
    return n, concurrency_line(n, slots, memory_mb, trial_mb, measured=measured, checkpointing=checkpointed), False


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
                 "same numbers with about half the memory per trial (docs: Performance)")
    return line


def trial_resources(config: StudyConfig) -> dict[str, float]:
    res = {"cpu": config.cpus_per_trial}
    if config.gpus_per_trial:
        res["gpu"] = config.gpus_per_trial
    return res
