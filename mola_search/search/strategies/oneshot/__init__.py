"""The one-shot strategy: supernet (train), scoring (mask and score), signals (cheap per-layer signals),
trust (how far the one-shot ranking agrees with standalone training), strategy (the orchestration)."""

from mola_search.search.strategies.oneshot.strategy import OneShot
from mola_search.search.strategies.oneshot.trust import Trust, check_seeds

__all__ = ["OneShot", "Trust", "check_seeds"]
