"""A Ray study that cannot place a trial says what it waits for, and ends after `resource_timeout` minutes.

Left alone, Ray Tune waits without a word while no node can run a trial: a killed worker node left a study
silent for minutes ("node marked dead", then nothing until a node joined). Tune's own warning
(`TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S`) is a log record at WARNING level, which the study's Ray
logging (ERROR) hides; it names only the cluster's CPU and GPU totals and cannot end the run. So the Ray
executor adds a Tune callback (`_tune.ResourceWatch`) whose `on_step_begin` (Tune's controller calls it every
step, about every 0.1 s when nothing happens) hands this module's `ResourceWait` two facts from Tune's own
trial list: are trials PENDING, and is none RUNNING. Only while that holds does it ask Ray what the cluster
has (`ray.available_resources()`, `ray.nodes()`, at most every `CHECK_S`); otherwise it only notes the alive
nodes every `REMEMBER_S` (one `ray.nodes()`), to name a node that is lost later:

- a trial that could be placed (a CPU free, or a placement group Tune placed for it while its actor starts)
  is a trial starting, not a wait: the clock stops;
- otherwise one line names what one trial asks for and what the cluster has: "waiting for 1 CPU for a trial:
  the cluster has 0 CPUs free of 0 (node 6f1c2a9b3d4e at 127.0.0.1 lost)". It comes at once when no alive
  node could hold a trial even idle (a node lost, none big enough), after `GRACE_S` when the resources exist
  but are taken; it is repeated every `RESOURCE_WAIT_MESSAGE_S` and when the lost nodes or the cluster's
  totals change (a raylet killed a moment ago still counts until Ray marks its node dead, some 15 to 20 s later),
  and a last line says when a trial runs again;
- after `resource_timeout` minutes of waiting (counted from the first step no trial could be placed) it
  raises `ResourceTimeout` out of `Tuner.fit()`. Tune's `run` loop cleans up (stops its actors) and
  re-raises; the executor lets it through (it is not a Tune failure to retry), and the CLI prints it on one
  line with the resume command and exits 3. Raising skips Tune's end-of-run callbacks on purpose: ending
  the run through a Stopper would hand the unfinished trials to the searcher as stopped (pruned) and the
  independent runs to `on_done` as failed, and the pilot would keep a failure it never had. As it is, every
  finished trial and run was already recorded as it ended; search trials still waiting stay RUNNING in the
  Optuna storage and `--resume` marks them interrupted and queues them again, as after Ctrl-C; independent
  runs not yet told are run again by the resumed phase.

The same callback watches both Tune uses: search trials (`RayExecutor.search`) and independent runs
(`RayExecutor.run`: the pilot, the finalists, the race's rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mola_search.errors import ResourceTimeout

GRACE_S = 20.0                   # resources taken for less than this: not worth a line yet
RESOURCE_WAIT_MESSAGE_S = 60.0   # the wait is said again this often
CHECK_S = 2.0                    # while trials wait, the cluster is asked at most this often
REMEMBER_S = 30.0                # while trials run, the alive nodes are listed this often (to name a lost one)


@dataclass
class ClusterView:
    """What the cluster has, from Ray: free and total amounts of each resource over the alive nodes, each alive
    node's totals, the nodes that were alive once and are not now (id prefix and address), and what this
    study's placement groups hold (trials starting, while none runs)."""

    free: dict[str, float]
    total: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    placed: dict[str, float] = field(default_factory=dict)


def remember_nodes(seen: dict[str, str]) -> None:
    """Adds Ray's alive nodes to `seen` (node id -> "id at address")."""
    import ray

    for node in ray.nodes():
        if node.get("Alive"):
            node_id = str(node.get("NodeID", ""))
            seen[node_id] = f"{node_id[:12]} at {node.get('NodeManagerAddress', '?')}"


def ray_cluster_view(seen: dict[str, str]) -> ClusterView:
    """The cluster as Ray sees it now; `seen` (node id -> "id at address") keeps every node ever seen alive,
    so that a node that died says "lost"."""
    import ray

    nodes, lost = [], []
    for node in ray.nodes():
        node_id = str(node.get("NodeID", ""))
        name = f"{node_id[:12]} at {node.get('NodeManagerAddress', '?')}"
        if node.get("Alive"):
            seen[node_id] = name
            nodes.append({k: float(v) for k, v in (node.get("Resources") or {}).items()})
        elif node_id in seen:
            lost.append(seen[node_id])
    total: dict[str, float] = {}
    for resources in nodes:
        for key, value in resources.items():
            total[key] = total.get(key, 0.0) + value
    free = {k: float(v) for k, v in ray.available_resources().items()}
    return ClusterView(free=free, total=total, nodes=nodes, lost=lost,
                       placed=_placed(ray.cluster_resources(), ray.get_runtime_context().get_job_id()))


def _placed(cluster: Mapping[str, float], job_id: str) -> dict[str, float]:
    """What this job's placement groups hold, by resource. Ray adds `<kind>_group_<group id>` to the cluster's
    resources for each placed group (and `<kind>_group_<bundle>_<group id>` per bundle, not counted twice), and a
    group id ends with the id of the job that made it. While no trial of this study runs, a group Tune placed
    for one is a trial starting: its actor holds the group's resources while its process comes up, which takes
    seconds (more than 10 on a busy machine), and none of it shows as free."""
    placed: dict[str, float] = {}
    for key, value in cluster.items():
        kind, sep, group = key.partition("_group_")
        if sep and "_" not in group and job_id and group.endswith(job_id):
            placed[kind] = placed.get(kind, 0.0) + float(value)
    return placed


def _amount(kind: str, value: float) -> str:
    if kind == "memory":
        return f"{value / 2**30:.1f} GB of memory"
    return f"{value:g} {kind}" + ("s" if value != 1 else "")


def _has(kind: str, view: ClusterView) -> str:
    free, total = view.free.get(kind, 0.0), view.total.get(kind, 0.0)
    if kind == "memory":
        return f"{free / 2**30:.1f} GB of memory free of {total / 2**30:.1f}"
    return f"{_amount(kind, free)} free of {total:g}"


def _holds(node: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in need.items() if v)


def shortfall(need: Mapping[str, float], view: ClusterView) -> str | None:
    """Why one trial asking for `need` ({"CPU": 1, "GPU": 0.5, ...}) cannot be placed now, or None when it can
    (its resources are free, or this study's placement groups hold them for a trial that is starting)."""
    need = {k: float(v) for k, v in need.items() if v}
    short = [k for k, v in need.items() if view.free.get(k, 0.0) + view.placed.get(k, 0.0) < v]
    if short:
        why = (f"waiting for {' and '.join(_amount(k, need[k]) for k in short)} for a trial: the cluster has "
               + " and ".join(_has(k, view) for k in short))
    elif view.nodes and not any(_holds(n, need) for n in view.nodes):
        largest = max(view.nodes, key=lambda n: tuple(n.get(k, 0.0) for k in need))
        why = (f"waiting for a node with {' and '.join(_amount(k, v) for k, v in need.items())} for a trial: the "
               "cluster has that much only over several nodes (the largest has "
               f"{' and '.join(_amount(k, largest.get(k, 0.0)) for k in need)})")
    else:
        return None
    if view.lost:
        why += f" (node{'s' if len(view.lost) > 1 else ''} {', '.join(view.lost)} lost)"
    return why


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ResourceWait:
    """Watches, step by step, whether trials wait for resources (see the module docstring).

    `step(pending, running)` is called with Tune's counts of PENDING and RUNNING trials; `say(text)` prints a
    progress line; `view()` returns a `ClusterView`, and `remember()` notes the nodes alive now, at the first
    step and every `REMEMBER_S` while nothing waits (by default both ask Ray, with `seen` the nodes noted: a node
    that dies later is named lost, also when Ray marked it dead before anything waited). Raises
    `ResourceTimeout` once no trial could be placed for `timeout_min` minutes (0 or None: never)."""

    def __init__(self, need: Mapping[str, float], timeout_min: float | None, say: Callable[[str], None],
                 view: Callable[[], ClusterView] | None = None, clock: Callable[[], float] = time.monotonic,
                 seen: dict[str, str] | None = None, remember: Callable[[], None] | None = None) -> None:
        self.need, self.timeout_s = dict(need), (timeout_min or 0.0) * 60.0
        self.say, self.clock = say, clock
        seen = {} if seen is None else seen   # shared by the executor's phases: a node lost before still says so
        self.view = view or (lambda: ray_cluster_view(seen))
        self.remember = remember or ((lambda: None) if view else (lambda: remember_nodes(seen)))
        self.remembered = -float("inf")     # when the alive nodes were last noted
        self.since: float | None = None     # the first step at which no trial could be placed
        self.checked = -float("inf")        # when the cluster was last asked
        self.said: float | None = None      # when the wait was last said
        self.news: tuple = ()               # the lost nodes and the totals it said then

    def step(self, pending: int, running: int) -> None:
        now = self.clock()
        if not pending or running:
            self._over(now)
            if now - self.remembered >= REMEMBER_S:
                self.remembered = now
                _quietly(self.remember)
            return
        if now - self.checked < CHECK_S:
            return
        self.checked = now
        view = _quietly(self.view)
        if view is None:  # Ray did not answer (its GCS is busy with a failure): look again at the next check
            return
        why = shortfall(self.need, view)
        if why is None:   # a trial can be placed (or is being placed): it is starting, not waiting
            self._over(now)
            return
        if self.since is None:
            self.since = now
        waited = now - self.since
        if self.timeout_s and waited >= self.timeout_s:
            raise ResourceTimeout(f"{why}; no trial could run for {_minutes(waited)}, so the study stopped "
                                  f"(`resource_timeout` {self.timeout_s / 60:g} min)")
        # Said at once when no alive node could hold a trial even idle (a node lost, none big enough); after
        # GRACE_S when the resources exist but are taken; again every minute, and when nodes or totals change.
        news = (tuple(view.lost), tuple(view.total.get(k, 0.0) for k in sorted(self.need)))
        if self.said is None:
            due = waited >= GRACE_S or not any(_holds(n, self.need) for n in view.nodes)
        else:
            due = now - self.said >= RESOURCE_WAIT_MESSAGE_S or news != self.news
        if due:
            self.said, self.news = now, news
            limit = (f"the study stops after {_minutes(self.timeout_s)} without one (--resource-timeout)"
                     if self.timeout_s else "it waits for as long as it takes (--resource-timeout 0)")
            self.say(f"{why}; no trial has run for {_minutes(waited)}, {limit}")

    def _over(self, now: float) -> None:
        if self.said is not None and self.since is not None:
            self.say(f"resources are back after {_minutes(now - self.since)} of waiting: trials run again")
        self.since, self.said = None, None


def _quietly(ask: Callable[[], Any]) -> Any:
    """`ask()`, or None if it raised: a question to Ray's state must never end the Tune run it watches."""
    try:
        return ask()
    except Exception:  # noqa: BLE001 - Ray's state calls raise RPC, timeout and connection errors of many kinds
        return None


def trial_counts(statuses: Sequence[Any]) -> tuple[int, int]:
    """(PENDING, RUNNING) among Tune trial statuses."""
    return sum(1 for s in statuses if s == "PENDING"), sum(1 for s in statuses if s == "RUNNING")
