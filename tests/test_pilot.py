"""The noise floor and the honesty of a study's answer, end to end on the synthetic objective (seconds).

The synthetic objective's score of (allocation, training seed) is a fixed function of both, as a
fixed-seed fine-tune is: a finalist run that reproduced a search run would reproduce its score
exactly, which is what the seed-disjointness test looks for.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mola_search.search.config import FINALIST_SEED_BASE, PILOT_SHAPES, StudyConfig
from mola_search.search.study import StudyFolder
from mola_search.search.study import Finalist, choose_best
from mola_search.allocation import AllocationSpec
from helpers import MODEL, MOLA_SEARCH, load_study, read_trials, search

PILOT = ["--task", "mrpc", "--model", MODEL, "--objective", "synthetic:upper", "--executor", "local",
         "--budget", "40"]


def finalist_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "finalists.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def piloted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pilot") / "study"
    assert search([*PILOT, "--trials", "14", "--finalists", "2", "--finalist-seeds", "3", "--out", str(folder)]) == 0
    return folder


def test_pilot_runs_first_writes_noise_json_and_counts_as_trials(piloted: Path, capsys) -> None:
    study = load_study(piloted)
    pilot = [t for t in study.trials if t.user_attrs.get("pilot")]
    assert len(pilot) == len(PILOT_SHAPES) * 3
    assert [t.number for t in pilot] == list(range(len(pilot)))  # before any other trial
    cells = {(t.user_attrs["origin"], t.user_attrs["train_seed"]) for t in pilot}
    assert cells == {(f"seed:{s}", k) for s in PILOT_SHAPES for k in (0, 1, 2)}
    # the pilot's seed-0 runs are the seed trials: the seeds it covered are not trained again
    origins = [t.user_attrs["origin"] for t in study.trials if not t.user_attrs.get("pilot")]
    assert not set(origins) & {f"seed:{s}" for s in PILOT_SHAPES}
    assert len([r for r in read_trials(piloted) if r["duplicate_of"] == ""]) == 14
    floor = StudyFolder(piloted).read_noise()
    assert floor is not None and sorted(floor.allocations) == sorted(PILOT_SHAPES) and floor.seeds == (0, 1, 2)
    for t in pilot:  # noise.json holds exactly the scores the pilot trials recorded
        assert floor.scores[t.user_attrs["origin"][5:]][t.user_attrs["train_seed"]] == pytest.approx(t.value)
    summary = (piloted / "summary.md").read_text()  # the CLI writes the report's text into it
    assert "Noise floor" in summary and floor.line()[1:] in summary
    assert "deserve" in summary and "layers" in summary  # the layer headline


def test_no_finalist_run_reproduces_a_search_trial(piloted: Path) -> None:
    study = load_study(piloted)
    trial_seeds = {int(t.user_attrs["train_seed"]) for t in study.trials if "train_seed" in t.user_attrs}
    trial_values = {round(t.value, 12) for t in study.trials if t.value is not None}
    runs = sorted(piloted.glob("finalists/*/seed*/metrics.json"))
    assert len(runs) == sum(len(r["seeds"].split(";")) for r in finalist_rows(piloted))
    for path in runs:
        m = json.loads(path.read_text())
        seed = int(path.parent.name[4:])
        assert m["train_seed"] == seed and seed >= FINALIST_SEED_BASE and seed not in trial_seeds
        assert round(m["validation"]["gold_logprob"], 12) not in trial_values, path


def test_the_exported_allocation_is_the_decision_and_test_chose_nothing(piloted: Path) -> None:
    rows = finalist_rows(piloted)
    best = json.loads((piloted / "best_allocation.json").read_text())
    racing = json.loads((piloted / "racing.json").read_text())
    assert best["decision"] == racing["decision"] and best["decision"] in ("winner", "equivalent", "undecided")
    chosen = next(c for c in racing["contenders"] if c["label"] == racing["chosen"])
    assert best["experts"] == chosen["experts"] and best["trial"] == chosen["number"]
    if best["decision"] == "winner":  # the live leader on validation, and said so
        live = [r for r in rows if r["label"] in racing["live"]]
        assert max(live, key=lambda r: float(r["validation_mean"]))["label"] == chosen["label"]
        assert "validation" in best["chosen_by"]
    else:  # a tie set: the exported allocation is the tie-break's pick, and the file says it is not a best
        assert "not a best" in best["chosen_by"] and best["tie_break"] and "inverted triangle" in best["tie_break"]
    assert "test" not in best["chosen_by"].split(";")[0]
    n = len(chosen["validation"])
    assert best["finalist_seeds"] == [FINALIST_SEED_BASE + i for i in range(n)]  # round r trains seed 1000 + r


def test_choose_best_ignores_test_scores() -> None:
    spec = AllocationSpec((1, 1), (1, 1), (4, 4), "x")
    val_best = Finalist("a", 1, "tpe", spec, validation=[0.9, 0.8], test=[0.1, 0.2], seeds=[1000, 1001])
    test_best = Finalist("b", 2, "seed:rectangle", spec, validation=[0.5, 0.6], test=[0.99, 0.98], seeds=[1000, 1001])
    assert choose_best([test_best, val_best]).label == "a"
    with pytest.raises(ValueError):
        choose_best([Finalist("c", 3, "tpe", spec, [], [])])


def test_too_few_trials_for_the_pilot_is_one_line(tmp_path: Path, capsys) -> None:
    assert search([*PILOT, "--trials", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "fewer than the pilot's 9 runs" in err and "--no-pilot" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_auto_fidelity_doubles_until_the_allocations_separate(tmp_path: Path, monkeypatch, capsys) -> None:
    """Noise that halves in variance per doubling of training examples (the synthetic model): the pilot
    starts where the allocations are drowned and doubles until their share clears the threshold."""
    monkeypatch.setenv("MOLA_SYNTHETIC_NOISE", "noise=0.3,seed_sd=0.3,example_sd=0.05")
    folder = tmp_path / "auto"
    assert search([*PILOT, "--trials", "10", "--finalist-seeds", "0", "--auto-fidelity", "--noise-threshold", "0.8",
                   "--max-train-examples", "16", "--out", str(folder)]) == 0
    rounds = StudyFolder(folder).read_noise_rounds()
    assert len(rounds) >= 2
    assert all(r.allocation_share < 0.8 for r in rounds[:-1]) and rounds[-1].allocation_share >= 0.8
    sizes = [r.fidelity["max_train_examples"] for r in rounds]
    assert sizes == [16 * 2 ** i for i in range(len(rounds))]
    chosen = load_study(folder).user_attrs["fidelity"]
    assert chosen["max_train_examples"] == sizes[-1]
    assert StudyFolder(folder).read_noise().fidelity == rounds[-1].fidelity
    out = capsys.readouterr().out
    assert out.count("auto-fidelity: allocation share below") == len(rounds) - 1


def test_auto_fidelity_stops_at_the_time_budget(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MOLA_SYNTHETIC_NOISE", "noise=0.03,seed_sd=0.05,example_sd=0.05")
    monkeypatch.setenv("MOLA_SYNTHETIC_DELAY", "0.05")  # 9 pilot runs take ~1 s: the next round would not fit
    folder = tmp_path / "budget"
    assert search([*PILOT, "--trials", "10", "--finalist-seeds", "0", "--auto-fidelity", "--noise-threshold", "0.99",
                   "--max-train-examples", "16", "--time-budget", "0.01", "--out", str(folder)]) == 0
    assert len(StudyFolder(folder).read_noise_rounds()) == 1
    assert "past --time-budget" in capsys.readouterr().out


@pytest.mark.slow
def test_wilcoxon_pruner_prunes_on_paired_examples(tmp_path: Path) -> None:
    folder = tmp_path / "wilcoxon"
    assert search([*PILOT, "--trials", "24", "--no-pilot", "--finalist-seeds", "0", "--pruner", "wilcoxon",
                   "--max-eval-examples", "60", "--sampler", "random", "--out", str(folder)]) == 0
    study = load_study(folder)
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and "COMPLETE" in states
    done = next(t for t in study.trials if t.state.name == "COMPLETE")
    assert len(done.intermediate_values) == 60 * len(StudyConfig.load(folder).fidelity.get("rungs", [0.5, 1.0]))
    for row in read_trials(folder):  # trials.csv keeps the per-rung means, not 120 per-example values
        if row["state"] == "COMPLETE":
            assert len(row["rung_scores"].split(";")) == 2


@pytest.mark.slow
def test_kill_9_mid_pilot_then_resume_reruns_no_pilot_run(tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    env = {**os.environ, "MOLA_SYNTHETIC_DELAY": "0.4"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen([*MOLA_SEARCH, *PILOT, "--trials", "11", "--finalist-seeds", "0", "--out", str(folder)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kept: dict[str, float] = {}
    try:
        deadline = time.time() + 120
        while len(kept) < 4:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
            kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("pilot/round0/*.json")}
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("pilot/round0/*.json")}
    assert 4 <= len(kept) < 9
    assert search(["--resume", str(folder)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("pilot/round0/*.json")}
    assert len(after) == 9 and all(after[name] == mtime for name, mtime in kept.items())
    study = load_study(folder)
    pilot = [(t.user_attrs["origin"], t.user_attrs["train_seed"]) for t in study.trials if t.user_attrs.get("pilot")]
    assert len(pilot) == len(set(pilot)) == 9
    assert len([r for r in read_trials(folder) if r["duplicate_of"] == ""]) == 11
