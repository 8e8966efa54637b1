"""A user's own objective in place of the MoLA fine-tune: run_study(config, folder, objective=fn), and
`--objective python:<module>:<function>` from the CLI. (The Ray executor runs it in tests/test_search_ray.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mola_search.errors import UserError
from mola_search.search.config import StudyConfig
from mola_search.trial.objective import ObjectiveTrial, import_objective, objective_name
from mola_search.search.runner import run_study
from helpers import CALLS, MODEL, _config, _rows, _value, peak_in_the_middle


def too_many_reports(trial: ObjectiveTrial) -> float:
    for _ in range(len(trial.rungs) + 1):
        trial.report(0.5)
    return 0.5


def nan_score(trial: ObjectiveTrial) -> float:
    return math.nan


def test_a_user_objective_scores_every_trial_pilot_run_and_finalist(tmp_path: Path, monkeypatch) -> None:
    CALLS.clear()
    folder = tmp_path / "s"
    monkeypatch.setenv("MOLA_TEST_STUDY", str(folder))
    result = run_study(_config(tmp_path), folder, objective=peak_in_the_middle)
    seen = [int(x) for x in (tmp_path / "seen.txt").read_text().split()]
    pilot = 6  # the pilot's runs become trials (and rows) only when the pilot ends
    assert seen[pilot:] == list(range(pilot, len(seen))), seen  # trials.csv grows as each search trial finishes
    assert json.loads((folder / "study.json").read_text())["objective"] == \
        "python:helpers:peak_in_the_middle"
    rows = _rows(folder / "trials.csv")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) >= 6 and any(r["pilot"] == "True" for r in complete)
    for r in complete:  # every trial's value is the objective's, at the seed it trained with
        assert float(r["score"]) == pytest.approx(_value(r["allocation"], int(r["train_seed"])))
        assert [float(v) for v in r["rung_scores"].split(";")][-1] == pytest.approx(float(r["score"]), abs=1e-4)
    searched = [c for c in CALLS if not c["final"]]
    assert all(len(c["rungs"]) >= 2 for c in searched)
    finals = [c for c in CALLS if c["final"]]
    assert finals and {c["seed"] for c in finals} == {1000, 1001} and all(c["rungs"] == (1.0,) for c in finals)
    fin = _rows(folder / "finalists.csv")
    assert len(fin) == 2 and all(r["state"] == "COMPLETE" for r in fin)
    for r in fin:
        expected = [_value(r["allocation"], s) - 0.01 for s in (1000, 1001)]
        assert float(r["test_mean"]) == pytest.approx(sum(expected) / 2, abs=1e-4)
    best = json.loads((folder / "best_allocation.json").read_text())
    winner = max(fin, key=lambda r: float(r["validation_mean"]))
    assert ",".join(map(str, best["experts"])) == winner["allocation"]
    assert result["best"].spec.experts == tuple(best["experts"])


def test_the_cli_imports_a_python_objective_and_failures_are_recorded(tmp_path: Path, capsys) -> None:
    from mola_search.cli.common import run_main
    from mola_search.cli.search import main

    base = ["--task", "mrpc", "--model", MODEL, "--executor", "local", "--no-pilot", "--finalist-seeds", "0", "--pruner", "none",
            "--sampler", "random"]
    rc = run_main("mola-search", main, [*base, "--objective", "python:test_objective:peak_in_the_middle",
                                        "--trials", "3", "--out", str(tmp_path / "cli")])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "cli" / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert all(float(r["score"]) == pytest.approx(_value(r["allocation"], 0)) for r in rows)
    for fn, reason in ((too_many_reports, "report() called"), (nan_score, "NaN or inf")):
        folder = tmp_path / fn.__name__
        rc = run_main("mola-search", main, [*base, "--objective", objective_name(fn), "--trials", "2",
                                            "--out", str(folder)])
        assert rc == 0
        rows = _rows(folder / "trials.csv")
        assert [r["state"] for r in rows] == ["FAIL", "FAIL"] and all(reason in r["failure"] for r in rows), rows
    capsys.readouterr()
    rc = run_main("mola-search", main, [*base, "--objective", "python:no_such_module:fn", "--out",
                                        str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "cannot be imported" in err and not (tmp_path / "missing").exists()


def test_import_objective_refuses_what_cannot_be_imported() -> None:
    assert import_objective("python:test_objective:nan_score") is nan_score
    for name, message in (("python:__main__:score", "defined in a script"), ("python:nomodule", "use python:"),
                          ("python:test_objective:missing", "cannot be imported"),
                          ("python:test_objective:MODEL", "not a function")):
        with pytest.raises(UserError, match=message):
            import_objective(name)
    with pytest.raises(UserError, match="python:<module>:<function>"):
        StudyConfig(objective="python")


@pytest.mark.slow
def test_the_readme_objective_example_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    section = text[text.index("## Your own objective"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/library.md", "exec"), {"__name__": "readme_objective"})
    out = capsys.readouterr().out
    folder = tmp_path / "objective-study"
    rows = [r for r in _rows(folder / "trials.csv") if not r["duplicate_of"]]  # not answered from the cache
    assert [r["state"] for r in rows] == ["COMPLETE"] * 8, [r["failure"] for r in rows]
    assert len({r["score"] for r in rows}) > 1  # allocations score differently: the objective really trained
    fin = _rows(folder / "finalists.csv")
    assert len(fin) == 3 and all(r["state"] == "COMPLETE" for r in fin)
    best = json.loads((folder / "best_allocation.json").read_text())
    assert str(best["experts"]).replace(" ", "") in out.replace(" ", "").replace("(", "[").replace(")", "]")
