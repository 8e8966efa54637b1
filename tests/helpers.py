"""Helpers shared by several test files, so that no test file imports another.

Four groups, each moved here from the test file that first had it:

* `mola-search` end to end (from test_search.py): the CLI in this process (`search`) or as its own process
  (`MOLA_SEARCH`), trials.csv and the Optuna study of a folder, and kill-mid-study-then-resume.
* study folders built in code (from test_results.py): `make_study`, `effect_study` and their parts.
* a user objective (from test_objective.py): `peak_in_the_middle` and the rows/values it is checked with.
* Ray nodes as `ray start` processes (from test_cluster_disks.py; test_node_loss.py kills one): a free port,
  starting and stopping a node in a session of its own, waiting for the cluster's node count, and kill -9 of
  every process of a node's session (its raylet, agents and workers; Ray gives workers process groups of their
  own, not sessions).

This file holds no tests. It is on sys.path as `helpers` because tests/ (no __init__.py) is the rootdir
of its test modules (pytest's default "prepend" import mode).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mola_search.cli.common import run_main
from mola_search.cli.search import main
from mola_search.search.config import StudyConfig
from mola_search.trial.objective import ObjectiveTrial

# ------------------------------------------------------------------------------------------ the real task data

# MRPC's JSON Lines, as README's commands find them: $MOLA_DATA_DIR, else shared/data next to the repository.
DATA_DIR = os.environ.get("MOLA_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (Path(DATA_DIR) / "mrpc" / "train.jsonl").is_file(),
                                reason=f"no MRPC data under {DATA_DIR} (set MOLA_DATA_DIR or place shared/data next "
                                       "to the repository)")

# ------------------------------------------------------------------------------------------ mola-search end to end

MODEL = "tiny-llama-L8"
_ENTRY = "from mola_search.cli.search import entry; raise SystemExit(entry())"
MOLA_SEARCH = [sys.executable, "-c", _ENTRY]
# As a terminal's foreground job runs it: a test runner started in the background (`cmd &` in a script) ignores
# SIGINT, and its children would inherit that and never see a Ctrl-C.
MOLA_SEARCH_FOREGROUND = [sys.executable, "-c",
                          "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + _ENTRY]


def search(argv: list[str]) -> int:
    return run_main("mola-search", main, argv)


def read_trials(folder: Path) -> list[dict[str, str]]:
    with (folder / "trials.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def key(row: dict[str, str]) -> tuple[str, str, str]:
    return row["allocation"], row["top_k"], row["rank"]


def trained(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Trials that really trained: not answered from the cache, not interrupted by a killed study."""
    return [r for r in rows if r["state"] in ("COMPLETE", "PRUNED", "FAIL") and r["duplicate_of"] == ""
            and "interrupted" not in r["failure"]]


def load_study(folder: Path) -> optuna.Study:
    config = StudyConfig.load(folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=config.study_name,
                             storage=config.storage or f"sqlite:///{(folder / 'study.db').resolve()}")


def _finished(folder: Path) -> int:
    if not (folder / "study.json").is_file() or not (folder / "study.db").is_file():
        return 0
    try:
        study = load_study(folder)
    except Exception:  # noqa: BLE001 - the study is not created yet
        return 0
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def kill_mid_study_and_resume(folder: Path, argv: list[str], trials: int, kill_after: int, *,
                              env: dict[str, str], resume: list[str], timeout: float = 120.0,
                              sig: int = signal.SIGKILL) -> dict[str, int]:
    """Start `mola-search` as its own process group, send the whole group `sig` (SIGKILL; SIGINT as a
    terminal's Ctrl-C does) once `kill_after` trials finished, resume it in this process, and check that
    nothing finished was lost or re-run."""
    log = (folder.parent / f"{folder.name}.log").open("w")
    proc = subprocess.Popen([*MOLA_SEARCH_FOREGROUND, *argv, "--out", str(folder), "--trials", str(trials)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while _finished(folder) < kill_after:
            assert proc.poll() is None, (folder.parent / f"{folder.name}.log").read_text()[-3000:]
            assert time.time() < deadline, "the study did not get going"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (folder.parent / f"{folder.name}.log").read_text()
    if sig == signal.SIGINT:  # stopped, said so, and summarised nothing it did not finish
        assert proc.returncode == 130, output[-3000:]
        assert f"mola-search --resume {folder}" in output and "done in" not in output
        assert not (folder / "summary.md").exists()
    else:
        assert proc.returncode == -sig
    before = {t.number: t for t in load_study(folder).trials}
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    done_before = {n: t for n, t in before.items() if t.state in finished}
    running_before = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert len(done_before) >= kill_after

    assert search(["--resume", str(folder), *resume]) == 0

    after = {t.number: t for t in load_study(folder).trials}
    for n, t in done_before.items():  # nothing finished was lost or changed
        a = after[n]
        assert (a.state, a.value, a.intermediate_values) == (t.state, t.value, t.intermediate_values)
        assert a.params == t.params
        assert a.user_attrs == t.user_attrs
    for n in running_before:  # interrupted trials: failed with a reason and queued again
        assert after[n].state == TrialState.FAIL and "interrupted" in after[n].user_attrs["failure"]
        assert any(t.user_attrs.get("retry_of") == n for t in after.values())
    rows = read_trials(folder)
    runs = trained(rows)
    keys = [key(r) for r in runs]
    assert len(runs) == trials, "trained trials must add up to --trials"
    assert len(set(keys)) == len(keys), "an allocation was trained twice"
    assert all(t.state != TrialState.RUNNING for t in after.values())
    assert (folder / "summary.md").is_file()
    figures = {"finished_before_kill": len(done_before), "running_at_kill": len(running_before),
               "trained_after_resume": len(runs), "duplicates_trained": len(keys) - len(set(keys)),
               "cache_answers": sum(1 for r in rows if r["duplicate_of"] != "")}
    print(f"resume figures ({folder.name}): {figures}")
    return figures


L, BUDGET = 8, 40
SHAPES = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")
FINALIST_SEEDS = (1000, 1001, 1002)


# ------------------------------------------------------------------------------------------ study builder


def shape(name: str) -> tuple[int, ...]:
    from mola_search.allocation import shape_allocation

    return tuple(shape_allocation(name, L, BUDGET, 1, 8))


def random_allocations(n: int, seed: int) -> list[tuple[int, ...]]:
    from mola_search.allocation import round_to_budget

    rng = np.random.default_rng(seed)
    return [tuple(round_to_budget(list(rng.random(L) + 0.05), BUDGET, 1, 8)) for _ in range(n)]


def trial(origin: str, allocation: Sequence[int], value: float, *, train_seed: int | None = 0,
          pilot: bool = False) -> dict:
    """One completed trial; train_seed=None writes an old-format trial (no train_seed, pilot, metrics)."""
    return {"origin": origin, "allocation": tuple(allocation), "value": float(value), "train_seed": train_seed,
            "pilot": pilot}


def run_metrics(train_seed: int, val: float, test: Sequence[float], correct: Sequence[int],
                ids: Sequence[str] | None = None, *, val_acc: float = 0.7, metric: str = "gold_logprob",
                extra: dict | None = None) -> dict:
    """A finalist run's metrics.json (contract format); per-example arrays in the order of `ids`."""
    ids = list(ids) if ids is not None else [f"ex{i:04d}" for i in range(len(test))]
    test, correct = [float(v) for v in test], [int(c) for c in correct]
    return {"train_seed": train_seed, "metric": metric,
            "validation": {"accuracy": val_acc, "gold_logprob": val, "margin": 2 * val, "n": 100,
                           "majority_baseline": 0.6},
            "test": {"accuracy": sum(correct) / len(correct), "gold_logprob": sum(test) / len(test),
                     "margin": 2 * sum(test) / len(test), "n": len(test), "majority_baseline": 0.6, **(extra or {}),
                     "per_example": {"ids": ids, "gold_logprob": test, "margin": [2 * v for v in test],
                                     "correct": correct}}}


def old_metrics(val_acc: float, test_acc: float, majority: float = 0.6) -> dict:
    """A finalist run of a study written before the continuous metric: accuracy only, no per-example data."""
    return {"validation": {"accuracy": val_acc}, "test": {"accuracy": test_acc, "majority_baseline": majority}}


def finalist(number: int, origin: str, allocation: Sequence[int], runs: dict[int, dict]) -> dict:
    return {"number": number, "origin": origin, "allocation": tuple(allocation), "runs": runs}


def make_study(folder: Path, trials: Sequence[dict], finalists: Sequence[dict] = (), *, noise: dict | None = None,
               noise_rounds: Sequence[tuple[dict, dict]] = (), best: dict | None = None, old: bool = False,
               finished: bool = True, **config) -> Path:
    """Write a study folder: study.json, study.db (Optuna, trials added in order), finalists, noise.json.

    `noise`: pilot scores {allocation: {seed: score}}; `noise_rounds`: earlier --auto-fidelity rounds
    as (scores, fidelity) pairs."""
    import optuna
    from optuna.distributions import FloatDistribution

    from mola_search.search.config import StudyConfig

    folder.mkdir(parents=True)
    cfg = StudyConfig(**{"task": "mrpc", "model": "tiny-llama-L8", "objective": "synthetic:sparse",
                         "space": "per_layer", "sampler": "random", "executor": "local", "scheduler": "none",
                         "study_name": folder.name, "finalist_seeds": 3, "out": str(folder), **config})
    cfg.save(folder)
    if old:  # a study.json written before the metric existed
        raw = json.loads((folder / "study.json").read_text())
        raw.pop("metric", None)
        (folder / "study.json").write_text(json.dumps(raw))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}",
                                direction="maximize")
    study.set_user_attr("num_layers", L)
    study.set_user_attr("budget", BUDGET)
    for t in trials:
        alloc = t["allocation"]
        attrs = {"origin": t["origin"], "allocation": list(alloc), "top_k": [min(2, c) for c in alloc],
                 "rank": [8] * len(alloc)}
        if t["train_seed"] is not None:
            attrs.update(train_seed=t["train_seed"], pilot=t["pilot"],
                         metrics={"gold_logprob": t["value"], "accuracy": 0.7, "margin": 2 * t["value"]})
        params = {f"w_layer{j:02d}": c / BUDGET for j, c in enumerate(alloc)}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: FloatDistribution(0.0, 1.0) for k in params}, value=t["value"],
            user_attrs=attrs))
    for f in finalists:
        label = f"t{f['number']:03d}-{f['origin'].replace(':', '_')}"
        for seed, metrics in f["runs"].items():
            run = folder / "finalists" / label / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(metrics))
    if noise is not None:
        from mola_search.search.study import StudyFolder
        from mola_search.stats.noise import estimate_noise

        StudyFolder(folder).write_noise(estimate_noise(noise), [estimate_noise(sc, fidelity=fid) for sc, fid in noise_rounds])
    if best is not None:
        (folder / "best_allocation.json").write_text(json.dumps(best))
    if finished:
        (folder / "summary.md").write_text("# finished\n")
    return folder


def effect_study(folder: Path, score: Callable[[tuple[int, ...], np.random.Generator], float], *, n: int = 30,
                 seed: int = 0, seed_sd: float = 0.2, noise: bool = True, **kwargs) -> Path:
    """Shape seeds + `n` random trials at seed 0, pilot replicates (3 shapes x seeds 1, 2), and
    finalists (2 searched + 3 shapes x seeds 1000..1002). Every training seed adds its own offset
    (sd `seed_sd`) to every run it trains: only a seed-blocked analysis sees through it."""
    rng = np.random.default_rng(seed)
    offset = {s: float(rng.normal(0, seed_sd)) for s in (0, 1, 2, *FINALIST_SEEDS)}
    pilots = ("triangle", "inverted_triangle", "rectangle")
    trials = [trial(f"seed:{s}", shape(s), score(shape(s), rng) + offset[0], pilot=s in pilots) for s in SHAPES]
    searched = random_allocations(n, seed + 1)
    trials += [trial("random", a, score(a, rng) + offset[0]) for a in searched]
    pilot = {s: {0: trials[SHAPES.index(s)]["value"]} for s in pilots}
    for k in (1, 2):
        for s in pilots:
            pilot[s][k] = score(shape(s), rng) + offset[k]
            trials.append(trial(f"seed:{s}", shape(s), pilot[s][k], train_seed=k, pilot=True))
    top = sorted(range(n), key=lambda i: -trials[len(SHAPES) + i]["value"])[:2]
    fins = [finalist(len(SHAPES) + i, "random", searched[i], {}) for i in top]
    fins += [finalist(SHAPES.index(s), f"seed:{s}", shape(s), {}) for s in pilots]
    for f in fins:
        for k in FINALIST_SEEDS:
            v = score(f["allocation"], rng) + offset[k]
            test = v + rng.normal(0, 0.3, 60)
            f["runs"][k] = run_metrics(k, v, test, (test > v).astype(int))
    return make_study(folder, trials, fins, noise=pilot if noise else None, **kwargs)


# ------------------------------------------------------------------------------------------ a user objective

CALLS: list[dict] = []  # what the objective was given, in this process (the local executor)


def peak_in_the_middle(trial: ObjectiveTrial):
    """Deterministic: more experts in layers 3-4 is better; intermediate rungs report a fraction of the score.

    With $MOLA_TEST_STUDY set (MOLA_* variables reach Ray workers too), each call first notes how many
    finished trials the study's trials.csv already lists."""
    import os

    study = os.environ.get("MOLA_TEST_STUDY")
    if study and not trial.final:
        csv_path = Path(study) / "trials.csv"
        rows = len(_rows(csv_path)) if csv_path.is_file() else 0
        with (Path(study).parent / "seen.txt").open("a") as f:
            f.write(f"{rows}\n")
    experts = trial.spec.experts
    value = sum(experts[3:5]) / sum(experts) - 0.001 * trial.train_seed
    CALLS.append({"experts": experts, "seed": trial.train_seed, "final": trial.final, "rungs": trial.rungs})
    for fraction in trial.rungs[:-1]:
        trial.report(value * fraction)
    if trial.final:
        return {"validation": value, "test": value - 0.01}
    return value


def _config(tmp_path: Path, **kw) -> StudyConfig:
    return StudyConfig(**{"task": "mrpc", "model": MODEL, "executor": "local", "trials": 10, "sampler": "random",
                          "seed_names": ["rectangle"],
                          "scheduler": "none", "pilot_seeds": 2, "finalist_seeds": 2, "finalist_top_n": 1,
                          "finalist_shapes": ["rectangle"], "study_name": "s", "out": str(tmp_path / "s"), **kw})


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _value(allocation: str, seed: int) -> float:
    experts = [int(x) for x in allocation.split(",")]
    return sum(experts[3:5]) / sum(experts) - 0.001 * seed


# ------------------------------------------------------------------------------------------ ray start nodes

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`argv` in a session of its own (its pid is the session id), output to `log`."""
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue


def kill_session(sid: int) -> list[int]:
    """kill -9 of every process in session `sid` (a node `start_process` started: `ray start`, its raylet, agents
    and the workers the raylet forked, which Ray puts in process groups of their own); returns their pids."""
    killed = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
                killed.append(int(stat.parent.name))
            except ProcessLookupError:
                pass
    return killed


def wait_for_nodes(address: str, env: dict[str, str], count: int, timeout: float = 120) -> None:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not reach {count} nodes: {out.stdout[-500:]} {out.stderr[-1500:]}")
