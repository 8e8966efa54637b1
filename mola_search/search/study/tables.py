"""The study's CSV tables: trials.csv (every trial), finalists.csv (one row per finalist allocation) and
oneshot.csv (every one-shot scoring). This module owns their columns; `StudyFolder` writes them.

Everything is derived from the Optuna storage and the finalists' results, so the files can be rewritten
at any time (also for a study that is still running).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from optuna.trial import TrialState

from mola_search.search.study.records import (ALLOCATION, DUPLICATE_OF, FAILURE, METRICS, NODE, ORIGIN, PEAK_GPU,
                                              PEAK_RSS, PILOT, RANK, RUNG_SCORES, TOP_K, TRAIN_SEED, WALL_TIME)

TRIAL_COLUMNS = ("number", "origin", "state", "score", "rung_scores", "train_seed", "pilot", "accuracy", "allocation",
                 "top_k", "rank", "wall_time_s", "failure", "duplicate_of", "node", "peak_rss_mb", "peak_gpu_mb")
FINALIST_COLUMNS = ("label", "trial", "origin", "allocation", "state", "seeds", "validation_mean", "validation_std",
                    "test_mean", "test_std", "test_accuracy_mean", "test_scores", "failures")
ONESHOT_COLUMNS = ("number", "origin", "state", "score", "accuracy", "allocation", "top_k", "duplicate_of", "failure")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial that is not still queued, with the TRIAL_COLUMNS keys."""
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
            "peak_rss_mb": a.get(PEAK_RSS, ""), "peak_gpu_mb": a.get(PEAK_GPU, ""),
        })
    return rows


def trials_csv(study: Any) -> str:
    return _csv(TRIAL_COLUMNS, [[row[c] for c in TRIAL_COLUMNS] for row in trial_rows(study)])


def finalists_csv(finalists: Sequence[Any]) -> str:
    """One row per finalist allocation (a `Finalist`); a finalist with failed seeds says why (never silently
    absent)."""
    rows = []
    for fin in finalists:
        state = "COMPLETE" if fin.validation and not fin.failures else ("PARTIAL" if fin.validation else "FAIL")
        rows.append([fin.label, fin.number, fin.origin, ",".join(map(str, fin.spec.experts)), state,
                     ";".join(map(str, fin.seeds)), f"{fin.val_mean:.4f}", f"{fin.val_std:.4f}",
                     f"{fin.test_mean:.4f}", f"{fin.test_std:.4f}", f"{fin.test_accuracy_mean:.4f}",
                     ";".join(f"{s:.4f}" for s in fin.test), " | ".join(fin.failures)])
    return _csv(FINALIST_COLUMNS, rows)


def oneshot_csv(study: Any) -> str:
    """Every one-shot trial (number, origin, state, score, accuracy, allocation, duplicate_of, failure)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append([t.number, a.get(ORIGIN, ""), t.state.name, "" if t.value is None else t.value,
                     (a.get(METRICS) or {}).get("accuracy", ""), ",".join(map(str, a.get(ALLOCATION, []))),
                     ",".join(map(str, a.get(TOP_K, []))), a.get(DUPLICATE_OF, ""), a.get(FAILURE, "")])
    return _csv(ONESHOT_COLUMNS, rows)


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def census(rows: Sequence[dict[str, Any]], study_seed: int) -> dict[str, int]:
    """How many trials of each kind `rows` (`trial_rows`, or rows with the same keys) hold: every report of a
    trial count takes its number from here, so summary.md, the report's figures and its notes agree.

    complete / pruned / failed: trials that trained (duplicates answered from the cache left out);
    duplicates: proposals answered from the cache; other_seeds: complete runs trained with another seed than
    the study's (the pilot's replicates); distinct: distinct allocations complete at the study seed (what
    the search compares under common random numbers)."""
    own = [r for r in rows if r["duplicate_of"] in ("", None)]
    complete = [r for r in own if r["state"] == "COMPLETE"]
    at_seed = [r for r in complete if r["train_seed"] in ("", None) or int(r["train_seed"]) == study_seed]
    return {"complete": len(complete), "pruned": sum(r["state"] == "PRUNED" for r in own),
            "failed": sum(r["state"] == "FAIL" for r in own),
            "duplicates": sum(r["duplicate_of"] not in ("", None) for r in rows),
            "other_seeds": len(complete) - len(at_seed),
            "distinct": len({(r["allocation"], r["top_k"], r["rank"]) for r in at_seed})}


def census_text(counts: dict[str, int]) -> str:
    """"12 complete (6 at other training seeds: the pilot's; 5 distinct allocations at the study seed), ..."."""
    parts = []
    if counts["other_seeds"]:
        parts.append(f"{counts['other_seeds']} at other training seeds: the pilot's")
    parts.append(f"{counts['distinct']} distinct allocation{'s' if counts['distinct'] != 1 else ''} at the study "
                 "seed")
    text = (f"{counts['complete']} complete ({'; '.join(parts)}), {counts['pruned']} pruned, "
            f"{counts['failed']} failed")
    if counts["duplicates"]:
        text += f", {counts['duplicates']} duplicate proposals answered from the cache"
    return text
