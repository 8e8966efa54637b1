"""Statistics the study rests on: numpy and SciPy only (no torch, no Optuna), so every layer above may use them.

* `noise`: the noise floor, a seed-blocked two-way analysis of pilot scores (`estimate_noise`, `NoiseFloor`);
* `paired`: paired comparisons of two allocations on the same seeds and examples (`paired_comparison`,
  `paired_examples`, `Paired`);
* `rank`: rank agreement (`kendall_tau`, `rank_agreement`).
"""

from mola_search.stats.noise import NoiseFloor, estimate_noise
from mola_search.stats.paired import Paired, paired_comparison, paired_examples
from mola_search.stats.rank import kendall_tau, rank_agreement

__all__ = ["NoiseFloor", "Paired", "estimate_noise", "kendall_tau", "paired_comparison", "paired_examples",
           "rank_agreement"]
