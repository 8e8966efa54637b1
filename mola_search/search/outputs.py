"""What a study leaves behind: trials.csv, finalists.csv, best_allocation.json, summary.md.

Everything is derived from the Optuna storage and the finalists' run folders, so
the files can be rewritten at any time (also for a study that is still running).
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mola_search.allocation import AllocationSpec, run_length, save_spec
from mola_search.search.study import ALLOCATION, DUPLICATE_OF, FAILURE, ORIGIN, RANK, TOP_K

TRIAL_COLUMNS = ("number", "origin", "state", "score", "rung_scores", "allocation", "top_k", "rank",
                 "wall_time_s", "failure", "duplicate_of", "node")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        a = t.user_attrs
        rows.append({
            "number": t.number, "origin": a.get(ORIGIN, ""), "state": t.state.name,
            "score": t.value if t.state == TrialState.COMPLETE else "",
            "rung_scores": ";".join(f"{v:.4f}" for _, v in sorted(t.intermediate_values.items())),
            "allocation": ",".join(map(str, a.get(ALLOCATION, []))),
            "top_k": ",".join(map(str, a.get(TOP_K, []))), "rank": ",".join(map(str, a.get(RANK, []))),
            "wall_time_s": a.get("wall_time_s", ""), "failure": a.get(FAILURE, ""),
            "duplicate_of": a.get(DUPLICATE_OF, ""), "node": a.get("node", ""),
        })
    return rows


def write_trials_csv(study: optuna.Study, folder: Path) -> Path:
    path = folder / "trials.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        writer.writeheader()
        writer.writerows(trial_rows(study))
    return path


@dataclass
class Finalist:
    label: str
    number: int
    origin: str
    spec: AllocationSpec
    validation: list[float]
    test: list[float]

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.test else float("nan")

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.validation) if self.validation else float("nan")

    @property
    def val_std(self) -> float:
        return statistics.stdev(self.validation) if len(self.validation) > 1 else 0.0


def write_finalists_csv(finalists: Sequence[Finalist], folder: Path) -> Path:
    path = folder / "finalists.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "trial", "origin", "allocation", "seeds", "validation_mean", "validation_std",
                    "test_mean", "test_std", "test_scores"])
        for fin in finalists:
            w.writerow([fin.label, fin.number, fin.origin, ",".join(map(str, fin.spec.experts)), len(fin.test),
                        f"{fin.val_mean:.4f}", f"{fin.val_std:.4f}", f"{fin.test_mean:.4f}", f"{fin.test_std:.4f}",
                        ";".join(f"{s:.4f}" for s in fin.test)])
    return path


def choose_best(finalists: Sequence[Finalist]) -> Finalist:
    """Highest mean test score over seeds; validation mean breaks ties."""
    return max(finalists, key=lambda f: (f.test_mean if f.test else float("-inf"), f.val_mean))


def write_best(best: Finalist, folder: Path, config: dict[str, Any], chosen_by: str) -> Path:
    return save_spec(best.spec, folder / "best_allocation.json",
                     origin=best.origin, trial=best.number, chosen_by=chosen_by,
                     validation_mean=best.val_mean, validation_std=best.val_std,
                     test_mean=best.test_mean if best.test else None, test_std=best.test_std if best.test else None,
                     test_scores=best.test, model=config.get("model"), task=config.get("task"),
                     study=config, provenance=provenance())


def provenance() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("mola-search", "torch", "transformers", "optuna", "ray", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "host": platform.node(), "machine": platform.machine(), "versions": versions}


def write_summary(folder: Path, config: dict[str, Any], study: optuna.Study, finalists: Sequence[Finalist],
                  best: Finalist | None, wall_time_s: float | None) -> Path:
    trials = trial_rows(study)
    counts = {s: sum(1 for r in trials if r["state"] == s and not r["duplicate_of"]) for s in ("COMPLETE", "PRUNED", "FAIL")}
    dups = sum(1 for r in trials if r["duplicate_of"] != "")
    lines = [f"# mola-search study `{folder.name}`", "",
             f"- task **{config.get('task')}**, model **{config.get('model')}**, objective `{config.get('objective')}`, "
             f"budget **{best.spec.budget if best else config.get('budget')}**",
             f"- space `{config.get('space')}`, sampler `{config.get('sampler')}`, scheduler `{config.get('scheduler')}`",
             f"- trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
             + (f", {dups} duplicate proposals answered from the cache" if dups else ""),
             ]
    if wall_time_s is not None:
        lines.append(f"- wall time: {wall_time_s / 60:.1f} min")
    if finalists:
        lines += ["", "## Finalists (retrained with several seeds, scored on the held-out test split)", "",
                  "| | origin | allocation | validation | test (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
        for f in sorted(finalists, key=lambda f: -(f.test_mean if f.test else -1)):
            mark = "**best**" if best is not None and f.label == best.label else ""
            lines.append(f"| {mark} | {f.origin} | `{run_length(f.spec.experts)}` | {f.val_mean:.4f} ± {f.val_std:.4f} "
                         f"| {f.test_mean:.4f} ± {f.test_std:.4f} | {len(f.test)} |")
        if best is not None:
            seeds = [f for f in finalists if f.origin.startswith("seed:")]
            lines += ["", f"Best allocation: `{','.join(map(str, best.spec.experts))}` ({best.origin}, trial {best.number})."]
            for s in seeds:
                if s.label != best.label and s.test:
                    lines.append(f"- vs {s.origin[5:]}: {best.test_mean - s.test_mean:+.4f} test accuracy")
    lines += ["", "Files: `trials.csv` (every trial), `finalists.csv`, `best_allocation.json` "
              "(export with `mola-search export`), `study.db` (Optuna storage; `optuna-dashboard sqlite:///study.db`)."]
    path = folder / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
