"""The rule for the exported allocation (best_allocation.json), and what the file says beside the spec.

The final stage decides (search.study.decision): the file exports the winner, or for "equivalent" and
"undecided" the tie set's member the tie-break rule picks, and it says which. The test split plays no part
in any choice and is reported once. Without finalists, the best completed search trial trained with the
study seed stands in, and the file says that one single-seed validation score chose it (decision
"undecided"). `choose_best` (highest mean validation score) remains the rule of studies made before races.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

from mola_search.search.study.finalist import Finalist


def choose_best(finalists: Sequence[Finalist]) -> Finalist:
    """Highest mean VALIDATION score over the finalist seeds; the test split plays no part in the choice."""
    scored = [f for f in finalists if f.validation]
    if not scored:
        raise ValueError("no finalist has a validation score")
    return max(scored, key=lambda f: f.val_mean)


def decision_record(decision: Any, folder: str) -> dict[str, Any]:
    """What best_allocation.json says of the decision: the verdict, delta, the level, the live set, the fine-tunes
    spent, the tie-break rule when one was needed, the decision in words and the command that moves it on."""
    from mola_search.search.study.decision import TIE_BREAK, WINNER

    names = [e.name for e in decision.contenders if e.label in decision.live]
    return {"decision": decision.decision, "min_effect": decision.min_effect, "level": decision.level,
            "live": names, "runs_spent": decision.runs, "rounds": decision.rounds, "max_runs": decision.max_runs,
            "stopped": decision.stopped, "tie_break": None if decision.decision == WINNER else TIE_BREAK,
            "decision_words": decision.words(), "next": decision.next_command(folder)}


def best_record(best: Finalist, config: dict[str, Any], chosen_by: str) -> dict[str, Any]:
    """The metadata best_allocation.json holds beside the allocation spec."""
    return dict(origin=best.origin, trial=best.number, chosen_by=chosen_by, metric=config.get("metric"),
                validation_mean=best.val_mean, validation_std=best.val_std,
                test_mean=best.test_mean if best.test else None, test_std=best.test_std if best.test else None,
                test_scores=best.test, test_accuracy_mean=best.test_accuracy_mean if best.test else None,
                finalist_seeds=best.seeds, model=config.get("model"), task=config.get("task"),
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


def exported_best(folder: Any) -> tuple[Any, dict[str, Any]]:
    """What `mola-search export` exports: best_allocation.json when the study wrote one, else the best completed
    search trial trained with the study seed (a study still running, or interrupted before its finalists)."""
    from mola_search.errors import UserError
    from mola_search.search.config import StudyConfig
    from mola_search.search.study.folder import StudyFolder
    from mola_search.search.study.records import best_search_trial, trial_spec

    handle = StudyFolder(folder)
    config = StudyConfig.load(handle.root)  # raises "not a study folder"
    written = handle.read_best_spec()
    if written is not None:
        return written
    best = best_search_trial(handle.open_optuna(config.storage, config.study_name), config.seed)
    if best is None:
        raise UserError(f"study {handle.root} has no completed trial with the study seed yet: nothing to export "
                        f"(run or resume it: `mola-search --resume {handle.root}`)")
    return trial_spec(best), {"validation_score": best.value, "trial": best.number,
                              "chosen_by": "validation score of one search trial (study seed)",
                              "model": config.model, "task": config.task}
