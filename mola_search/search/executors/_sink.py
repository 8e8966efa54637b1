"""Run folders back to the driver without a shared disk.

A finalist trains on whatever node Ray picks and writes its run folder there; it then sends every file of
that folder to a `RunFolderSink` actor on the driver's node, which writes them into the study folder
(`StudyFolder.write_run_file`: paths relative to the study folder, never outside it). So the study folder on
the driver holds every finalist's metrics, router statistics and adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SINK_NAMESPACE = "mola-search"  # Tune's trial actors look the sink up by name from their own job context


class RunFolderSink:
    """The actor: writes the files it is sent into the study folder."""

    def __init__(self, root: str) -> None:
        from mola_search.search.study import StudyFolder

        self.folder = StudyFolder(root)

    def write(self, relative: str, data: bytes) -> int:
        return self.folder.write_run_file(relative, data)


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
