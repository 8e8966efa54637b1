"""Allocation arithmetic: how many LoRA experts each layer gets, as plain integers.

Pure Python on purpose (no torch): the search space, the CLIs and the report all
need allocations without paying for, or depending on, the training stack.
"""

from mola_search.allocation.rounding import round_to_budget
from mola_search.allocation.shapes import (
    DEFAULT_MAX_EXPERTS,
    SHAPES,
    block_sizes,
    default_max_experts,
    parse_counts,
    parse_digits,
    resample_depth,
    run_length,
    shape_allocation,
)
from mola_search.allocation.spec import (
    SCHEMA_VERSION,
    AllocationSpec,
    check_depth,
    load_spec,
    load_spec_with_metadata,
    resolve_allocation,
    save_spec,
    to_mola_flags,
)

__all__ = [
    "DEFAULT_MAX_EXPERTS",
    "SCHEMA_VERSION",
    "SHAPES",
    "AllocationSpec",
    "block_sizes",
    "check_depth",
    "default_max_experts",
    "load_spec",
    "load_spec_with_metadata",
    "parse_counts",
    "parse_digits",
    "resample_depth",
    "resolve_allocation",
    "round_to_budget",
    "run_length",
    "save_spec",
    "shape_allocation",
    "to_mola_flags",
]
