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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mola_search.allocation import AllocationSpec, run_length, save_spec
from mola_search.search.folder import (ALLOCATION, BEST_ALLOCATION, DUPLICATE_OF, FAILURE, FINALISTS_CSV, METRICS,
                                       NODE, ORIGIN, PILOT, RANK, RUNG_SCORES, SUMMARY_MD, TOP_K, TRAIN_SEED, TRIALS_CSV,
                                       WALL_TIME, read_json)

TRIAL_COLUMNS = ("number", "origin", "state", "score", "rung_scores", "train_seed", "pilot", "accuracy", "allocation",
                 "top_k", "rank", "wall_time_s", "failure", "duplicate_of", "node")


FILES_NOTE = ("Files: `noise.json` (pilot), `trials.csv` (every trial), `finalists.csv`, `best_allocation.json` "
              "(export with `mola-search export`), `study.db` (Optuna storage; `optuna-dashboard sqlite:///study.db`), "
              "`report/` (`mola-search report`).")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        a = t.user_attrs
        rows.append({
            "number": t.number, "origin": a.get(ORIGIN, ""), "state": t.state.name,
            "score": t.value if t.state == TrialState.COMPLETE else "",
            "rung_scores": ";".join(f"{v:.4f}" for _, v in sorted((a.get(RUNG_SCORES) or {}).items(),
                                                                    key=lambda kv: int(kv[0]))),
            "train_seed": a.get(TRAIN_SEED, ""), "pilot": bool(a.get(PILOT)),
            "accuracy": (a.get(METRICS) or {}).get("accuracy", ""),
            "allocation": ",".join(map(str, a.get(ALLOCATION, []))),
            "top_k": ",".join(map(str, a.get(TOP_K, []))), "rank": ",".join(map(str, a.get(RANK, []))),
            "wall_time_s": a.get(WALL_TIME, ""), "failure": a.get(FAILURE, ""),
            "duplicate_of": a.get(DUPLICATE_OF, ""), "node": a.get(NODE, ""),
        })
    return rows


def write_trials_csv(study: optuna.Study, folder: Path) -> Path:
    path = folder / TRIALS_CSV
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        writer.writeheader()
        writer.writerows(trial_rows(study))
    return path


@dataclass
class Finalist:
    """One allocation retrained with fresh seeds; `validation` / `test` hold the study metric per seed."""

    label: str
    number: int
    origin: str
    spec: AllocationSpec
    validation: list[float]
    test: list[float]
    seeds: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

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

    @property
    def test_accuracy_mean(self) -> float:
        values = [v for v in self.test_accuracy if v == v]
        return statistics.fmean(values) if values else float("nan")


def write_finalists_csv(finalists: Sequence[Finalist], folder: Path) -> Path:
    """One row per finalist allocation; a finalist with failed seeds says why (never silently absent)."""
    path = folder / FINALISTS_CSV
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "trial", "origin", "allocation", "state", "seeds", "validation_mean", "validation_std",
                    "test_mean", "test_std", "test_accuracy_mean", "test_scores", "failures"])
        for fin in finalists:
            state = "COMPLETE" if fin.validation and not fin.failures else ("PARTIAL" if fin.validation else "FAIL")
            w.writerow([fin.label, fin.number, fin.origin, ",".join(map(str, fin.spec.experts)), state,
                        ";".join(map(str, fin.seeds)), f"{fin.val_mean:.4f}", f"{fin.val_std:.4f}",
                        f"{fin.test_mean:.4f}", f"{fin.test_std:.4f}", f"{fin.test_accuracy_mean:.4f}",
                        ";".join(f"{s:.4f}" for s in fin.test), " | ".join(fin.failures)])
    return path


def choose_best(finalists: Sequence[Finalist]) -> Finalist:
    """Highest mean VALIDATION score over the finalist seeds; the test split plays no part in the choice."""
    scored = [f for f in finalists if f.validation]
    if not scored:
        raise ValueError("no finalist has a validation score")
    return max(scored, key=lambda f: f.val_mean)


def write_best(best: Finalist, folder: Path, config: dict[str, Any], chosen_by: str) -> Path:
    return save_spec(best.spec, folder / BEST_ALLOCATION,
                     origin=best.origin, trial=best.number, chosen_by=chosen_by, metric=config.get("metric"),
                     validation_mean=best.val_mean, validation_std=best.val_std,
                     test_mean=best.test_mean if best.test else None, test_std=best.test_std if best.test else None,
                     test_scores=best.test, test_accuracy_mean=best.test_accuracy_mean if best.test else None,
                     finalist_seeds=best.seeds, model=config.get("model"), task=config.get("task"),
                     study=config, provenance=provenance())


def write_run_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """A finished run's metrics.json, written on the driver from the outcome the run sent back."""
    path = out / "metrics.json"
    if not path.is_file():  # the worker wrote it already when it shares this disk
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(path)
    return path


def write_outcome(path: Path, outcome: Any, fidelity: Any) -> Path:
    """One independent run's outcome (a pilot run), kept so a resumed study never runs it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fidelity": fidelity.to_dict(), "outcome": asdict(outcome)}, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_outcome(path: Path, fidelity: Any) -> Any:
    """The outcome kept at `path` if it was trained at `fidelity`, else None."""
    from mola_search.search.trial import TrialOutcome

    raw = read_json(path)
    if not raw or raw.get("fidelity") != fidelity.to_dict():
        return None
    return TrialOutcome(**raw["outcome"])


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
                  best: Finalist | None, wall_time_s: float | None, noise: Any = None,
                  analysis: str | None = None, sections: Sequence[str] = ()) -> Path:
    """summary.md: the study's settings and trial counts, then `analysis` (Markdown from the report,
    its own title dropped) or, without it, the noise floor, the finalists and `sections` (Markdown lines,
    e.g. the one-shot trust section)."""
    trials = trial_rows(study)
    metric = config.get("metric", "accuracy")
    counts = {s: sum(1 for r in trials if r["state"] == s and not r["duplicate_of"]) for s in ("COMPLETE", "PRUNED", "FAIL")}
    dups = sum(1 for r in trials if r["duplicate_of"] != "")
    lines = [f"# mola-search study `{folder.name}`", "",
             f"- task **{config.get('task')}**, model **{config.get('model')}**, objective `{config.get('objective')}`, "
             f"metric `{metric}` (validation), budget **{best.spec.budget if best else config.get('budget')}**",
             f"- space `{config.get('space')}`, sampler `{config.get('sampler')}`, pruner `{config.get('scheduler')}`",
             f"- trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
             + (f", {dups} duplicate proposals answered from the cache" if dups else ""),
             ]
    if wall_time_s is not None:
        lines.append(f"- wall time: {wall_time_s / 60:.1f} min")
    if analysis is not None:
        body = analysis.strip().splitlines()
        while body and not body[0].startswith("## "):  # its own title and subtitle: the lines above say it
            body = body[1:]
        lines += ["", *body, "", FILES_NOTE]
        return _write_lines(folder, lines)
    lines += ["", "## Noise floor", ""]
    if noise is not None:
        lines.append(noise.line() + ".")
        lines += ["", "| allocation | " + " | ".join(f"seed {s}" for s in noise.seeds) + " |",
                  "|---|" + "---|" * len(noise.seeds)]
        for name in noise.allocations:
            lines.append(f"| {name} | " + " | ".join(f"{noise.scores[name][s]:.4f}" for s in noise.seeds) + " |")
    else:
        lines.append("Not measured (--no-pilot): nothing here says how much of a score difference is seed noise.")
    if finalists:
        lines += ["", f"## Finalists (fresh seeds; chosen on validation {metric}, test reported once)", "",
                  f"| | origin | allocation | validation {metric} | test {metric} | test accuracy | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for f in sorted(finalists, key=lambda f: -(f.val_mean if f.validation else float("inf"))):
            mark = "**best**" if best is not None and f.label == best.label else ""
            if not f.validation:
                lines.append(f"| | {f.origin} | `{run_length(f.spec.experts)}` | failed: {'; '.join(f.failures)} | | | 0 |")
                continue
            lines.append(f"| {mark} | {f.origin} | `{run_length(f.spec.experts)}` | {f.val_mean:.4f} ± {f.val_std:.4f} "
                         f"| {f.test_mean:.4f} ± {f.test_std:.4f} | {_num(f.test_accuracy_mean)} | {len(f.validation)} |")
        if best is not None:
            lines += ["", f"Best allocation (highest mean validation {metric}): "
                          f"`{','.join(map(str, best.spec.experts))}` ({best.origin}, trial {best.number})."]
            for s in finalists:
                if s.label == best.label or not s.origin.startswith("seed:") or not s.test:
                    continue
                common = [i for i, seed in enumerate(best.seeds) if seed in s.seeds]
                diffs = [best.test[i] - s.test[s.seeds.index(best.seeds[i])] for i in common]
                if diffs:
                    lines.append(f"- vs {s.origin[5:]}: {statistics.fmean(diffs):+.4f} test {metric} "
                                 f"(mean of {len(diffs)} seed-paired differences; CIs over examples x seeds in "
                                 "`mola-search report`)")
            if noise is not None and noise.min_detectable_difference == noise.min_detectable_difference:
                lines.append(f"- noise floor: a single seed-paired difference below "
                             f"{noise.min_detectable_difference:.4f} is within seed noise at trial fidelity")
    if sections:
        lines += ["", *sections]
    lines += ["", FILES_NOTE]
    return _write_lines(folder, lines)


def _write_lines(folder: Path, lines: list[str]) -> Path:
    path = folder / SUMMARY_MD
    path.write_text("\n".join(lines) + "\n")
    return path



def _num(value: float) -> str:
    return f"{value:.4f}" if value == value else "–"
