"""The paper's experiments in one harness: Table 1 (`table`) and continual learning (`continual`).

Both drive ordinary `RunConfig` runs (same loop, prompts and scoring as `mola-train`) over
method specs such as ``lora``, ``lora:match``, ``prompt-tuning``, ``llama-adapter``, ``full``,
``mola:inverted_triangle``, ``mola:2468`` or ``mola:best_allocation.json``.
"""

from mola_search.bench.continual import (
    Domain,
    continual_scores,
    field_domains,
    run_continual,
    run_sequence,
    task_domains,
)
from mola_search.bench.table import MethodSpec, parse_method, parse_methods, run_table

__all__ = [
    "Domain",
    "MethodSpec",
    "continual_scores",
    "field_domains",
    "parse_method",
    "parse_methods",
    "run_continual",
    "run_sequence",
    "run_table",
    "task_domains",
]
