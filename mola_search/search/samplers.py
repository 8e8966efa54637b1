"""Optuna's samplers by name (`SAMPLERS`), set up for a study's parallel trials.

A sampler is registered with `register_sampler(name)` on a factory ``(seed) -> BaseSampler``; Optuna is
imported only when one is made, so the study config can list the names without importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mola_search.errors import UserError

SAMPLERS: dict[str, Callable[[int], Any]] = {}


def register_sampler(name: str) -> Callable[[Callable[[int], Any]], Callable[[int], Any]]:
    def register(factory: Callable[[int], Any]) -> Callable[[int], Any]:
        SAMPLERS[name] = factory
        return factory
    return register


def make_sampler(name: str, seed: int) -> Any:
    """The sampler registered as `name`, seeded with `seed`."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](seed)


@register_sampler("tpe")
def _tpe(seed: int) -> Any:
    """Multivariate TPE with the constant liar, so parallel trials do not all propose the same point."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=5)


@register_sampler("cmaes")
def _cmaes(seed: int) -> Any:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@register_sampler("gp")
def _gp(seed: int) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


@register_sampler("random")
def _random(seed: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)
