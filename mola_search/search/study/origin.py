"""Where an allocation in a study came from (`Origin`): the one place that reads and writes the format.

An origin is a short string stored with every trial and finalist:

* ``seed:<name>``: a seeded allocation (a paper shape, ``alphalora``, a one-shot signal such as
  ``router_usage``), `Origin.seed("triangle")`;
* ``oneshot:top<r>`` / ``oneshot:rank<r>``: an allocation a one-shot supernet ranked r-th and a study then
  trained standalone;
* otherwise the name of the sampler that proposed it (``tpe``, ``random``, ``cmaes``, ``gp``).

In a folder name the colon becomes an underscore (`Origin.label` / `Origin.from_label`).
"""

from __future__ import annotations

from dataclasses import dataclass

SEED, ONESHOT = "seed", "oneshot"
_PREFIXED = (SEED, ONESHOT)  # the origins with a colon


@dataclass(frozen=True)
class Origin:
    text: str

    @classmethod
    def seed(cls, name: str) -> "Origin":
        return cls(f"{SEED}:{name}")

    @classmethod
    def oneshot(cls, kind: str, rank: int) -> "Origin":
        """``oneshot:top<rank>`` (kind "top") or ``oneshot:rank<rank>`` (kind "rank")."""
        return cls(f"{ONESHOT}:{kind}{rank}")

    @classmethod
    def from_label(cls, label: str) -> "Origin":
        """The origin a folder-safe `label` was made from (``seed_triangle`` -> ``seed:triangle``)."""
        for prefix in _PREFIXED:
            if label.startswith(prefix + "_"):
                return cls(f"{prefix}:{label[len(prefix) + 1:]}")
        return cls(label)

    @property
    def is_seed(self) -> bool:
        return self.text.startswith(SEED + ":")

    @property
    def is_oneshot_top(self) -> bool:
        return self.text.startswith(f"{ONESHOT}:top")

    @property
    def name(self) -> str:
        """The seed's name for a seed (``triangle``), else the whole origin."""
        return self.text[len(SEED) + 1:] if self.is_seed else self.text

    @property
    def label(self) -> str:
        """Folder-safe form: ``seed_triangle``."""
        return self.text.replace(":", "_")

    def __str__(self) -> str:
        return self.text


class HasOrigin:
    """For a record with an `origin` string (a trial, a finalist, a result row): whether it is a seeded shape,
    and which. The one place that reads the origin of a record."""

    origin: str

    @property
    def is_seed(self) -> bool:
        return Origin(self.origin).is_seed

    @property
    def seed_name(self) -> str:
        return Origin(self.origin).name if self.is_seed else ""
