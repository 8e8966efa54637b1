"""The search: one room per stage of a study.

    config      StudyConfig and presets (validated data; study.json)
    space/      encodings: how an Optuna point becomes a feasible allocation (one module per encoding)
    samplers    Optuna samplers by name; pruning: Optuna pruners for a noisy objective
    seeds/      the paper shapes and the AlphaLoRA allocation, evaluated first
    study/      the study folder and every file in it, the origin format, the Optuna driver, the exported best
    executors/  where trials run: in-process or Ray Tune (one interface)
    context     the handle every phase receives (StudyContext, open_study)
    pilot       the noise floor and the trial fidelity
    strategies/ how allocations are proposed: standalone, one-shot (one interface)
    final/      what becomes of the contenders: fixed finalists (one interface)
    outputs     best_allocation.json, finalists.csv, summary.md
    runner      run_study: the phases in order

Public entry points: `StudyConfig`, `run_study`, `SearchSpace`, `load_space`, `StudyFolder`, `Origin`.
"""

from mola_search.search.config import PRESETS, StudyConfig
from mola_search.search.space import SearchSpace, load_space
from mola_search.search.study import Origin, StudyFolder

__all__ = ["PRESETS", "Origin", "SearchSpace", "StudyConfig", "StudyFolder", "load_space", "run_study"]


def __getattr__(name: str):
    if name == "run_study":  # imports the executors and strategies: only when a study is run
        from mola_search.search.runner import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
