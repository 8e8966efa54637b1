"""The last phase of a study: the exported best (best_allocation.json), finalists.csv and summary.md, all
derived from what the study recorded."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mola_search.allocation import run_length
from mola_search.search.context import StudyContext
from mola_search.search.study import Finalist, choose_best
from mola_search.search.study.best import best_record
from mola_search.search.study.records import best_search_trial, trial_origin, trial_spec
from mola_search.search.study.summary import summary_markdown


def write_outputs(study: StudyContext, finalists: Sequence[Finalist], sections: Sequence[str] = (),
                  summarize: Callable[[Path], str] | None = None) -> Finalist | None:
    """Write the study's result files; returns the exported best (None when nothing finished).

    `summarize(folder)` may return the Markdown of summary.md (the CLI passes the report's `study_summary`);
    without it, or if it fails, summary.md holds the noise floor and the finalists, then `sections`."""
    config, folder = study.config, study.folder
    best = _export_best(study, finalists)
    folder.write_finalists_csv(finalists)
    wall = time.time() - study.started
    analysis = None
    if summarize is not None:
        try:
            analysis = summarize(folder.root)
        except Exception as exc:  # noqa: BLE001 - the study is done; a failing analysis must not hide it
            study.message(f"summary.md keeps the plain summary: the analysis failed ({type(exc).__name__}: {exc})")
    folder.write_summary(summary_markdown(folder.name, config.to_dict(), study.driver.study, finalists, best, wall,
                                          noise=folder.read_noise(), analysis=analysis, sections=sections))
    study.message(f"done in {wall / 60:.1f} min: {folder.summary_md}"
                  + (f" | best {run_length(best.spec.experts)} ({best.origin}, chosen on validation)" if best else ""))
    return best


def _export_best(study: StudyContext, finalists: Sequence[Finalist]) -> Finalist | None:
    """best_allocation.json: the finalist with the best mean validation score, or without finalists the best
    search trial trained with the study seed (the file says which rule chose it)."""
    config = study.config
    scored = [f for f in finalists if f.validation]
    if scored:
        best = choose_best(scored)
        chosen_by = (f"mean validation {config.metric} over {len(best.validation)} finalist seeds "
                     f"({', '.join(map(str, best.seeds))}); test reported once")
    elif (trial := best_search_trial(study.driver.study, config.seed)) is not None:
        best = Finalist(f"t{trial.number:03d}", trial.number, trial_origin(trial).text, trial_spec(trial),
                        [trial.value], [], seeds=[config.seed])
        chosen_by = f"validation {config.metric} of one search trial"
    else:
        return None
    study.folder.write_best(best.spec, best_record(best, config.to_dict(), chosen_by))
    return best
