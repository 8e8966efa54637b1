"""Deciding, not just ranking: the race's statistics (stats.race, stats.family) and the racing final stage.

The statistics are checked on tables with a known truth; the stage end to end on the synthetic objective
(in-process, seconds): rounds share seeds, a worse contender is dropped, the decision reaches
best_allocation.json, summary.md and the last printed line, `decide` continues without training anything
twice, a failing contender is retried once and then reported as failed (and runs again when the study is
continued), and a killed race resumes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from helpers import MODEL, needs_data, search
from mola_search.stats import race
from mola_search.stats.family import bonferroni_level, holm, holm_adjusted

BASE = ["--task", "mrpc", "--model", MODEL, "--objective", "synthetic:upper", "--executor", "local", "--no-pilot",
        "--trials", "8"]


# ------------------------------------------------------------------------------------------ statistics


def test_holm_rejects_step_down_and_matches_its_adjusted_p_values() -> None:
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop
    assert holm(p, 0.05) == [True, False, False, True, False]
    adjusted = holm_adjusted(p)
    assert [a <= 0.05 for a in adjusted[:4]] == holm(p, 0.05)[:4] and math.isnan(adjusted[4])
    assert holm([0.04], 0.05) == [True] and holm([0.06], 0.05) == [False]
    assert bonferroni_level(0.95, 4) == pytest.approx(0.9875)


def _table(means: dict[str, float], seeds: list[int], sd: float, seed: int = 0, seed_sd: float = 0.05):
    """Scores with a shared seed effect (which pairing cancels) and residual noise `sd`."""
    rng = np.random.default_rng(seed)
    block = {s: rng.normal(0, seed_sd) for s in seeds}
    return {c: {s: mu + block[s] + rng.normal(0, sd) for s in seeds} for c, mu in means.items()}


def test_a_look_drops_a_contender_clearly_worse_than_the_leader_and_only_it() -> None:
    seeds = list(range(6))
    table = _table({"a": 0.50, "b": 0.50, "c": 0.40}, seeds, sd=0.005)
    look = race.look(table, seeds, alpha=0.05, delta=0.01)
    assert look.leader in ("a", "b") and look.dropped == ["c"] and look.decision == race.UNDECIDED
    assert look.df == (3 - 1) * (6 - 1)


def test_the_seed_effect_cancels_in_the_pooled_residual() -> None:
    seeds = list(range(8))
    paired = _table({"a": 0.5, "b": 0.49}, seeds, sd=0.002, seed_sd=0.5)  # the seed moves both by a lot
    means, mse, df = race.two_way(paired, seeds)
    assert math.sqrt(mse) < 0.01 and df == 7  # the residual is the 0.002 noise, not the 0.5 seed effect
    assert race.look(paired, seeds, alpha=0.05, delta=0.005).decision == race.WINNER


def test_tost_declares_equivalence_at_gap_0_with_many_seeds_and_not_at_gap_2_delta() -> None:
    delta, seeds = 0.01, list(range(40))
    equal = _table({"a": 0.5, "b": 0.5, "c": 0.5}, seeds, sd=0.01, seed=1)
    assert race.look(equal, seeds, alpha=0.05, delta=delta).decision == race.EQUIVALENT
    apart = _table({"a": 0.5, "b": 0.5 - 2 * delta}, seeds, sd=0.01, seed=1)
    result = race.look(apart, seeds, alpha=0.05, delta=delta)
    assert result.decision == race.WINNER and result.tost["b"] > 0.05
    few = _table({"a": 0.5, "b": 0.5}, seeds[:3], sd=0.01, seed=1)  # three seeds cannot show equivalence
    assert race.look(few, seeds[:3], alpha=0.05, delta=delta).decision == race.UNDECIDED


def test_looks_at_equal_contenders_rarely_claim_anything() -> None:
    """Under the null (all equal), a look at level 0.05 claims a winner or drops someone in about 5% of tables
    or less (Holm over the pairs); the race's spending only makes that rarer."""
    seeds = list(range(5))
    claims = sum(bool(race.look(_table({"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}, seeds, sd=0.01, seed=i), seeds,
                                alpha=0.05, delta=0.001).dropped) for i in range(400))
    assert claims / 400 <= 0.07


def test_spending_and_the_seeds_an_undecided_race_would_need() -> None:
    assert race.spend(0.05, 8, 32) == pytest.approx(0.0125) and race.spend(0.05, 32, 32) == pytest.approx(0.05)
    more = race.seeds_to_decide(mse=1e-4, gap=0.005, delta=0.01, alpha=0.01)
    assert more[race.WINNER] > more[race.EQUIVALENT] > 0
    assert race.seeds_to_decide(1e-4, 0.02, 0.01, 0.01)[race.EQUIVALENT] == math.inf  # a gap past delta
    assert race.seeds_to_decide(1e-4, 0.0, 0.01, 0.01)[race.WINNER] == math.inf
    # more noise, more seeds
    assert race.seeds_to_decide(4e-4, 0.005, 0.01, 0.01)[race.WINNER] == pytest.approx(4 * more[race.WINNER])


# ------------------------------------------------------------------------------------------ the stage


def _racing(folder: Path) -> dict:
    return json.loads((folder / "racing.json").read_text())


def test_rounds_share_seeds_and_the_decision_reaches_every_output(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "race"
    assert search([*BASE, "--out", str(folder), "--max-finalist-runs", "14"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    racing, best = _racing(folder), json.loads((folder / "best_allocation.json").read_text())
    for entry in racing["contenders"]:  # round r trains seed 1000 + r, the same for every contender
        assert sorted(map(int, entry["validation"])) == list(range(1000, 1000 + len(entry["validation"])))
    assert racing["runs"] <= 14 and best["runs_spent"] == racing["runs"]
    assert best["decision"] == racing["decision"] and best["min_effect"] == 0.01 and best["level"] == 0.05
    assert best["live"] and best["decision_words"].startswith(f"decision: {best['decision']}")
    summary = (folder / "summary.md").read_text()
    assert "## Decision" in summary and f"decision: {best['decision']}" in summary.lower()
    # the throughput table: every phase's runs as the study recorded them, and the study's runs per hour
    assert f"| race | {racing['runs']} |" in summary and "| search | 8 |" in summary and "runs per hour" in summary
    assert out[-1].startswith(f"decision: {best['decision']}") and "Next: mola-search " in out[-1]
    if best["decision"] != "winner":
        assert "not a best" in best["chosen_by"] and "tie-break" in out[-1]


def test_a_contender_much_worse_than_the_leader_is_dropped_and_stops_training(tmp_path: Path) -> None:
    """synthetic:upper scores triangle far below inverted_triangle: it leaves at the first look."""
    folder = tmp_path / "drop"
    assert search([*BASE, "--out", str(folder), "--max-finalist-runs", "20"]) == 0
    racing = _racing(folder)
    triangle = next(c for c in racing["contenders"] if c["origin"] == "seed:triangle")
    assert triangle["status"] == "dropped" and triangle["dropped_at"] == 2 and len(triangle["validation"]) == 2
    assert "worse than" in triangle["reason"] and "Holm" in triangle["reason"]
    first = racing["looks"][0]
    assert first["rounds"] == 2 and triangle["label"] in first["dropped"]


def test_decide_continues_a_race_and_trains_nothing_twice(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cont"
    assert search([*BASE, "--out", str(folder), "--max-finalist-runs", "8"]) == 0
    before = {p: p.stat().st_mtime_ns for p in folder.glob("finalists/*/seed*/metrics.json")}
    first = _racing(folder)
    capsys.readouterr()
    assert search(["decide", str(folder), "--max-finalist-runs", "16"]) == 0
    after = {p: p.stat().st_mtime_ns for p in folder.glob("finalists/*/seed*/metrics.json")}
    assert all(after[p] == t for p, t in before.items())  # nothing retrained
    racing = _racing(folder)
    if first["decision"] == "undecided" and len(first["live"]) > 1:
        assert len(after) > len(before) and racing["runs"] > first["runs"]
    assert racing["max_runs"] == 16 and capsys.readouterr().out.strip().splitlines()[-1].startswith("decision: ")


def test_decide_takes_an_old_studys_fixed_block_as_its_first_rounds(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    assert search([*BASE, "--out", str(folder), "--no-racing", "--finalist-seeds", "2"]) == 0
    (folder / "racing.json").unlink()  # as a study made before races: finalists/ only
    runs = {p: p.stat().st_mtime_ns for p in folder.glob("finalists/*/seed*/metrics.json")}
    assert search(["decide", str(folder), "--max-finalist-runs", str(len(runs) + 4)]) == 0
    racing = _racing(folder)
    assert all(p.stat().st_mtime_ns == t for p, t in runs.items())
    assert racing["looks"] and racing["looks"][0]["rounds"] >= 2  # the block's two seeds are the first rounds


def test_a_failing_contender_is_retried_once_then_reported_failed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOLA_SEARCH_FAULTS", "final@0")  # trial 0 (seed:triangle) fails every finalist run
    folder = tmp_path / "fail"
    assert search([*BASE, "--out", str(folder), "--max-finalist-runs", "12"]) == 0
    triangle = next(c for c in _racing(folder)["contenders"] if c["number"] == 0)
    assert triangle["status"] == "failed" and triangle["attempts"] == {"1000": 2}
    assert "injected failure" in triangle["reason"]
    summary = (folder / "summary.md").read_text()
    assert "| failed |" in summary and "injected failure" in summary
    first = _racing(folder)
    assert first["failed_runs"] == 2 and first["runs"] == first["failed_runs"] + sum(
        len(c["validation"]) for c in first["contenders"])
    # the fault is gone (a node back, memory freed): continuing the study runs the failed contender again, and
    # its two failed attempts do not eat the race's budget, which counts scored runs
    monkeypatch.delenv("MOLA_SEARCH_FAULTS")
    assert search(["decide", str(folder), "--max-finalist-runs", "16"]) == 0
    again = _racing(folder)
    triangle = next(c for c in again["contenders"] if c["number"] == 0)
    assert triangle["status"] != "failed" and "1000" in triangle["validation"], triangle
    assert again["runs"] - again["failed_runs"] <= 16 and again["failed_runs"] == 2


def test_the_fixed_block_is_one_look_at_the_whole_budget(tmp_path: Path) -> None:
    folder = tmp_path / "block"
    assert search([*BASE, "--out", str(folder), "--no-racing", "--finalist-seeds", "3"]) == 0
    racing = _racing(folder)
    assert racing["stage"] == "finalists" and len(racing["looks"]) == 1
    assert racing["looks"][0]["alpha"] == pytest.approx(0.05) and racing["looks"][0]["rounds"] == 3


def test_bad_race_settings_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for argv, needle in ((["--min-effect", "0"], "--min-effect is 0"), (["--max-finalist-runs", "0"],
                                                                       "--max-finalist-runs is 0"),
                         (["--race-min-seeds", "1"], "--race-min-seeds is 1")):
        assert search([*BASE, "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
        assert not (tmp_path / "x").exists()
    assert search(["decide", str(tmp_path / "nothing")]) == 2
    assert "not a mola-search study folder" in capsys.readouterr().err


def test_the_race_is_reproducible_by_seed() -> None:
    random.seed(0)  # (the synthetic objective keys its noise by allocation and seed, not by call order)
    seeds = list(range(4))
    a = race.look(_table({"x": 0.5, "y": 0.48}, seeds, 0.01, seed=3), seeds, alpha=0.05, delta=0.01)
    b = race.look(_table({"x": 0.5, "y": 0.48}, seeds, 0.01, seed=3), seeds, alpha=0.05, delta=0.01)
    assert a == b


@pytest.mark.slow
def test_kill_9_mid_race_then_resume_loses_no_finished_run(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from helpers import MOLA_SEARCH_FOREGROUND

    folder = tmp_path / "killed"
    env = {**os.environ, "MOLA_SYNTHETIC_DELAY": "0.2"}
    env.pop("MOLA_SEARCH_FAULTS", None)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([*MOLA_SEARCH_FOREGROUND, *BASE, "--out", str(folder), "--max-finalist-runs", "20"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(folder.glob("finalists/*/seed*/metrics.json"))) < 5:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    before = {p: p.stat().st_mtime_ns for p in folder.glob("finalists/*/seed*/metrics.json")}
    assert not (folder / "best_allocation.json").exists()  # killed mid-race
    assert search(["--resume", str(folder)]) == 0
    after = {p: p.stat().st_mtime_ns for p in folder.glob("finalists/*/seed*/metrics.json")}
    assert all(after[p] == t for p, t in before.items())  # every finished run kept, none retrained
    racing = _racing(folder)
    assert racing["stopped"] != "running" and racing["runs"] == len(after)


def test_every_json_file_a_study_writes_is_strict_json(tmp_path: Path, capsys) -> None:
    """No NaN or Infinity anywhere: json.loads with parse_constant refusing them reads every file (and export)."""
    folder = tmp_path / "strict"
    assert search([*BASE, "--out", str(folder), "--max-finalist-runs", "8"]) == 0
    capsys.readouterr()

    def refuse(token: str):
        raise ValueError(f"non-standard JSON: {token}")

    files = sorted(folder.rglob("*.json"))
    assert {"study.json", "racing.json", "best_allocation.json", "metrics.json"} <= {p.name for p in files}
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    assert search(["export", str(folder), "--format", "json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=refuse)


@pytest.mark.integration  # real MRPC data, a tiny model really trained
@needs_data
def test_mola_search_trains_with_the_official_balance_loss_and_its_coefficient(tmp_path: Path) -> None:
    """--balance-loss official reaches every trial: a finalist's adapter records it with the official 0.001."""
    folder = tmp_path / "official-loss"
    assert search(["--task", "mrpc", "--model", "tiny-llama-L4", "--executor", "local", "--no-pilot", "--trials", "2",
                   "--max-train-examples", "8", "--max-eval-examples", "8", "--finalist-train-examples", "8",
                   "--finalist-eval-examples", "8", "--batch-size", "4", "--micro-batch-size", "4",
                   "--max-finalist-runs", "4", "--balance-loss", "official", "--out", str(folder)]) == 0
    config = json.loads(next(folder.glob("finalists/*/seed*/adapter/adapter_config.json")).read_text())
    assert config["balance_loss"] == "official" and config["aux_loss_coef"] == pytest.approx(0.001)
    assert json.loads((folder / "study.json").read_text())["balance_loss"] == "official"
