"""Study analysis: the report, expert redundancy, routing and which layers matter.

    build_report(study_folder) -> Path            # report/index.html (+ PNGs, summary.md)
    study_summary(study_folder) -> str            # Markdown: noise floor, result table, layer headline (no figures)
    result_table(load_study(folder))              # finalists chosen on validation, paired test comparisons
    analyze_adapter(adapter_folder)               # redundancy + routing of one trained adapter
    compare_studies([study_a, study_b]) -> Path   # side by side
    module_redundancy(lora_A, lora_B, scaling)    # pure: mean pairwise Frobenius distances
    layer_effects(allocations, scores, ...)       # ridge (seed-blocked) + bootstrap CI of score per expert
    headline(per_block_effects, noise_line)       # "which layers deserve more experts", from the intervals
    optuna_importances(study)                     # PED-ANOVA + fANOVA
    balance_loss(share, mean_prob)                # N * sum f_i P_i

Names are imported on first use, so reading a study (studydata, results) loads
neither matplotlib nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterAnalysis": "adapter", "analyze_adapter": "adapter",
    "compare_studies": "compare",
    "headline": "importance", "layer_effects": "importance", "optuna_importances": "importance",
    "verdicts": "importance",
    "adapter_redundancy": "redundancy", "module_redundancy": "redundancy", "per_layer": "redundancy",
    "build_report": "report", "study_summary": "report",
    "result_table": "results",
    "balance_loss": "routing", "routing_by_layer": "routing",
    "StudyData": "studydata", "load_study": "studydata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
