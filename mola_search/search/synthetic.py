"""Objectives with a known optimum: test the search machinery without training anything.

A real trial fine-tunes a model for minutes; these score an allocation in
microseconds, and their best allocation is known exactly. That lets tests check
that the search, the seeding, the pruning and the importance analysis find what is
there, and lets a benchmark compare samplers by how close they get per trial.

* ``upper``: the best allocation is upper-heavy (counts rising with depth as
  (j+1)^1.5); the score falls with the squared distance to it.
* ``middle``: the same with a middle-heavy target.
* ``sparse``: only the top quarter of the layers matter (Σ ln(1 + c_j) over them,
  a concave gain); the rest contribute nothing. The optimum puts as many experts
  as allowed on those layers, evenly. Importance analysis should single them out.

Every score of a feasible allocation lies in [0, 1], and the optimum scores 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from mola_search.allocation import round_to_budget
from mola_search.errors import UserError

SYNTHETIC_NAMES: tuple[str, ...] = ("upper", "middle", "sparse")
SYNTHETIC_PREFIX = "synthetic"


@dataclass(frozen=True)
class SyntheticObjective:
    """A noisy score of an allocation whose optimum is known.

    Observation model (`__call__`), for a fidelity f in (0, 1] (the fraction of full
    training a trial got): ``(1 - s) * value + s * 0.5 + N(0, sd)`` with shrink
    ``s = 0.5 * (1 - f)`` and ``sd = noise * (1.5 - f)``. Like a short training run,
    a low-fidelity observation separates allocations less (it is pulled towards 0.5)
    and is noisier; at f = 1 it is unbiased with sd = noise / 2. The ranking of the
    noise-free parts is the same at every fidelity, as ASHA-style pruning assumes.
    """

    name: str
    num_layers: int
    budget: int
    min_experts: int = 1
    max_experts: int | None = 8
    noise: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in SYNTHETIC_NAMES:
            raise UserError(f"unknown synthetic objective '{self.name}': use one of {', '.join(SYNTHETIC_NAMES)}")
        for key in ("num_layers", "min_experts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key} is {value!r}: use an integer >= 1")
        if not isinstance(self.noise, (int, float)) or isinstance(self.noise, bool) or not self.noise >= 0:
            raise UserError(f"noise is {self.noise!r}: use a number >= 0")
        # Raises the standard "budget ... is infeasible ..." UserError for an impossible budget or bounds.
        round_to_budget([0.0] * self.num_layers, self.budget, self.min_experts, self.max_experts)

    # ---------------------------------------------------------------------------------- public

    def informative_layers(self) -> tuple[int, ...]:
        """Layers whose expert count changes the score: the top quarter for sparse, else all."""
        if self.name == "sparse":
            count = math.ceil(self.num_layers / 4)
            return tuple(range(self.num_layers - count, self.num_layers))
        return tuple(range(self.num_layers))

    def optimum(self) -> tuple[list[int], float]:
        """The best feasible allocation and its noise-free score (1.0 by construction)."""
        best = list(self._best)
        return best, self.value(best)

    def value(self, experts: Sequence[int]) -> float:
        """Noise-free score in [0, 1] of a feasible allocation; an infeasible one is refused."""
        counts = self._check(experts)
        if self.name == "sparse":
            low, high = self._sparse_range
            if high == low:  # a single possible gain: every feasible allocation is optimal
                return 1.0
            return (self._sparse_gain(counts) - low) / (high - low)
        if self._scale == 0:
            return 1.0
        distance = sum((c - t) ** 2 for c, t in zip(counts, self._best))
        return 1.0 - distance / self._scale

    def __call__(self, experts: Sequence[int], fidelity: float = 1.0, rng: random.Random | None = None) -> float:
        """A noisy observation at `fidelity` (see the class docstring).

        Without `rng` the noise is a fixed function of (objective, allocation, fidelity),
        as a training run with a fixed seed is: repeating a call repeats its result.
        """
        if isinstance(fidelity, bool) or not isinstance(fidelity, (int, float)) or not 0 < fidelity <= 1:
            raise UserError(f"fidelity is {fidelity!r}: use a fraction of full training in (0, 1]")
        clean = self.value(experts)
        if rng is None:
            rng = random.Random(f"{self}|{list(experts)}|{float(fidelity)!r}")
        shrink = 0.5 * (1.0 - fidelity)
        return (1.0 - shrink) * clean + shrink * 0.5 + rng.gauss(0.0, self.noise * (1.5 - fidelity))

    # ---------------------------------------------------------------------------------- internals

    @property
    def _upper_bound(self) -> int:
        """Most experts one layer can hold: max_experts, or what the others leave at their minimum."""
        if self.max_experts is not None:
            return self.max_experts
        return self.budget - (self.num_layers - 1) * self.min_experts

    @cached_property
    def _best(self) -> tuple[int, ...]:
        if self.name == "sparse":
            return tuple(self._sparse_best())
        depth = [(j + 0.5) / self.num_layers for j in range(self.num_layers)]
        if self.name == "upper":
            weights = [(j + 1) ** 1.5 for j in range(self.num_layers)]
        else:
            weights = [0.2 + math.sin(math.pi * d) for d in depth]
        # The target is itself rounded to a feasible allocation, so it is attainable: the optimum.
        return tuple(round_to_budget(weights, self.budget, self.min_experts, self.max_experts))

    @cached_property
    def _scale(self) -> float:
        """Fixed normaliser: no feasible point is farther from the target in any layer than this sum."""
        low, high = self.min_experts, self._upper_bound
        return float(sum(max((low - t) ** 2, (high - t) ** 2) for t in self._best))

    def _sparse_gain(self, counts: Sequence[int]) -> float:
        return sum(math.log1p(counts[j]) for j in self.informative_layers())

    def _sparse_best(self) -> list[int]:
        """As many experts as allowed on the informative layers, evenly (the gain is concave); rest at min."""
        informative = self.informative_layers()
        others = self.num_layers - len(informative)
        room = self.budget - others * self.min_experts
        on_informative = min(room, len(informative) * self._upper_bound)
        top = _spread(len(informative), on_informative, self.min_experts, self._upper_bound)
        rest = _spread(others, self.budget - on_informative, self.min_experts, self._upper_bound)
        return rest + top

    @cached_property
    def _sparse_range(self) -> tuple[float, float]:
        """(least, greatest) gain over feasible allocations, to map gains onto [0, 1].

        The least puts as few experts as possible on the informative layers and, the gain
        being concave, piles them up instead of spreading them (the most unequal split).
        """
        informative = len(self.informative_layers())
        others = self.num_layers - informative
        low, high = self.min_experts, self._upper_bound
        least_total = max(informative * low, self.budget - others * high)
        extra, least = least_total - informative * low, 0.0
        for _ in range(informative):
            given = min(extra, high - low)
            least += math.log1p(low + given)
            extra -= given
        return least, self._sparse_gain(self._sparse_best())

    def _check(self, experts: Sequence[int]) -> list[int]:
        counts = list(experts)
        if len(counts) != self.num_layers:
            raise UserError(f"allocation has {len(counts)} layers, the objective {self.num_layers}: "
                            f"give one count per layer")
        if sum(counts) != self.budget:
            raise UserError(f"allocation sums to {sum(counts)} experts, the budget is {self.budget}")
        for j, count in enumerate(counts):
            if count < self.min_experts or (self.max_experts is not None and count > self.max_experts):
                raise UserError(f"layer {j} has {count} experts; allowed: {self.min_experts}.."
                                f"{self.max_experts if self.max_experts is not None else 'budget'}")
        return counts


def make_synthetic(spec: str, num_layers: int, budget: int, min_experts: int = 1,
                   max_experts: int | None = None, noise: float = 0.01) -> SyntheticObjective:
    """Parse a task name like "synthetic" (= synthetic:upper) or "synthetic:sparse"."""
    text = spec.strip().lower()
    prefix, _, name = text.partition(":")
    accepted = ", ".join([SYNTHETIC_PREFIX] + [f"{SYNTHETIC_PREFIX}:{n}" for n in SYNTHETIC_NAMES])
    if prefix != SYNTHETIC_PREFIX or (name and name not in SYNTHETIC_NAMES):
        raise UserError(f"unknown synthetic objective '{spec}': use one of {accepted}")
    return SyntheticObjective(name or SYNTHETIC_NAMES[0], num_layers, budget, min_experts, max_experts, noise)


def is_synthetic(spec: str) -> bool:
    """Whether a task name asks for a synthetic objective (so no model or data is needed)."""
    return spec.strip().lower().partition(":")[0] == SYNTHETIC_PREFIX


def _spread(count: int, total: int, low: int, high: int) -> list[int]:
    """`total` experts over `count` layers as evenly as possible within [low, high]."""
    if count == 0:
        return []
    return round_to_budget([0.0] * count, total, low, high)
