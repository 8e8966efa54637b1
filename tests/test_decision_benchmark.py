"""benchmarks/decision_benchmark.py, small: its pipelines run as studies run them, on a known truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("decision_benchmark", ROOT / "benchmarks" / "decision_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_small_decision_benchmark_tells_the_pipelines_apart(tmp_path: Path) -> None:
    bench = _benchmark()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    results = {gap: [bench.repetition(rep, gap, tmp_path / f"g{gap}") for rep in range(3)]
               for gap in (0.0, 4 * bench.DELTA)}
    rows = {(r["gap"], r["pipeline"]): r for r in bench.summarise(results)}
    # today's rule names a best every time, so with no true difference every claim is false
    assert rows[(0.0, "a today")]["winner_claims"] == 1.0 and rows[(0.0, "a today")]["false_claims"] == 1.0
    # the race makes no false claim with no difference, and finds a clear one (4 delta) with its full budget
    assert rows[(0.0, "b race 40")]["false_claims"] == 0.0
    assert rows[(4 * bench.DELTA, "b race 40")]["true_best_declared"] == 1.0
    assert rows[(4 * bench.DELTA, "b race 40")]["runs_mean"] < 40  # it stops when it knows
    assert rows[(0.0, "b race 12")]["runs_mean"] == 12.0 and rows[(0.0, "a today")]["runs_mean"] == 12.0
    table = bench.table(bench.summarise(results))
    assert table.count("\n") == 1 + 2 * 5 and "| 0.04 | b race 40 | 100% | 100% | 0% |" in table
