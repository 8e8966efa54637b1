"""The one-shot strategy's record: how far a supernet's ranking of allocations can be trusted.

`--strategy one-shot` (oneshot.supernet trains, oneshot.scoring scores, oneshot.strategy orchestrates) scores
hundreds of allocations as masked sub-networks of one trained supernet, then trains a few of them standalone.
This module owns what follows from those two sets of numbers, and the format of the file that keeps it
(oneshot.json, written by `StudyFolder.write_oneshot`):

* `check_seeds`: which one-shot-scored allocations to train standalone (the top ones, which become
  finalists, and ones spread over the one-shot ranking, so the comparison covers its whole range);
* the agreement of the two rankings: `stats.rank.kendall_tau` (Kendall's tau-b with a bootstrap interval);
* `Trust`: the measured taus and the verdict: the one-shot ranking is trustworthy here only when the
  interval at trial fidelity excludes 0 (then one-shot is recommended, else standalone).

No torch here: reading a study folder needs none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mola_search._io import json_safe
from mola_search.allocation import AllocationSpec, run_length
from mola_search.search.seeds import Seed
from mola_search.search.study import Origin
from mola_search.search.study.records import spec_key
from mola_search.stats.rank import MIN_PAIRS


def check_seeds(ranked: Sequence[tuple[AllocationSpec, float]], top_n: int, spread: int,
                skip: Sequence[AllocationSpec] = ()) -> list[Seed]:
    """The allocations to train standalone, from the distinct one-shot-scored ones best first:
    the best `top_n` (origin oneshot:top1.., the one-shot finalists) and `spread` more at evenly spaced
    ranks of the rest (oneshot:rank<r>, r = the one-shot rank, 1 = best): searched allocations, not seeds. Allocations in `skip`
    (already trained standalone, e.g. by the pilot) are not picked for the spread."""
    seen, distinct = set(), []
    for spec, score in ranked:
        if spec_key(spec) not in seen and score == score:
            seen.add(spec_key(spec))
            distinct.append(spec)

    def seed(kind: str, rank: int, spec: AllocationSpec) -> Seed:
        origin = Origin.oneshot(kind, rank)
        return Seed(origin.text.replace(":", "-"), spec, origin=origin.text)

    out = [seed("top", i + 1, distinct[i]) for i in range(min(top_n, len(distinct)))]
    skipped = {spec_key(s) for s in skip} | {spec_key(s.spec) for s in out}
    rest = [(r, spec) for r, spec in enumerate(distinct) if spec_key(spec) not in skipped]
    if spread > 0 and rest:
        picks = sorted({round(i * (len(rest) - 1) / max(1, spread - 1)) for i in range(spread)})
        out += [seed("rank", rest[p][0] + 1, rest[p][1]) for p in picks]
    return out


@dataclass
class Trust:
    """oneshot.json: the supernet, the scoring, the taus, the cheap signals and the verdict."""

    supernet: dict[str, Any] = field(default_factory=dict)     # steps, factor, wall time, sampled sub-networks
    scoring: dict[str, Any] = field(default_factory=dict)      # allocations scored, examples, seconds each
    trial_fidelity: dict[str, Any] = field(default_factory=dict)   # tau vs standalone trials (study seed)
    finalists: dict[str, Any] = field(default_factory=dict)    # tau vs finalists' mean validation
    pairs: list[dict[str, Any]] = field(default_factory=list)  # allocation, one-shot, standalone
    signals: dict[str, Any] = field(default_factory=dict)      # per signal: weights, allocation, agreement
    metric: str = "gold_logprob"

    @property
    def trustworthy(self) -> bool | None:
        """True when the trial-fidelity tau interval lies above 0, False when it includes 0 (or there are
        too few allocations for one), None before the standalone scores exist."""
        t = self.trial_fidelity
        if not t:
            return None
        return bool(t.get("low") == t.get("low") and t["low"] > 0)

    @property
    def recommendation(self) -> str:
        return "one-shot" if self.trustworthy else "standalone"

    def line(self) -> str:
        t = self.trial_fidelity
        if not t:
            return "one-shot trust: not measured yet (no allocation trained standalone)"
        ci = (f"95% CI {t['low']:+.2f} to {t['high']:+.2f}" if t.get("low") == t.get("low")
              else f"no interval: {t['n']} allocations, need {MIN_PAIRS}")
        head = (f"one-shot trust: Kendall tau {t['tau']:+.2f} ({ci}) between one-shot and standalone "
                f"validation {self.metric} over {t['n']} allocations")
        if self.trustworthy:
            return head + "; the one-shot ranking agrees with standalone training here: one-shot is usable"
        return (head + "; the interval includes 0, so the one-shot ranking is not trustworthy here: "
                "use --strategy standalone")

    def bullets(self) -> list[str]:
        """The supernet, the scoring and the finalists' tau, one sentence each."""
        out, s, c = [], self.supernet, self.scoring
        if s:
            out.append(f"supernet: {s.get('max_experts')} experts per module, {s.get('steps')} optimizer steps "
                       f"({s.get('factor')}x a trial's {s.get('trial_steps')}), "
                       f"{(s.get('wall_time_s') or 0) / 60:.1f} min")
        if c:
            each = c.get("seconds_per_allocation")
            out.append(f"scored {c.get('scored')} distinct allocations by masking, {c.get('examples')} validation "
                       f"examples each" + (f", {each:.1f} s per allocation" if each else ""))
        f = self.finalists
        if f and f.get("n"):
            ci = f"95% CI {f['low']:+.2f} to {f['high']:+.2f}" if f.get("low") == f.get("low") else "no interval"
            out.append(f"against the finalists' mean validation {self.metric} (finalist fidelity): "
                       f"tau {_num(f.get('tau'))} ({ci}, {f['n']} allocations)")
        return out

    def pair_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["allocation", "origin", f"one-shot {self.metric}", f"standalone {self.metric} (trial)"]
        return header, [[f"`{run_length(p['experts'])}`", p["origin"], f"{p['oneshot']:.4f}", f"{p['standalone']:.4f}"]
                        for p in sorted(self.pairs, key=lambda p: -p["oneshot"])]

    def signal_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["cheap signal", "allocation", "Spearman rho with the one-shot best", "with the chosen best"]
        return header, [[name, f"`{run_length(sig['experts'])}`", _num(sig.get("rho_oneshot_best")),
                         _num(sig.get("rho_best"))] for name, sig in self.signals.items()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(trustworthy=self.trustworthy, recommendation=self.recommendation, line=self.line())
        return json_safe(d)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Trust":
        names = {"supernet", "scoring", "trial_fidelity", "finalists", "pairs", "signals", "metric"}
        values = {k: v for k, v in raw.items() if k in names}
        for key in ("trial_fidelity", "finalists"):
            if values.get(key):
                values[key] = {k: (math.nan if v is None else v) for k, v in values[key].items()}
        return cls(**values)


def summary_lines(trust: Trust) -> list[str]:
    """The one-shot section of summary.md (the report builds its own from the same parts)."""
    lines = ["## One-shot search", "", trust.line() + "."]
    bullets = trust.bullets()
    if bullets:
        lines += ["", *(f"- {b}" for b in bullets)]
    for header, rows in (trust.pair_rows(), trust.signal_rows()):
        if rows:
            lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _num(value: Any) -> str:
    return f"{value:+.2f}" if isinstance(value, (int, float)) and value == value else "n/a"
