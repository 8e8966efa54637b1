"""`mola-search` on a real two-node Ray cluster: failing and dying trials, ASHA, scale-out, kill + resume.

One cluster for the module: a head node and a second raylet, one CPU each, started on this
machine with `ray.cluster_utils.Cluster` (real GCS + raylet processes, the same ones `ray start`
runs) and shut down by the fixture, which only stops the processes it started (never
`ray stop --force`, which would also end other Ray sessions on the machine). Every study here
connects with `--address`, so trials are scheduled over both nodes like on a real cluster.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from optuna.trial import TrialState

from mola_search.search.config import StudyConfig
from mola_search.search.context import resolve_space
from helpers import MODEL, key, kill_mid_study_and_resume, load_study, read_trials, search, trained

BASE = ["--task", "mrpc", "--model", MODEL, "--objective", "synthetic:upper", "--executor", "ray",
        "--max-concurrent", "2", "--cpus-per-trial", "1", "--finalist-seeds", "0", "--no-pilot"]
FAULTS = "raise@1,nan@2,oom@3,kill@4"
pytestmark = [pytest.mark.slow, pytest.mark.netns]  # netns: conftest runs it where 127.0.0.1 is the only address


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    _disconnect()
    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(f"two-node cluster at {cluster.address} up in {time.time() - started:.1f} s")
        yield cluster
    finally:
        _disconnect()
        cluster.shutdown()


def test_the_cluster_lives_on_loopback_only(cluster) -> None:
    """conftest runs this module in a private network namespace: no address but 127.0.0.1 for Ray to take."""
    import socket

    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    nodes = [cluster.head_node, *cluster.worker_nodes]
    assert len(nodes) == 2 and {node.node_ip_address for node in nodes} == {"127.0.0.1"}
    assert cluster.address.startswith("127.0.0.1:")


def node_ids(cluster) -> set[str]:
    return {node.node_id[:12] for node in [cluster.head_node, *cluster.worker_nodes]}


@pytest.fixture(scope="module")
def ray_study(cluster, tmp_path_factory) -> Path:
    """12 trials over both nodes, 2 at a time (0.5 s per rung), trials 1-4 raise / NaN / OOM / kill their worker."""
    folder = tmp_path_factory.mktemp("ray") / "study"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLA_SYNTHETIC_DELAY", "0.5")
        mp.setenv("MOLA_SEARCH_FAULTS", FAULTS)
        try:
            rc = search([*BASE, "--trials", "12", "--out", str(folder), "--address", cluster.address])
        finally:
            _disconnect()
    assert rc == 0
    return folder


def test_failing_and_dying_trials_are_failed_with_a_reason_and_the_study_finishes(ray_study: Path) -> None:
    rows = {int(r["number"]): r for r in read_trials(ray_study)}
    assert rows[1]["state"] == "FAIL" and "RuntimeError: injected failure in trial 1" in rows[1]["failure"]
    assert rows[2]["state"] == "FAIL" and "nan" in rows[2]["failure"].lower()
    assert rows[3]["state"] == "FAIL" and rows[3]["failure"].startswith("out of memory")
    assert rows[4]["state"] == "FAIL" and "worker died" in rows[4]["failure"]  # SIGKILL of the Ray worker
    assert all(r["failure"] == "" for n, r in rows.items() if n not in (1, 2, 3, 4) and r["duplicate_of"] == "")
    assert len(trained(list(rows.values()))) == 12
    assert (ray_study / "summary.md").is_file() and "4 failed" in (ray_study / "summary.md").read_text()


def test_asha_stopped_trials_are_pruned_with_their_rung_scores(ray_study: Path) -> None:
    rungs = len(resolve_space(StudyConfig.load(ray_study)).fidelity.rungs)
    assert rungs >= 2
    trials = load_study(ray_study).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert complete and pruned, "ASHA should have stopped some of 8 healthy trials at the first rung"
    for t in complete:  # never a partial score: every rung was reached and the value is the last one
        assert sorted(t.intermediate_values) == list(range(1, rungs + 1)), t.number
        assert t.value == t.intermediate_values[rungs]
    for t in pruned:
        assert 1 <= len(t.intermediate_values) < rungs, t.number
    rows = {int(r["number"]): r for r in read_trials(ray_study)}
    for t in pruned:
        assert rows[t.number]["score"] == "" and rows[t.number]["rung_scores"] != ""


def test_trials_ran_on_both_nodes_into_one_optuna_storage(ray_study: Path, cluster) -> None:
    rows = read_trials(ray_study)
    nodes = {r["node"] for r in trained(rows) if r["node"]}
    assert len(nodes) == 2 and nodes == node_ids(cluster), nodes
    # One storage: the study folder's sqlite file holds every trial, whichever node trained it.
    assert not StudyConfig.load(ray_study).storage and (ray_study / "study.db").is_file()
    stored = load_study(ray_study).trials
    assert {t.user_attrs.get("node") for t in stored if t.user_attrs.get("node")} == nodes
    assert len([t for t in stored if t.state != TrialState.WAITING]) == len(rows)
    # Trials overlapped: two ran at the same time (each rung sleeps 0.5 s).
    assert StudyConfig.load(ray_study).max_concurrent == 2
    spans = sorted((t.datetime_start, t.datetime_complete) for t in stored
                   if t.datetime_complete and "duplicate_of" not in t.user_attrs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials overlapped"


def test_parallel_trials_never_train_one_allocation_twice(ray_study: Path) -> None:
    rows = read_trials(ray_study)
    ok = [r for r in trained(rows) if r["state"] != "FAIL"]  # a failed allocation may rightly be tried again
    assert len({key(r) for r in ok}) == len(ok)
    by_number = {r["number"]: r for r in rows}
    for d in (r for r in rows if r["duplicate_of"] != ""):  # answered from the cache, or refused while running
        assert key(d) == key(by_number[d["duplicate_of"]])
        assert d["state"] != "FAIL" or "still running" in d["failure"]


def test_kill_9_of_a_ray_study_then_resume_loses_and_reruns_nothing(cluster, tmp_path: Path) -> None:
    env = {**os.environ, "MOLA_SYNTHETIC_DELAY": "0.5"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    try:
        figures = kill_mid_study_and_resume(tmp_path / "killed", [*BASE, "--address", cluster.address], trials=10,
                                            kill_after=4, env=env, resume=[], timeout=150)
    finally:
        _disconnect()
    assert figures["trained_after_resume"] == 10 and figures["duplicates_trained"] == 0


def test_ctrl_c_stops_a_ray_study_which_resume_then_finishes(cluster, tmp_path: Path) -> None:
    """Tune's own SIGINT handler would end the phase quietly and let the study summarise runs it never
    finished; Ctrl-C must stop the study instead, and `--resume` continue it."""
    env = {**os.environ, "MOLA_SYNTHETIC_DELAY": "0.5"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    try:
        figures = kill_mid_study_and_resume(tmp_path / "interrupted", [*BASE, "--address", cluster.address],
                                            trials=8, kill_after=3, env=env, resume=[], timeout=150,
                                            sig=signal.SIGINT)
    finally:
        _disconnect()
    assert figures["trained_after_resume"] == 8 and figures["duplicates_trained"] == 0


def test_relative_data_dir_and_out_reach_ray_trials_and_finalists(cluster, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    """README's own command uses `MOLA_DATA_DIR=../shared/data` and a relative `runs/<study>`. Ray Tune runs
    each trial in a working directory of its own, where neither path means anything: the driver pins them."""
    shared = Path(os.environ.get("MOLA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (shared / "mrpc" / "train.jsonl").is_file():
        pytest.skip(f"no MRPC data at {shared}")
    (tmp_path / "data" / "mrpc").mkdir(parents=True)
    for split in ("train", "validation", "test"):  # a handful of real rows, so the trials really train
        rows = (shared / "mrpc" / f"{split}.jsonl").read_text().splitlines()[:12]
        (tmp_path / "data" / "mrpc" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MOLA_DATA_DIR", "../data")
    monkeypatch.delenv("MOLA_SEARCH_FAULTS", raising=False)
    spaces = tmp_path / "two.yaml"
    spaces.write_text("seed_names: [triangle, rectangle]\nfidelity: {max_train_examples: 8, max_eval_examples: 6,"
                      " rungs: [1.0]}\ntrain: {batch_size: 4, micro_batch_size: 4, cutoff_len: 64}\n")
    try:
        rc = search(["--task", "mrpc", "--model", "tiny-llama-L4", "--executor", "ray", "--address", cluster.address,
                     "--config", str(spaces), "--trials", "2", "--budget", "12", "--max-concurrent", "2",
                     "--finalists", "0", "--max-finalist-runs", "2", "--no-pilot", "--out", "runs/rel"])
    finally:
        _disconnect()
    assert rc == 0
    folder = work / "runs" / "rel"
    rows = read_trials(folder)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], [r["failure"] for r in rows]
    assert StudyConfig.load(folder).data_dir == str(tmp_path / "data")
    metrics = sorted(folder.glob("finalists/*/seed1000/metrics.json"))
    assert len(metrics) == 2, metrics  # written by Ray trials, into the study folder, not their own cwd
    assert (folder / "best_allocation.json").is_file()
    out = capsys.readouterr().out  # each run of the race is announced as it ends, with an ETA
    assert "[race 1/2]" in out and "[race 2/2]" in out and "ETA" in out, out


def test_a_user_objective_from_a_module_workers_cannot_import_runs_on_ray(cluster, tmp_path: Path, capsys) -> None:
    """run_study(config, objective=fn) with fn from this test folder, which Ray workers do not have on their
    path: the function reaches them by value; trials, pilot runs and finalists get its scores. Without
    --max-concurrent, each phase runs as many trials as the cluster holds (2 CPUs here) and says why."""
    from helpers import _config, _rows, _value, peak_in_the_middle

    from mola_search.search.runner import run_study

    config = replace(_config(tmp_path, trials=10, pilot_seeds=2, finalist_seeds=1, max_finalist_runs=4),
                     executor="ray", address=cluster.address, cpus_per_trial=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MOLA_TEST_STUDY", str(tmp_path / "s"))
            run_study(config, tmp_path / "s", objective=peak_in_the_middle)
    finally:
        _disconnect()
    seen = [int(x) for x in (tmp_path / "seen.txt").read_text().split()]
    assert max(seen) >= 7, seen  # the last search trials started after trials.csv listed the pilot and more
    rows = _rows(tmp_path / "s" / "trials.csv")
    assert [r["state"] for r in rows].count("COMPLETE") == 10, [r["failure"] for r in rows]
    assert all(float(r["score"]) == pytest.approx(_value(r["allocation"], int(r["train_seed"]))) for r in rows)
    assert len({r["node"] for r in rows}) == 2  # both nodes ran some
    fin = _rows(tmp_path / "s" / "finalists.csv")
    assert fin and all(r["state"] == "COMPLETE" for r in fin), fin
    out = capsys.readouterr().out
    assert "pilot: max concurrent 2 (auto: 2 CPU slots" in out and "GB per trial, estimated)" in out, out
    assert "racing: max concurrent 2 (auto: 2 CPU slots" in out and "GB per trial, measured)" in out, out
    stored = load_study(tmp_path / "s").trials
    assert all(t.user_attrs.get("peak_rss_mb", 0) > 50 for t in stored)  # every trial measured its memory


@pytest.mark.parametrize("extra, needle", [
    (["--gpus-per-trial", "1"], "--gpus-per-trial 1: the Ray cluster has 0 GPU(s) in all"),
    (["--cpus-per-trial", "8"], "--cpus-per-trial 8: the Ray cluster has 2 CPU(s) in all"),
])
def test_infeasible_trial_resources_are_one_line_before_any_folder(cluster, tmp_path: Path, capsys, extra, needle):
    """Tune would wait forever for a placement no node can give: refused up front instead."""
    folder = tmp_path / "s"
    try:
        rc = search([*BASE, "--trials", "2", "--address", cluster.address, "--out", str(folder), *extra])
    finally:
        _disconnect()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err
    assert not folder.exists()


def test_unreachable_cluster_is_one_line_before_any_folder(tmp_path: Path, capsys):
    folder = tmp_path / "s"
    started = time.time()
    try:
        rc = search([*BASE, "--trials", "2", "--address", "127.0.0.1:1", "--out", str(folder)])
    finally:
        _disconnect()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot connect to the Ray cluster at '127.0.0.1:1'" in err and "\n" not in err, err
    assert "RAY_AUTH_MODE=token" in err and not folder.exists()
    print(f"unreachable address refused after {time.time() - started:.1f} s")


def test_tune_giving_up_fails_the_runs_it_lost_and_resume_reruns_them(cluster, tmp_path: Path, monkeypatch, capsys):
    """Ray's memory monitor can kill a run's actor while Tune starts it; Tune then raises out of fit()
    ("Caught unexpected exception: ... killed due to the node running low on memory"). The study must
    retry the lost finalist runs once, record them as failed with that reason when the retry is lost too, finish,
    and rerun them on --resume."""
    from ray import tune

    real_fit = tune.Tuner.fit
    calls = {"n": 0}

    def flaky_fit(self):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the first Tuner runs the search, the second the finalists, the third their retry
            raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node running low "
                               "on memory.")
        return real_fit(self)

    monkeypatch.setattr(tune.Tuner, "fit", flaky_fit)
    monkeypatch.delenv("MOLA_SEARCH_FAULTS", raising=False)
    folder = tmp_path / "lost"
    argv = [*BASE[:-3], "--no-pilot", "--trials", "3", "--finalists", "0", "--finalist-seeds", "2", "--no-racing",
            "--address", cluster.address, "--out", str(folder)]
    try:
        assert search(argv) == 0
    finally:
        _disconnect()
    rows = (folder / "finalists.csv").read_text().splitlines()[1:]
    assert rows and all(",FAIL," in r and "out of memory" in r and "resume" in r for r in rows), rows
    assert not list(folder.glob("finalists/*/seed*/metrics.json"))
    try:
        assert search(["--resume", str(folder), "--address", cluster.address]) == 0
    finally:
        _disconnect()
    rows = (folder / "finalists.csv").read_text().splitlines()[1:]
    assert rows and all(",COMPLETE," in r for r in rows), rows
    assert len(list(folder.glob("finalists/*/seed*/metrics.json"))) == 2 * len(rows)
