"""The last phase of a study: the exported allocation (best_allocation.json), finalists.csv and summary.md,
all derived from what the study recorded, and the decision in words as the last printed line."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mola_search.search.context import StudyContext
from mola_search.search.final import FinalResult
from mola_search.search.study import Finalist
from mola_search.search.study.best import best_record, decision_record
from mola_search.search.study.decision import WINNER, Decision
from mola_search.search.study.records import STUDY_WALL, best_search_trial, trial_origin, trial_spec
from mola_search.search.study.summary import summary_markdown
from mola_search.search.study.throughput import phase_use, throughput_lines


def write_outputs(study: StudyContext, final: FinalResult, sections: Sequence[str] = (),
                  summarize: Callable[[Path], str] | None = None) -> Finalist | None:
    """Write the study's result files; returns the exported finalist (None when nothing finished).

    `summarize(folder)` may return the Markdown of summary.md (the CLI passes the report's `study_summary`);
    without it, or if it fails, summary.md holds the decision, the noise floor and the finalists, then
    `sections`."""
    config, folder = study.config, study.folder
    session = time.time() - study.started
    earlier = earlier_wall_time(study)  # a resumed or continued study counts its earlier sessions
    wall = None if earlier is None else earlier + session
    if wall is not None:
        study.driver.study.set_user_attr(STUDY_WALL, round(wall, 1))
    best = _export(study, final, wall)
    folder.write_finalists_csv(final.finalists)
    analysis = None
    if summarize is not None:
        try:
            analysis = summarize(folder.root)
        except Exception as exc:  # noqa: BLE001 - the study is done; a failing analysis must not hide it
            study.message(f"summary.md keeps the plain summary: the analysis failed ({type(exc).__name__}: {exc})")
    uses = phase_use(study.driver.study, folder, folder.read_oneshot(), folder.read_racing())
    throughput = throughput_lines(uses, wall_time_s=wall, cpus_per_trial=config.cpus_per_trial,
                                  gpus_per_trial=config.gpus_per_trial)
    folder.write_summary(summary_markdown(folder.name, config.to_dict(), study.driver.study, final.finalists, best,
                                          wall, session_s=session, noise=folder.read_noise(), analysis=analysis,
                                          sections=sections,
                                          decision=final.decision, folder=str(folder.root), throughput=throughput))
    study.message(f"done in {session / 60:.1f} min: {folder.summary_md}")
    study.message(_last_line(final.decision, best, str(folder.root)))
    return best


def earlier_wall_time(study: StudyContext) -> float | None:
    """Seconds the study's earlier sessions spent, as their outputs recorded it: 0 for a study that began in
    this session, None when earlier sessions ran trials but recorded no time (an interrupted first session,
    or a study older than the record; best_allocation.json may still hold it)."""
    recorded = study.driver.study.user_attrs.get(STUDY_WALL)
    if recorded is None:
        recorded = (study.folder.read_best() or {}).get("study_wall_time_s")
    if recorded is not None:
        return float(recorded)
    before = [t for t in study.driver.study.get_trials(deepcopy=False)
              if t.datetime_complete is not None and t.datetime_complete.timestamp() < study.started]
    return None if before else 0.0


def _export(study: StudyContext, final: FinalResult, wall: float | None) -> Finalist | None:
    """best_allocation.json: the decided allocation (the winner, or the tie-break's pick of the tie set), or
    without finalists the best search trial trained with the study seed. The file says which rule chose it."""
    config, decision = study.config, final.decision
    chosen = next((f for f in final.finalists if decision is not None and f.label == decision.chosen), None)
    if chosen is not None:
        if decision.decision == WINNER:
            chosen_by = (f"the race's winner: better than every other contender on mean validation {config.metric} "
                         f"over seeds {', '.join(map(str, chosen.seeds))} at family-wise level {decision.level:g}; "
                         "test reported once")
        else:
            chosen_by = (f"{decision.decision}: not a best; the tie-break picked it from the tie set "
                         f"({', '.join(e.name for e in decision.contenders if e.label in decision.live)}); test "
                         "reported once")
        record = {**best_record(chosen, config.to_dict(), chosen_by), **decision_record(decision, str(study.folder.root)),
                  **_wall_record(wall)}
        study.folder.write_best(chosen.spec, record)
        return chosen
    trial = best_search_trial(study.driver.study, config.seed)
    if trial is None:
        return None
    best = Finalist(f"t{trial.number:03d}", trial.number, trial_origin(trial).text, trial_spec(trial),
                    [trial.value], [], seeds=[config.seed])
    record = {**best_record(best, config.to_dict(), f"validation {config.metric} of one search trial"),
              **_wall_record(wall)}
    record.update(decision="undecided", decision_words="decision: undecided: no finalist was retrained, so nothing "
                  "separates this trial from the others beyond one seed's validation score")
    study.folder.write_best(best.spec, record)
    return best


def _wall_record(wall: float | None) -> dict[str, float]:
    return {} if wall is None else {"study_wall_time_s": round(wall, 1)}


def _last_line(decision: Decision | None, best: Finalist | None, folder: str) -> str:
    """The decision in words, then the command that would move it on: what a reader of the terminal leaves with."""
    if decision is None:
        if best is None:
            return "decision: none: no trial finished"
        return (f"decision: undecided: no finalist was retrained (finalist_seeds 0); the best search trial is "
                f"{best.origin} on one seed's validation score. Next: mola-search decide {folder}")
    return f"{decision.words()}. Next: {decision.next_command(folder)}"
