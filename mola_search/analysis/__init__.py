"""Study analysis: the report, expert redundancy, routing and which layers matter.

    build_report(study_folder) -> Path            # report/index.html (+ PNGs, summary.md)
    analyze_adapter(adapter_folder)               # redundancy + routing of one trained adapter
    compare_studies([study_a, study_b]) -> Path   # side by side
    module_redundancy(lora_A, lora_B, scaling)    # pure: mean pairwise Frobenius distances
    layer_effects(allocations, scores, ...)       # ridge + bootstrap CI of score per expert
    optuna_importances(study)                     # PED-ANOVA + fANOVA
    balance_loss(share, mean_prob)                # N * sum f_i P_i
"""

from mola_search.analysis.adapter import AdapterAnalysis, analyze_adapter
from mola_search.analysis.compare import compare_studies
from mola_search.analysis.importance import layer_effects, optuna_importances, verdicts
from mola_search.analysis.redundancy import (adapter_redundancy, module_redundancy, pairwise_delta_distances,
                                             pairwise_distances, per_layer)
from mola_search.analysis.report import build_report
from mola_search.analysis.routing import balance_loss, routing_by_layer
from mola_search.analysis.studydata import StudyData, load_study

__all__ = [
    "AdapterAnalysis", "StudyData", "adapter_redundancy", "analyze_adapter", "balance_loss", "build_report",
    "compare_studies", "layer_effects", "load_study", "module_redundancy", "optuna_importances",
    "pairwise_delta_distances", "pairwise_distances", "per_layer", "routing_by_layer", "verdicts",
]
