"""What a Ray study says while no node can run a trial, and `resource_timeout` (executors/_wait.py), without Ray.

The real thing (a worker node killed under a running study) is tests/test_node_loss.py; here a fake clock and
fake cluster views drive `ResourceWait` step by step, as Tune's loop does.
"""

from __future__ import annotations

import re

import pytest

from mola_search.cli.search import RESUMABLE, build_parser, study_config_from_args
from mola_search.errors import ResourceTimeout, UserError
from mola_search.search.config import DEFAULT_RESOURCE_TIMEOUT, StudyConfig
from mola_search.search.executors import _wait
from mola_search.search.executors._wait import ClusterView, ResourceWait, shortfall, trial_counts

LOST = ClusterView(free={}, total={"CPU": 0.0}, nodes=[{"CPU": 0.0, "memory": 2.0**30}],
                   lost=["6f1c2a9b3d4e at 127.0.0.1"])
IDLE = ClusterView(free={"CPU": 2.0}, total={"CPU": 2.0}, nodes=[{"CPU": 2.0}])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watch(view: ClusterView, timeout_min: float | None = 2.0):
    clock, said, views = Clock(), [], {"now": view}
    wait = ResourceWait({"CPU": 1.0, "GPU": 0.0}, timeout_min, said.append, view=lambda: views["now"], clock=clock)
    return wait, clock, said, views


def _run(wait: ResourceWait, clock: Clock, seconds: float, pending: int = 1, running: int = 0) -> None:
    """Tune's loop for `seconds`: a step every 0.1 s."""
    for _ in range(int(seconds * 10)):
        clock.now += 0.1
        wait.step(pending, running)


def test_the_wait_names_the_resource_and_the_lost_node() -> None:
    assert shortfall({"CPU": 1, "GPU": 0}, LOST) == ("waiting for 1 CPU for a trial: the cluster has 0 CPUs free of "
                                                     "0 (node 6f1c2a9b3d4e at 127.0.0.1 lost)")
    gpus = ClusterView(free={"CPU": 3.0}, total={"CPU": 4.0, "GPU": 2.0}, nodes=[{"CPU": 4.0, "GPU": 2.0}])
    assert shortfall({"CPU": 1, "GPU": 0.5}, gpus) == ("waiting for 0.5 GPUs for a trial: the cluster has 0 GPUs "
                                                       "free of 2")
    assert shortfall({"CPU": 4, "GPU": 1}, gpus) == ("waiting for 4 CPUs and 1 GPU for a trial: the cluster has "
                                                     "3 CPUs free of 4 and 0 GPUs free of 2")
    memory = ClusterView(free={"CPU": 1.0, "memory": 2.0**30}, total={"CPU": 1.0, "memory": 4 * 2.0**30},
                         nodes=[{"CPU": 1.0, "memory": 4 * 2.0**30}])
    assert shortfall({"CPU": 1, "memory": 3 * 2.0**30}, memory) == (
        "waiting for 3.0 GB of memory for a trial: the cluster has 1.0 GB of memory free of 4.0")
    split = ClusterView(free={"CPU": 2.0}, total={"CPU": 2.0}, nodes=[{"CPU": 1.0}, {"CPU": 1.0}])
    assert shortfall({"CPU": 2}, split) == ("waiting for a node with 2 CPUs for a trial: the cluster has that much "
                                            "only over several nodes (the largest has 1 CPU)")


def test_a_trial_that_fits_or_is_starting_is_no_wait() -> None:
    assert shortfall({"CPU": 1}, IDLE) is None
    # Tune placed a group for a trial whose actor is starting: nothing is free, the study's group holds the CPU
    starting = ClusterView(free={"memory": 1.0}, total={"CPU": 1.0}, nodes=[{"CPU": 1.0}], placed={"CPU": 1.0})
    assert shortfall({"CPU": 1}, starting) is None


def test_what_the_studys_placement_groups_hold() -> None:
    # as Ray 2.60 shows a placed group of one 1-CPU bundle (measured), beside another job's group
    ours, theirs = "dc8083a2281971b82099e243f5bb01000000", "0a1b2c3d4e5f60718293a4b5c6d702000000"
    cluster = {"CPU": 2.0, f"CPU_group_{ours}": 1.0, f"CPU_group_0_{ours}": 1.0, f"bundle_group_{ours}": 1000.0,
               f"bundle_group_0_{ours}": 1000.0, f"CPU_group_{theirs}": 1.0, f"GPU_group_{theirs}": 1.0}
    assert _wait._placed(cluster, "01000000") == {"CPU": 1.0, "bundle": 1000.0}
    assert _wait._placed(cluster, "02000000") == {"CPU": 1.0, "GPU": 1.0}
    assert _wait._placed(cluster, "") == {}


def test_a_lost_node_is_said_at_once_then_every_minute_then_the_end_of_the_wait() -> None:
    wait, clock, said, views = _watch(LOST, timeout_min=None)
    _run(wait, clock, 0.5)
    assert len(said) == 1 and said[0] == ("waiting for 1 CPU for a trial: the cluster has 0 CPUs free of 0 (node "
                                          "6f1c2a9b3d4e at 127.0.0.1 lost); no trial has run for 0 s, it waits for "
                                          "as long as it takes (--resource-timeout 0)"), said
    _run(wait, clock, 3 * (_wait.RESOURCE_WAIT_MESSAGE_S + _wait.CHECK_S))
    assert len(said) == 4, said  # repeated every minute (at the first look at the cluster after it)
    views["now"] = IDLE
    _run(wait, clock, 5)
    assert said[-1].startswith("resources are back after 3 min") and said[-1].endswith("trials run again"), said
    _run(wait, clock, 3 * _wait.RESOURCE_WAIT_MESSAGE_S)
    assert len(said) == 5


def test_taken_resources_are_said_after_the_grace_and_again_when_ray_marks_the_node_dead() -> None:
    # a node killed a moment ago: its CPU still counts, nothing is free; Ray marks it dead some 18 s later
    busy = ClusterView(free={}, total={"CPU": 1.0}, nodes=[{"CPU": 0.0}, {"CPU": 1.0}])
    wait, clock, said, views = _watch(busy, timeout_min=None)
    _run(wait, clock, _wait.GRACE_S - 1)
    assert said == []  # a short stall may be a trial starting
    _run(wait, clock, _wait.CHECK_S + 1)
    assert len(said) == 1 and said[0].startswith("waiting for 1 CPU for a trial: the cluster has 0 CPUs free of 1; "
                                                 f"no trial has run for {_wait.GRACE_S:.0f} s"), said
    views["now"] = LOST
    _run(wait, clock, _wait.CHECK_S + 0.5)
    assert len(said) == 2 and "0 CPUs free of 0 (node 6f1c2a9b3d4e at 127.0.0.1 lost)" in said[1], said


def test_running_trials_or_none_pending_is_no_wait_and_asks_ray_only_for_its_nodes() -> None:
    asked, noted = [], []
    wait = ResourceWait({"CPU": 1}, 1.0, print, view=lambda: asked.append(1) or LOST, clock=Clock(),
                        remember=lambda: noted.append(wait.clock.now))
    _run(wait, wait.clock, 120, pending=3, running=1)   # a smaller cluster, still making progress
    _run(wait, wait.clock, 120, pending=0, running=0)   # nothing asked of it (the searcher is done)
    assert asked == []
    assert len(noted) == 8 and noted[0] == pytest.approx(1000.1)  # at once, then every REMEMBER_S (30 s)


def test_resource_timeout_ends_the_wait_with_a_one_line_error() -> None:
    wait, clock, said, _ = _watch(LOST, timeout_min=1.5)
    with pytest.raises(ResourceTimeout) as caught:
        _run(wait, clock, 200)
    text = str(caught.value)
    assert "\n" not in text and text.startswith("waiting for 1 CPU for a trial: the cluster has 0 CPUs free of 0")
    assert re.search(r"; no trial could run for 1 min 3[012] s, so the study stopped \(`resource_timeout` 1.5 min\)$",
                     text), text
    assert 89.9 <= clock.now - 1000.0 <= 92.5   # from the first step no trial could be placed
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 3
    assert said and "the study stops after 1 min 30 s without one (--resource-timeout)" in said[0], said


def test_a_wait_that_ends_restarts_the_timeout() -> None:
    wait, clock, said, views = _watch(LOST, timeout_min=1.0)
    _run(wait, clock, 50)
    views["now"] = IDLE
    _run(wait, clock, 5)
    views["now"] = LOST
    _run(wait, clock, 50)   # 100 s of waiting in all, never 60 s in one go
    with pytest.raises(ResourceTimeout):
        _run(wait, clock, 15)


def test_a_cluster_that_does_not_answer_is_looked_at_again_and_never_ends_the_run() -> None:
    answers = iter([RuntimeError("GCS busy"), LOST, LOST])

    def view():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    said: list[str] = []
    wait = ResourceWait({"CPU": 1}, None, said.append, view=view, clock=Clock(),
                        remember=lambda: 1 / 0)
    _run(wait, wait.clock, 1, pending=0, running=1)  # remember() raising is ignored
    _run(wait, wait.clock, 0.5)                        # the first look raises: nothing said, nothing raised
    assert said == []
    _run(wait, wait.clock, _wait.CHECK_S + 0.1)
    assert len(said) == 1 and "lost" in said[0]


def test_trial_counts() -> None:
    assert trial_counts(["PENDING", "RUNNING", "TERMINATED", "PENDING", "ERROR"]) == (2, 1)


def test_resource_timeout_is_a_study_setting_a_flag_and_resumable() -> None:
    assert StudyConfig().resource_timeout == DEFAULT_RESOURCE_TIMEOUT == 30.0
    args = build_parser().parse_args(["--resource-timeout", "0.5"])
    assert study_config_from_args(args).resource_timeout == 0.5
    assert study_config_from_args(build_parser().parse_args(["--resource-timeout", "0"])).resource_timeout == 0
    assert "resource_timeout" in RESUMABLE
    with pytest.raises(UserError, match="`resource_timeout` is -1"):
        StudyConfig(resource_timeout=-1)
    assert StudyConfig.from_dict({**StudyConfig().to_dict(), "resource_timeout": None}).resource_timeout is None


def test_the_cli_prints_a_timeout_on_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch) -> None:
    from mola_search.search import runner

    def waits_too_long(config, folder, **kwargs):
        raise ResourceTimeout("waiting for 1 CPU for a trial: the cluster has 0 CPUs free of 0; no trial could run "
                              "for 30 s, so the study stopped (`resource_timeout` 0.5 min)")

    monkeypatch.setattr(runner, "run_study", waits_too_long)
    from helpers import search

    folder = tmp_path / "s"
    assert search(["--objective", "synthetic", "--no-pilot", "--trials", "2", "--out", str(folder),
                   "--resource-timeout", "0.5"]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mola-search: error: waiting for 1 CPU for a trial"), err
    assert "(--resource-timeout 0.5 min)" in err and f"`mola-search --resume {folder}` continues the study" in err
