"""mola-search: find where a fine-tuned LLM needs its LoRA experts.

Data flow, one sub-package per stage:
allocation (pure Python spec) -> mola (adapter) -> train (trainer/evaluator)
-> search (trial, Optuna + Ray Tune) -> analysis (report).
"""

__version__ = "0.1.0"
