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

Every noise-free score of a feasible allocation lies in [0, 1], and the optimum scores 1.

Seeded observation model (`SyntheticObjective.observe`), with a *known* split of
allocation effect and training noise, for allocation x, training seed k, fidelity f
in (0, 1] and n training examples (default REFERENCE_EXAMPLES)::

    y(x, k) = (1 - s) v(x) + s / 2  +  h g [ seed_sd * z_S(k)  +  noise * z_E(x, k) ]

    s = (1 - f) / 2                     shrink: a short run separates allocations less
    g = 3 - 2 f                         sd multiplier: 1 at f = 1, 2 at f = 0.5
    h = (REFERENCE_EXAMPLES / n) ** e  e = noise_exponent: 0.5 by default (doubling the training data shrinks
                                       the noise by sqrt(2)); `calibrated` uses the exponent measured on MRPC

z_S (the seed's block effect: one seed = one training subset and order, shared by every
allocation) and z_E (the allocation x seed residual) are standard normals, fixed
functions of (objective, seed[, allocation], n); a run observed at two fidelities
shares half of its noise variance (RUNG_CORRELATION), as a run stopped early and the
same run finished do. A search compares trials at one seed, so only ``noise`` blurs
its comparisons; `true_allocation_share` is the share `noise.estimate_noise` should
recover from a pilot.

Per-example values (`observe_examples`, for paired pruning over validation
examples) spread around y and average to it exactly::

    x_j = y + example_sd [ (d_j - mean d) + (u_j - mean u) ],   j = 1..n_examples

with example difficulties d_j shared by all allocations and seeds and u_j specific to
(allocation, seed, fidelity, n). The legacy `__call__` draws independent noise of sd
``noise * (1.5 - f)`` per call instead (no seeds).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mola_search.allocation import round_to_budget
from mola_search.errors import UserError

SYNTHETIC_NAMES: tuple[str, ...] = ("upper", "middle", "sparse")
SYNTHETIC_PREFIX = "synthetic"
REFERENCE_EXAMPLES = 64      # training examples at which seed_sd and noise hold as given
RUNG_CORRELATION = 0.5       # share of a run's noise variance common to all its fidelities
DEFAULT_VALIDATION_EXAMPLES = 200

# Noise sizes measured on MRPC with SmolLM2-135M (gold log-prob; docs/strategies.md has the commands):
# - the cpu-standard pilot's seed-paired residual sd at trial fidelity (256 training examples): 0.059;
# - finalists' sd over seeds at 64 steps on 1024 examples: 0.003 to 0.015 (0.010 taken here);
# - the per-example sd of gold log-prob within one run: 0.11 to 0.42 over the pilot's runs (0.3 taken).
# With noise_exponent g the residual at n examples is noise * (64 / n) ** g: 0.059 at 256 and 0.010 at 1024
# give g = log(5.9) / log(4) = 1.28 and noise = 0.059 / (64 / 256) ** 1.28 = 0.349. The seed's own effect
# (shared by every allocation a seed trains, cancelled by pairing) is taken as large as the residual.
CALIBRATED_MRPC = {"noise": 0.349, "seed_sd": 0.349, "example_sd": 0.3, "noise_exponent": 1.28}


@dataclass(frozen=True)
class SyntheticObjective:
    """A noisy score of an allocation whose optimum is known.

    `observe` / `observe_examples` follow the seeded model of the module docstring
    (``seed_sd``, ``noise``, ``example_sd`` are its standard deviations at full fidelity
    and REFERENCE_EXAMPLES training examples).

    Legacy observation model (`__call__`), for a fidelity f in (0, 1] (the fraction of full
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
    seed_sd: float = 0.01
    example_sd: float = 0.1
    noise_exponent: float = 0.5   # the noise falls as (REFERENCE_EXAMPLES / n) ** this with n training examples
    stream: int = 0               # another stream of the same model's noise (a benchmark's repetition)

    def __post_init__(self) -> None:
        if self.name not in SYNTHETIC_NAMES:
            raise UserError(f"unknown synthetic objective '{self.name}': use one of {', '.join(SYNTHETIC_NAMES)}")
        for key in ("num_layers", "min_experts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key} is {value!r}: use an integer >= 1")
        for key in ("noise", "seed_sd", "example_sd"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise UserError(f"{key} is {value!r}: use a number >= 0")
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
        _check_fidelity(fidelity)
        clean = self.value(experts)
        if rng is None:
            rng = random.Random(f"{self._legacy_repr}|{list(experts)}|{float(fidelity)!r}")
        shrink = 0.5 * (1.0 - fidelity)
        return (1.0 - shrink) * clean + shrink * 0.5 + rng.gauss(0.0, self.noise * (1.5 - fidelity))

    def observe(self, experts: Sequence[int], *, seed: int, fidelity: float = 1.0,
                train_examples: int | None = None) -> float:
        """The score of a training run of `experts` with training seed `seed` (module docstring model).

        Deterministic in (objective, experts, seed, fidelity, train_examples), as a
        fixed-seed training run is: no trial number enters it, so the same allocation
        trained twice with one seed scores the same.
        """
        counts = [int(c) for c in self._check(experts)]
        _check_fidelity(fidelity)
        seed, n = _check_seed(seed), self._train_examples(train_examples)
        z_seed = self._run_normal("seed", seed, n, float(fidelity))
        z_residual = self._run_normal("residual", tuple(counts), seed, n, float(fidelity))
        scale = self._noise_scale(fidelity, n)
        return self._clean_at(self.value(counts), fidelity) + scale * (self.seed_sd * z_seed + self.noise * z_residual)

    def observe_examples(self, experts: Sequence[int], *, seed: int, fidelity: float = 1.0,
                         n: int = DEFAULT_VALIDATION_EXAMPLES, train_examples: int | None = None) -> list[float]:
        """`n` per-example validation values of the run `observe` scores; their mean is that score.

        Example j keeps its difficulty across allocations and seeds, so pairing two runs'
        values by j (as `optuna.pruners.WilcoxonPruner` does) cancels it.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"n is {n!r}: use a number of validation examples >= 1")
        counts = [int(c) for c in self._check(experts)]
        mean = self.observe(counts, seed=seed, fidelity=fidelity, train_examples=train_examples)
        key = ("examples", tuple(counts), int(seed), self._train_examples(train_examples), float(fidelity))
        difficulty = _generator(self._identity, "difficulty", n).standard_normal(n)
        specific = _generator(self._identity, *key, n).standard_normal(n)
        spread = self.example_sd * ((difficulty - difficulty.mean()) + (specific - specific.mean()))
        values = mean + spread
        values[-1] += mean * n - math.fsum(values)  # the mean is the observation, up to one rounding
        return [float(v) for v in values]

    def true_allocation_share(self, allocations: Sequence[Sequence[int]], *, fidelity: float = 1.0,
                              train_examples: int | None = None) -> float:
        """The seed-paired allocation share of variance that `estimate_noise` estimates from a pilot.

        With w_i the noise-free observed values (1 - s) v + s / 2 of the a allocations
        and sigma_E = h g noise the residual sd (module docstring)::

            S = sum_i (w_i - mean w)^2 / (a - 1);   share = S / (S + sigma_E^2)

        NaN when both are zero.
        """
        if len(allocations) < 2:
            raise UserError(f"{len(allocations)} allocation(s) given: the share needs at least 2")
        _check_fidelity(fidelity)
        n = self._train_examples(train_examples)
        clean = [self._clean_at(self.value(x), fidelity) for x in allocations]
        centre = math.fsum(clean) / len(clean)
        spread = math.fsum((w - centre) ** 2 for w in clean) / (len(clean) - 1)
        residual = (self._noise_scale(fidelity, n) * self.noise) ** 2
        return spread / (spread + residual) if spread + residual > 0 else math.nan

    # ---------------------------------------------------------------------------------- internals

    @staticmethod
    def _clean_at(value: float, fidelity: float) -> float:
        shrink = 0.5 * (1.0 - fidelity)
        return (1.0 - shrink) * value + shrink * 0.5

    def _noise_scale(self, fidelity: float, train_examples: int) -> float:
        """h * g of the module docstring (h = (REFERENCE_EXAMPLES / n) ** noise_exponent)."""
        return (REFERENCE_EXAMPLES / train_examples) ** self.noise_exponent * (3.0 - 2.0 * fidelity)

    def noise_at(self, experts: Sequence[int], *, seed: int, fidelity: float = 1.0,
                 train_examples: int | None = None) -> float:
        """The noise part of `observe`: what a training run with `seed` adds to the allocation's clean score."""
        counts = [int(c) for c in self._check(experts)]
        return self.observe(counts, seed=seed, fidelity=fidelity, train_examples=train_examples) - \
            self._clean_at(self.value(counts), fidelity)

    @classmethod
    def calibrated(cls, name: str, num_layers: int, budget: int, min_experts: int = 1,
                   max_experts: int | None = 8, stream: int = 0) -> "SyntheticObjective":
        """The noise sizes measured on real MRPC studies with SmolLM2-135M (`CALIBRATED_MRPC`)."""
        return cls(name, num_layers, budget, min_experts, max_experts, **CALIBRATED_MRPC, stream=stream)

    @staticmethod
    def _train_examples(value: int | None) -> int:
        if value is None:
            return REFERENCE_EXAMPLES
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"train_examples is {value!r}: use a number of training examples >= 1 (or None for "
                            f"{REFERENCE_EXAMPLES})")
        return value

    def _run_normal(self, kind: str, *key: object) -> float:
        """A standard normal of one run: RUNG_CORRELATION of its variance shared by all fidelities."""
        *run, fidelity = key
        shared = _generator(self._identity, kind, *run).standard_normal()
        own = _generator(self._identity, kind, *run, fidelity).standard_normal()
        return float(math.sqrt(RUNG_CORRELATION) * shared + math.sqrt(1.0 - RUNG_CORRELATION) * own)

    @property
    def _identity(self) -> str:
        """What the random draws depend on: the objective's shape, not its noise sizes (so they scale)."""
        base = f"{self.name}|{self.num_layers}|{self.budget}|{self.min_experts}|{self.max_experts}"
        return base if not self.stream else f"{base}|stream{self.stream}"

    @property
    def _legacy_repr(self) -> str:
        """The repr `__call__` keyed its noise on before the seeded model existed (keeps old draws)."""
        return (f"SyntheticObjective(name={self.name!r}, num_layers={self.num_layers!r}, budget={self.budget!r}, "
                f"min_experts={self.min_experts!r}, max_experts={self.max_experts!r}, noise={self.noise!r})")

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
                   max_experts: int | None = None, noise: float = 0.01, *, seed_sd: float = 0.01,
                   example_sd: float = 0.1) -> SyntheticObjective:
    """Parse a task name like "synthetic" (= synthetic:upper) or "synthetic:sparse".

    `noise`, `seed_sd` and `example_sd` are the standard deviations of the seeded
    observation model (module docstring).
    """
    text = spec.strip().lower()
    prefix, _, name = text.partition(":")
    accepted = ", ".join([SYNTHETIC_PREFIX] + [f"{SYNTHETIC_PREFIX}:{n}" for n in SYNTHETIC_NAMES])
    if prefix != SYNTHETIC_PREFIX or (name and name not in SYNTHETIC_NAMES):
        raise UserError(f"unknown synthetic objective '{spec}': use one of {accepted}")
    return SyntheticObjective(name or SYNTHETIC_NAMES[0], num_layers, budget, min_experts, max_experts, noise,
                              seed_sd, example_sd)


def is_synthetic(spec: str) -> bool:
    """Whether a task name asks for a synthetic objective (so no model or data is needed)."""
    return spec.strip().lower().partition(":")[0] == SYNTHETIC_PREFIX


def _spread(count: int, total: int, low: int, high: int) -> list[int]:
    """`total` experts over `count` layers as evenly as possible within [low, high]."""
    if count == 0:
        return []
    return round_to_budget([0.0] * count, total, low, high)


def _check_fidelity(fidelity: float) -> None:
    if isinstance(fidelity, bool) or not isinstance(fidelity, (int, float)) or not 0 < fidelity <= 1:
        raise UserError(f"fidelity is {fidelity!r}: use a fraction of full training in (0, 1]")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed is {seed!r}: use a training seed, an integer >= 0")
    return int(seed)


def _generator(*key: object) -> np.random.Generator:
    """A generator that is a fixed function of `key` (stable across processes, unlike hash())."""
    digest = hashlib.blake2b("|".join(map(repr, key)).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def synthetic_trial(settings: Any, fidelity: Any, request: Any, report: Any, num_layers: int, outcome: Any) -> None:
    """The seeded synthetic model in place of a fine-tune (objective ``synthetic[:name]``): the same reports
    and the same files as a real trial, in microseconds. A finalist also gets a test split: the same run
    (same expected score), other examples with their own sampling noise."""
    from mola_search._io import write_json
    from mola_search.trial import _hooks
    from mola_search.trial.objective import TrialPruned

    objective = make_synthetic(settings.objective, num_layers, sum(request.experts), min_experts=request.min_experts,
                               max_experts=request.max_experts, **_hooks.synthetic_noise())
    delay = _hooks.synthetic_delay()
    train_n = (settings.final_train_examples if request.final else None) or fidelity.max_train_examples
    n_val = (settings.final_eval_examples if request.final else None) or fidelity.max_eval_examples or 200
    rungs = (1.0,) if request.final else fidelity.rungs
    for i, fraction in enumerate(rungs, start=1):
        if delay:
            time.sleep(delay)
        examples = objective.observe_examples(request.experts, seed=request.train_seed, fidelity=fraction, n=n_val,
                                              train_examples=train_n)
        score = _hooks.nan_fault(request.number, math.fsum(examples) / len(examples))
        outcome.scores.append(score)
        outcome.example_scores.append(examples)
        outcome.metrics = {settings.metric: score}
        if report(i, score, i == len(rungs), examples):
            raise TrialPruned
    if request.final:
        outcome.test_score, outcome.metrics = _final_metrics(objective, settings, request, outcome, n_val)
        if request.out:
            write_json(Path(request.out) / "metrics.json", outcome.metrics)


def _final_metrics(objective: SyntheticObjective, settings: Any, request: Any, outcome: Any,
                   n_val: int) -> tuple[float, dict[str, Any]]:
    rng = random.Random(f"test|{settings.objective}|{list(request.experts)}|{request.train_seed}")
    test_mean = outcome.scores[-1] + rng.gauss(0.0, objective.noise)
    test = [test_mean + objective.example_sd * rng.gauss(0.0, 1.0) for _ in range(n_val)]
    shift = test_mean - math.fsum(test) / len(test)
    test = [v + shift for v in test]
    ids = [f"ex{j}" for j in range(n_val)]
    key = "correct" if settings.metric == "accuracy" else settings.metric
    metrics: dict[str, Any] = {
        split: {settings.metric: math.fsum(values) / len(values), "n": len(values),
                "per_example": {"ids": ids, key: values}}
        for split, values in (("validation", outcome.example_scores[-1]), ("test", test))}
    metrics.update({"allocation": list(request.experts), "objective": settings.objective,
                    "train_seed": request.train_seed})
    return test_mean, metrics
