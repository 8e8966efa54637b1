"""A two-node Ray cluster whose nodes do not share a disk: finalists' files reach the driver through Ray.

The cluster is started exactly as README's cluster steps say (`ray start --head ...` on one node,
`ray start --address ...` on the other, token authentication on as Ray ships it), on loopback.
The head has no CPUs, so every trial and finalist runs on the worker node, which is started in a
mount namespace of its own (`unshare -m`) with private tmpfs mounts over the study's parent folder
and the model cache: the worker cannot see the driver's study folder, and what the worker writes
there stays invisible to the driver. Every finalist's metrics, router statistics and adapter must
still be in the driver's study folder afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import (MOLA_SEARCH, RAY, free_port, read_trials, start_process, stop_process,
                     wait_for_nodes)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="needs root and unshare(1) for a private mount namespace"),
              pytest.mark.slow, pytest.mark.netns]  # netns: conftest runs it where 127.0.0.1 is the only address


def test_finalists_on_a_node_without_the_study_folder_reach_the_driver(tmp_path: Path) -> None:
    shared = Path(os.environ.get("MOLA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (shared / "mrpc" / "train.jsonl").is_file():
        pytest.skip(f"no MRPC data at {shared}")
    data = tmp_path / "data" / "mrpc"
    data.mkdir(parents=True)
    for split in ("train", "validation", "test"):  # a handful of real rows: the finalists really train
        rows = (shared / "mrpc" / f"{split}.jsonl").read_text().splitlines()[:12]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    private = tmp_path / "driver"          # the study lives below here; the worker gets its own empty tmpfs here
    cache = tmp_path / "cache"             # and its own model cache
    private.mkdir()
    cache.mkdir()
    (private / "sentinel").write_text("only the driver's disk has this")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "MOLA_CACHE_DIR": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    head = start_process([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "0",
                   "--include-dashboard", "false", "--block"], env, tmp_path / "head.log")
    view = tmp_path / "worker-view.txt"
    worker_script = (f"mount --make-rprivate / && mount -t tmpfs none {private} && mount -t tmpfs none {cache} && "
                     f"(test -e {private}/sentinel && echo sees-driver-files || echo private) > {view} && "
                     f"exec {RAY} start --address {address} --node-ip-address 127.0.0.1 --num-cpus 2 --block")
    worker = None
    try:
        worker = start_process(["unshare", "-m", "sh", "-c", worker_script], env, tmp_path / "worker.log")
        wait_for_nodes(address, env, 2)
        assert view.read_text().strip() == "private", "the worker node must not see the driver's study folder"
        settings = tmp_path / "two.yaml"
        settings.write_text("seed_names: [triangle, rectangle]\nfidelity: {max_train_examples: 8, max_eval_examples: 6,"
                            " rungs: [1.0]}\ntrain: {batch_size: 4, micro_batch_size: 4, cutoff_len: 64}\n")
        folder = private / "study"
        # The driver is its own process, as on a real cluster: a token-mode Ray client must not outlive the
        # test inside pytest (Ray caches its auth mode per process).
        driver = subprocess.run(
            [*MOLA_SEARCH, "--task", "mrpc", "--model", "tiny-llama-L4", "--executor", "ray", "--address", address,
             "--config", str(settings), "--trials", "2", "--budget", "12", "--max-concurrent", "2", "--no-pilot",
             "--finalists", "0", "--max-finalist-runs", "4", "--out", str(folder)],
            env={**env, "MOLA_DATA_DIR": str(tmp_path / "data")}, capture_output=True, text=True, timeout=600)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        rows = read_trials(folder)
        assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], [r["failure"] for r in rows]
        runs = sorted(folder.glob("finalists/*/seed*"))
        assert len(runs) == 4, runs   # a race of 2 rounds x 2 contenders, all trained on the worker node
        for run in runs:
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["test"]["n"] == 12 and metrics["train_seed"] == int(run.name[4:])  # the 12 test rows
            assert (run / "router_stats.json").is_file() and (run / "allocation.json").is_file()
            assert (run / "adapter" / "adapter_config.json").is_file()
            assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        finalists = (folder / "finalists.csv").read_text().splitlines()
        assert len(finalists) == 3 and all(",COMPLETE," in line for line in finalists[1:]), finalists
        nodes = {r["node"] for r in rows}
        assert len(nodes) == 1  # one worker node trained everything (the head has no CPUs)
        best = json.loads((folder / "best_allocation.json").read_text())
        assert best["runs_spent"] == 4 and best["rounds"] == 2, best  # the race's runs reached the driver
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(head)
