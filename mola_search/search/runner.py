"""A whole study, start to finish, as a list of phases.

open (every check first: bad input leaves no folder) -> pilot (noise floor, trial fidelity) -> the strategy
queues what to train -> search (the executor trains it) -> the strategy's contenders -> the final stage
(a race over fresh seeds, or a fixed block: the decision) -> the strategy concludes -> outputs (the decided
allocation exported, test reported once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search.search.config import StudyConfig
from mola_search.search.context import finished_search_fidelity, open_study, raced_contenders
from mola_search.search.final import FINAL_STAGES
from mola_search.search.outputs import write_outputs
from mola_search.search.pilot import run_pilot
from mola_search.search.strategies import STRATEGIES


def run_study(config: StudyConfig, folder: str | Path, *, resume: bool = False,
              summarize: Callable[[Path], str] | None = None,
              objective: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run (or with `resume`, continue) the study `config` in `folder`; returns the folder, the exported best
    and the finalists.

    `objective(trial)` replaces the built-in MoLA fine-tune with your own scoring (trial.objective says what it
    gets and returns). `summarize(folder)` may return the Markdown of summary.md (the CLI passes the report's
    `study_summary`: paired CIs and the layer headline)."""
    study = open_study(config, folder, resume=resume, objective=objective)
    strategy = STRATEGIES[study.config.strategy]()
    study.message(_header(study, strategy.describe(study)))
    study.fidelity = run_pilot(study)
    strategy.queue(study)
    search(study, strategy.searched)
    final = FINAL_STAGES[study.config.final_stage]().run(study, strategy.contenders(study))
    sections = strategy.conclude(study, final.finalists)
    best = write_outputs(study, final, sections, summarize)
    return {"folder": str(study.folder.root), "best": best, "finalists": final.finalists, "decision": final.decision}


def search(study, what: str) -> None:
    """Train the queued and sampled trials; trials.csv is rewritten as each finishes, and once more at the end."""
    driver = study.driver
    study.progress.resume_from(driver.trained_trials())
    try:
        if driver.remaining() > 0:
            study.message(f"search: {driver.remaining()} {what} at {study.fidelity.describe()}")
            study.executor.search(driver, study.fidelity, study.concurrency("search"))
    finally:
        study.folder.write_trials_csv(driver.study)


def _header(study, strategy_part: str) -> str:
    config, space = study.config, study.space
    return (f"study {study.folder.root} | {config.task} on {config.model} ({study.num_layers} layers) | budget "
            f"{study.budget} | space {space.name}/{space.encoding} | sampler {config.sampler} | pruner "
            f"{config.scheduler} | metric {config.metric} | {strategy_part} | seeds: "
            f"{', '.join(s.name for s in study.seeds)}")


def decide_study(folder: str | Path, *, summarize: Callable[[Path], str] | None = None,
                 **changes: Any) -> dict[str, Any]:
    """Continue (or start) the race of the study in `folder` with `changes` (`min_effect`, `max_finalist_runs`,
    `time_budget`, resources): the contenders are those the study raced or retrained before (its finished
    runs count as they are, a study made before races included), else the strategy's; nothing is trained
    twice. The outputs are rewritten with the decision."""
    import time as _time

    config = StudyConfig.load(folder)
    config = StudyConfig.from_dict({**config.to_dict(), **changes, "final_stage": "racing"})
    study = open_study(config, folder, resume=True)
    if "time_budget" in changes:
        study.started = _time.time()  # a budget given to `decide` counts from now
    study.fidelity = finished_search_fidelity(study)
    contenders = raced_contenders(study) or STRATEGIES[config.strategy]().contenders(study)
    study.message(f"decide {study.folder.root}: {len(contenders)} contenders, δ {config.effect_size():g} "
                  f"{config.metric}, budget {config.finalist_budget()} fine-tunes")
    final = FINAL_STAGES["racing"]().run(study, contenders)
    best = write_outputs(study, final, (), summarize)
    return {"folder": str(study.folder.root), "best": best, "finalists": final.finalists, "decision": final.decision}
