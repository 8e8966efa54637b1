"""`mola-search` end to end with the in-process executor on the synthetic objective (seconds, no training).

Seeds first and marked, duplicates answered from the cache, the storage, failing trials,
`kill -9` + `--resume`, one-line errors for bad input, and `export`. The Ray executor (faults,
ASHA, a two-node cluster, resume) is tested in tests/test_search_ray.py.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mola_search.search.config import StudyConfig
from mola_search.search.context import resolve_space
from mola_search.search.seeds import SEED_SHAPES
from helpers import MODEL, MOLA_SEARCH, key, kill_mid_study_and_resume, load_study, read_trials, search, trained

SEEDS = (*SEED_SHAPES, "alphalora")
BASE = ["--task", "mrpc", "--model", MODEL, "--objective", "synthetic:upper", "--executor", "local", "--no-pilot"]

# ------------------------------------------------------------------------------------------ helpers


def assert_one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("mola-search: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------------ one study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A small local study whose budget makes two seeds coincide (rectangle == triangle at 12 experts
    over 8 layers) and leaves the sampler few new allocations, so duplicates are certain."""
    folder = tmp_path_factory.mktemp("local") / "study"
    assert search([*BASE, "--budget", "12", "--trials", "8", "--out", str(folder),
                   "--finalists", "1", "--finalist-seeds", "2"]) == 0
    return folder


def test_outputs_and_storage_are_in_the_study_folder(study: Path) -> None:
    for name in ("study.json", "study.db", "trials.csv", "summary.md", "finalists.csv", "best_allocation.json"):
        assert (study / name).is_file(), name
    config = StudyConfig.load(study)
    assert config.storage is None  # default: the sqlite file in the folder
    assert len(load_study(study).trials) == len(read_trials(study))


def test_seeds_run_first_and_are_marked_as_seeds(study: Path) -> None:
    rows = read_trials(study)
    assert [r["origin"] for r in rows[:len(SEEDS)]] == [f"seed:{name}" for name in SEEDS]
    assert [int(r["number"]) for r in rows[:len(SEEDS)]] == list(range(len(SEEDS)))
    assert all(not r["origin"].startswith("seed:") for r in rows[len(SEEDS):])
    assert all(r["origin"] == "tpe" for r in rows[len(SEEDS):])
    finalists = list(csv.DictReader((study / "finalists.csv").open()))
    shapes = StudyConfig.load(study).finalist_shapes or SEEDS  # the preset may retrain only some seeds
    assert {f["origin"] for f in finalists} >= {f"seed:{n}" for n in shapes if n != "rectangle"}
    summary = (study / "summary.md").read_text()
    assert "| triangle |" in summary  # the seeded baseline is a row of the result table


def test_identical_allocations_are_never_trained_twice(study: Path) -> None:
    rows = read_trials(study)
    by_number = {r["number"]: r for r in rows}
    runs = trained(rows)
    assert len({key(r) for r in runs}) == len(runs), "an allocation was trained twice"
    dups = [r for r in rows if r["duplicate_of"] != ""]
    assert dups, "the budget leaves few allocations: duplicates were expected"
    # The two coinciding seeds: the second is answered from the first one's cache, still marked as a seed.
    rect = next(r for r in rows if r["origin"] == "seed:rectangle")
    assert rect["duplicate_of"] == "0" and key(rect) == key(rows[0])
    for d in dups:
        twin = by_number[d["duplicate_of"]]
        assert key(d) == key(twin) and twin["duplicate_of"] == ""
        assert d["wall_time_s"] == "" and d["node"] == ""  # nothing ran
        if twin["state"] in ("COMPLETE", "PRUNED"):
            assert d["state"] == twin["state"] and d["score"] == twin["score"]
            assert d["rung_scores"] == twin["rung_scores"]
    assert len(runs) <= 8


def test_complete_trials_report_every_rung_and_pruned_ones_fewer(study: Path) -> None:
    rungs = len(resolve_space(StudyConfig.load(study)).fidelity.rungs)
    assert rungs >= 2
    for t in load_study(study).trials:
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == rungs and t.value == t.intermediate_values[rungs]
        elif t.state == TrialState.PRUNED:
            # Optuna keeps a pruned trial's last rung score as its value; the state says it stopped early
            assert 1 <= len(t.intermediate_values) < rungs
            assert t.value in (None, t.intermediate_values[max(t.intermediate_values)])
    assert all(r["score"] == "" for r in read_trials(study) if r["state"] == "PRUNED")


def test_export_json_and_mola_flags(study: Path, capsys, tmp_path: Path) -> None:
    best = json.loads((study / "best_allocation.json").read_text())
    assert search(["export", str(study), "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["experts"] == best["experts"] and sum(exported["experts"]) == 12
    assert len(exported["experts"]) == 8 and exported["top_k"] == best["top_k"] and exported["rank"] == best["rank"]
    assert exported["test_mean"] == best["test_mean"]
    # tiny-llama uses grouped-query attention, which the official MoLA code cannot run: one line, exit 2,
    # nothing written (tests/test_official.py checks the flags for a LLaMA it can run)
    out = tmp_path / "flags.txt"
    rc = search(["export", str(study), "--format", "mola-flags", "--output", str(out)])
    assert_one_line_error(capsys, rc, "official MoLA code cannot train", "grouped-query attention")
    assert not out.exists()


def test_export_without_finalists_takes_the_best_search_trial(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "nofinal"
    assert search([*BASE, "--trials", "3", "--out", str(folder), "--finalist-seeds", "0"]) == 0
    capsys.readouterr()
    assert search(["export", str(folder)]) == 0
    exported = json.loads(capsys.readouterr().out)
    done = [r for r in read_trials(folder) if r["state"] == "COMPLETE"]
    best = max(done, key=lambda r: float(r["score"]))
    assert exported["experts"] == [int(c) for c in best["allocation"].split(",")]
    assert exported["origin"] == best["origin"] and sum(exported["experts"]) == 40


def test_storage_accepts_an_rdb_url_and_resume_uses_it(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "db"
    elsewhere.mkdir()
    url = f"sqlite:///{elsewhere / 'shared.db'}"
    folder = tmp_path / "remote"
    assert search([*BASE, "--trials", "2", "--storage", url, "--study-name", "remote-storage", "--out", str(folder),
                   "--finalist-seeds", "0"]) == 0
    assert not (folder / "study.db").exists() and (elsewhere / "shared.db").is_file()
    study = optuna.load_study(study_name="remote-storage", storage=url)
    ran = lambda study: [t.user_attrs["origin"] for t in study.trials if t.state != TrialState.WAITING]  # noqa: E731
    assert ran(study) == ["seed:triangle", "seed:inverted_triangle"]
    assert search(["--resume", str(folder), "--trials", "3"]) == 0
    study = optuna.load_study(study_name="remote-storage", storage=url)
    assert ran(study) == ["seed:triangle", "seed:inverted_triangle", "seed:hourglass"]
    assert len(read_trials(folder)) == 3
    capsys.readouterr()
    assert search(["export", str(folder)]) == 0
    assert sum(json.loads(capsys.readouterr().out)["experts"]) == 40


def test_resume_may_change_the_finalist_seeds_and_keeps_finished_runs(tmp_path: Path) -> None:
    folder = tmp_path / "seeds"
    assert search([*BASE, "--trials", "2", "--finalists", "0", "--finalist-seeds", "1", "--no-racing", "--out",
                   str(folder)]) == 0

    def runs() -> dict[str, float]:
        return {str(p.parent.relative_to(folder)): p.stat().st_mtime_ns for p in folder.glob("finalists/**/metrics.json")}

    def seeds() -> set[tuple[str, ...]]:
        return {tuple(re.findall(r"\d+", f["seeds"])) for f in csv.DictReader((folder / "finalists.csv").open())}

    first = runs()
    assert len(first) == 2 and seeds() == {("1000",)}  # triangle and inverted_triangle
    assert search(["--resume", str(folder), "--finalist-seeds", "2"]) == 0
    second = runs()
    assert len(second) == 4 and {k: second[k] for k in first} == first  # seed 1001 added, seed 1000 not rerun
    assert seeds() == {("1000", "1001")} and StudyConfig.load(folder).finalist_seeds == 2
    assert search(["--resume", str(folder), "--finalist-seeds", "1"]) == 0
    assert runs() == second and seeds() == {("1000",)}


@pytest.mark.parametrize("sampler", ["cmaes", "gp", "random"])
def test_every_sampler_runs_after_the_seeds(sampler: str, tmp_path: Path) -> None:
    folder = tmp_path / sampler
    assert search([*BASE, "--sampler", sampler, "--trials", "8", "--out", str(folder), "--finalist-seeds", "0"]) == 0
    rows = read_trials(folder)
    assert [r["origin"] for r in rows[len(SEEDS):]] == [sampler] * (len(rows) - len(SEEDS))
    assert len(trained(rows)) == 8 and all(r["failure"] == "" for r in rows)


# ------------------------------------------------------------------------------------------ failures


def test_raise_nan_and_oom_trials_are_failed_with_their_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOLA_SEARCH_FAULTS", "raise@1,nan@2,oom@3")
    folder = tmp_path / "faults"
    assert search([*BASE, "--trials", "7", "--out", str(folder), "--finalist-seeds", "0"]) == 0
    rows = {int(r["number"]): r for r in read_trials(folder)}
    assert rows[1]["state"] == "FAIL" and "RuntimeError: injected failure in trial 1" in rows[1]["failure"]
    assert rows[2]["state"] == "FAIL" and "nan" in rows[2]["failure"].lower()
    assert rows[3]["state"] == "FAIL" and rows[3]["failure"].startswith("out of memory")
    assert all(rows[n]["failure"] == "" and rows[n]["state"] != "FAIL" for n in (0, 4, 5))
    assert len(trained(list(rows.values()))) == 7  # failures count as trials; the study went on and finished
    assert (folder / "summary.md").is_file() and "3 failed" in (folder / "summary.md").read_text()
    states = {t.number: t.state for t in load_study(folder).trials}
    assert states[1] == states[2] == states[3] == TrialState.FAIL


# ------------------------------------------------------------------------------------------ kill -9 + resume


@pytest.mark.slow
def test_kill_9_mid_study_then_resume_loses_and_reruns_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "MOLA_SYNTHETIC_DELAY": "0.3"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    figures = kill_mid_study_and_resume(tmp_path / "killed", [*BASE, "--finalist-seeds", "0"], trials=14,
                                        kill_after=7, env=env, resume=[])
    assert figures["trained_after_resume"] == 14 and figures["duplicates_trained"] == 0


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "5"], "budget 5 is infeasible for 8 layers"),
    (["--budget", "65"], "budget 65 is infeasible"),
    (["--sampler", "bogus"], "unknown sampler 'bogus'"),
    (["--gpus-per-trial", "2"], "--gpus-per-trial 2: a trial trains on one GPU"),
    (["--preset", "bogus"], "unknown preset 'bogus'"),
    (["--objective", "synthetic:bogus"], "unknown objective 'synthetic:bogus'"),
    (["--objective", "bogus"], "unknown objective 'bogus'"),
    (["--space", "no-such-space.yaml"], "does not exist"),
    (["--metric", "bleu"], "unknown metric 'bleu'"),
    (["--pruner", "median"], "unknown pruner 'median'"),
    (["--pruner", "wilcoxon", "--metric", "f1"], "f1 has none"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--storage", "bogus://x"], "--storage 'bogus://x' is not a usable database URL"),
    (["--task", "foo"], "unknown task 'foo'"),
    (["--trials", "many"], "argument --trials: invalid int value: 'many'"),
    *([] if torch.cuda.is_available() else [
        (["--device", "cuda"], "no CUDA GPU is visible"),
        (["--gpus-per-trial", "1"], "--gpus-per-trial 1 with --executor local: no CUDA GPU is visible"),
    ]),
])
def test_bad_flags_are_one_line_errors(argv: list[str], needle: str, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "s"
    assert_one_line_error(capsys, search([*BASE, "--trials", "2", "--out", str(folder), *argv]), needle)
    assert not folder.exists()


@pytest.mark.parametrize("text, needle", [
    ("encoding: [blocks\nmin_experts: 1\n", "is not valid YAML"),
    ("encoding: spiral\n", "unknown encoding 'spiral'"),
    ("encoding: blocks\nblocks: 4\nmax_experts: 3\n", "budget 40 is infeasible"),
    ("- encoding\n- blocks\n", "must be a mapping"),
])
def test_bad_yaml_spaces_are_one_line_errors(text: str, needle: str, tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    rc = search([*BASE, "--trials", "2", "--space", str(space), "--out", str(tmp_path / "s")])
    assert_one_line_error(capsys, rc, needle)
    assert not (tmp_path / "s").exists()  # an infeasible space leaves no half-made study folder


def test_resume_of_a_folder_that_is_not_a_study(tmp_path: Path, capsys) -> None:
    assert_one_line_error(capsys, search(["--resume", str(tmp_path)]), "is not a mola-search study folder")
    assert_one_line_error(capsys, search(["--resume", str(tmp_path / "missing")]), "study.json is missing")
    assert_one_line_error(capsys, search(["export", str(tmp_path)]), "is not a mola-search study folder")


def test_out_pointing_at_an_existing_study_is_refused(study: Path, capsys) -> None:
    before = (study / "trials.csv").read_text()
    rc = search([*BASE, "--trials", "2", "--out", str(study)])
    assert_one_line_error(capsys, rc, "already holds a study", "--resume")
    assert (study / "trials.csv").read_text() == before


def test_export_of_a_study_without_a_completed_trial(tmp_path: Path, capsys, monkeypatch) -> None:
    # A study whose every trial failed: it finishes, but there is nothing to export.
    monkeypatch.setenv("MOLA_SEARCH_FAULTS", "raise@0,oom@1")
    config = tmp_path / "two_seeds.yaml"
    config.write_text("seed_names: [triangle, rectangle]\n")
    folder = tmp_path / "allfail"
    assert search([*BASE, "--config", str(config), "--trials", "2", "--out", str(folder)]) == 0
    assert [r["state"] for r in read_trials(folder)] == ["FAIL", "FAIL"]
    assert not (folder / "best_allocation.json").exists()
    capsys.readouterr()
    assert_one_line_error(capsys, search(["export", str(folder)]), "has no completed trial")
    # A study folder whose storage holds an empty study (created, never run).
    empty = tmp_path / "empty"
    empty.mkdir()
    StudyConfig(study_name="empty", objective="synthetic").save(empty)
    optuna.create_study(study_name="empty", storage=f"sqlite:///{empty / 'study.db'}")
    assert_one_line_error(capsys, search(["export", str(empty), "--format", "mola-flags"]), "has no completed trial")


@pytest.mark.slow
def test_bad_input_from_the_console_script_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([*MOLA_SEARCH, *BASE, "--sampler", "bogus", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mola-search: error: unknown sampler 'bogus'"), proc.stderr


def test_missing_task_data_is_one_error_before_any_trial(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # else the loader falls back to the Hub
    folder = tmp_path / "s"
    rc = search(["--task", "mrpc", "--model", MODEL, "--executor", "local", "--trials", "12",
                 "--data-dir", str(tmp_path / "nodata"), "--out", str(folder)])
    assert_one_line_error(capsys, rc, "no data for task 'mrpc'", str(tmp_path / "nodata"))
    assert not (folder / "study.json").exists()


def test_relative_paths_are_pinned_in_the_driver(tmp_path: Path, monkeypatch) -> None:
    from mola_search.search.config import pin_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "task.yaml").write_text("name: t\n")
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("MOLA_DATA_DIR", "d")
    pinned = pin_paths(StudyConfig(task="custom:task.yaml", model="model"))
    assert pinned.data_dir == str(tmp_path / "d")            # the environment's folder, recorded
    assert pinned.task == f"custom:{tmp_path / 'task.yaml'}"
    assert pinned.model == str(tmp_path / "model")
    kept = pin_paths(StudyConfig(task="mrpc", model="tiny-llama", data_dir="/elsewhere"))
    assert (kept.task, kept.model, kept.data_dir) == ("mrpc", "tiny-llama", "/elsewhere")


@pytest.mark.parametrize(("resources", "per_trial", "expected"), [
    ((16, 0, 64 * 1024, 1, 0), 3 * 1024, (16, {"cpu": 16, "memory": 21})),   # 16 cores, 64 GB: cores limit
    ((16, 0, 32 * 1024, 1, 0), 3 * 1024, (10, {"cpu": 16, "memory": 10})),   # memory limits
    ((16, 2, 128 * 1024, 2, 0.5), 8 * 1024, (4, {"cpu": 8, "memory": 16, "gpu": 4})),  # 2 GPUs at 0.5 each
    ((2, 0, 2 * 1024, 1, 0), 3 * 1024, (1, {"cpu": 2, "memory": 0})),        # nothing fits: still one at a time
])
def test_auto_concurrency_takes_the_scarcest_resource(resources, per_trial, expected) -> None:
    from mola_search.search.executors._cluster import auto_concurrency

    cpus, gpus, memory_mb, cpt, gpt = resources
    assert auto_concurrency(cpus, gpus, memory_mb, cpus_per_trial=cpt, gpus_per_trial=gpt, trial_mb=per_trial) == expected


@pytest.mark.parametrize(("slots", "checkpointing", "hint"), [
    ({"cpu": 16, "memory": 10}, False, True),    # memory limits: say what would fit more
    ({"cpu": 16, "memory": 10}, True, False),    # already checkpointing
    ({"cpu": 16, "memory": 21}, False, False),   # cores limit: nothing to gain
    ({"cpu": 8, "memory": 6, "gpu": 4}, False, False),  # the GPUs limit before memory does
])
def test_concurrency_line_suggests_checkpointing_only_when_memory_limits(slots, checkpointing, hint) -> None:
    from mola_search.search.executors._cluster import concurrency_line

    n = min(slots.values())
    line = concurrency_line(max(1, n), slots, 32 * 1024, 3 * 1024, measured=True, checkpointing=checkpointing)
    assert line.startswith(f"max concurrent {max(1, n)} (auto: {slots['cpu']} CPU slots")
    assert ("--activation-checkpointing" in line) is hint


def test_a_custom_tasks_study_folder_is_named_after_its_name_not_its_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "tasks" / "my_task.yaml"
    spec.parent.mkdir()
    spec.write_text("name: sentiment-x\nfiles: {train: t.jsonl, validation: v.jsonl}\n")
    assert search(["--task", f"custom:{spec}", "--model", MODEL, "--objective", "synthetic:upper", "--executor",
                   "local", "--no-pilot", "--trials", "6", "--finalist-seeds", "0"]) == 0
    [folder] = list((tmp_path / "runs").iterdir())
    assert folder.name.startswith("sentiment-x-b") and "yaml" not in folder.name


def test_the_configs_choices_are_the_registries_names() -> None:
    from mola_search.search import config
    from mola_search.search.executors import EXECUTORS
    from mola_search.search.samplers import SAMPLERS
    from mola_search.search.strategies import STRATEGIES

    assert set(config.STRATEGIES) == set(STRATEGIES) and set(config.EXECUTORS) == set(EXECUTORS)
    assert set(config.SAMPLERS) == {"tpe", "cmaes", "gp", "random"}


def test_checkpointing_turns_on_when_memory_not_compute_limits_the_trials(monkeypatch) -> None:
    """4 CPUs, 8 GB for tasks, 4 GB per trial: memory allows 2 where the cores allow 4. The executor turns
    activation checkpointing on for the trials (same numbers, about 0.61 of the memory: 3 fit) and says so;
    a user who chose (either way) keeps the choice."""
    from mola_search.search.executors import RayExecutor, _cluster
    from mola_search.search.study import StudyFolder

    monkeypatch.setattr(_cluster, "cluster_resources", lambda config: (4.0, 0.0, 8000.0))
    executor = RayExecutor(StudyConfig(task="mrpc"), StudyFolder("unused"), 8)
    n, line = executor.concurrency(4000.0, measured=True)
    assert n == 3 and executor.settings.train["activation_checkpointing"] is True
    assert "memory, not compute, limited this to 2 of 4: activation checkpointing is on" in line
    for chosen in (False, True):
        executor = RayExecutor(StudyConfig(task="mrpc", train={"activation_checkpointing": chosen}),
                               StudyFolder("unused"), 8)
        n, line = executor.concurrency(4000.0, measured=True)
        assert n == 2 and executor.settings.train["activation_checkpointing"] is chosen
        assert "limited this" not in line
    plenty = RayExecutor(StudyConfig(task="mrpc"), StudyFolder("unused"), 8)
    monkeypatch.setattr(_cluster, "cluster_resources", lambda config: (4.0, 0.0, 64000.0))
    assert plenty.concurrency(4000.0, measured=True)[0] == 4 and "activation_checkpointing" not in plenty.settings.train
