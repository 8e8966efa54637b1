"""The one-shot strategy's record: how far a supernet's ranking of allocations can be trusted.

`--strategy one-shot` (search.supernet trains and scores; the runner orchestrates) scores hundreds of
allocations as masked sub-networks of one trained supernet, then trains a few of them standalone. This
module owns what follows from those two sets of numbers, and the file that keeps it (oneshot.json):

* `check_seeds`: which one-shot-scored allocations to train standalone (the top ones, which become
  finalists, and ones spread over the one-shot ranking, so the comparison covers its whole range);
* `kendall_tau`: Kendall's tau-b between one-shot and standalone scores with a percentile bootstrap
  CI over allocations;
* `Trust`: the measured taus and the verdict: the one-shot ranking is trustworthy here only when the
  interval at trial fidelity excludes 0 (then one-shot is recommended, else standalone).

No torch here: reading a study folder needs none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mola_search.allocation import AllocationSpec, run_length
from mola_search.search.seeds import Seed

ONESHOT_JSON = "oneshot.json"
ONESHOT_CSV = "oneshot.csv"
SUPERNET_DIR = "supernet"
STRATEGIES: tuple[str, ...] = ("standalone", "one-shot")
TOP_PREFIX, SPREAD_PREFIX = "oneshot:top", "oneshot:rank"   # origins of the standalone checks
MIN_PAIRS = 4  # fewer allocations than this cannot give a tau interval worth stating


def check_seeds(ranked: Sequence[tuple[AllocationSpec, float]], top_n: int, spread: int,
                skip: Sequence[AllocationSpec] = ()) -> list[Seed]:
    """The allocations to train standalone, from the distinct one-shot-scored ones best first:
    the best `top_n` (origin oneshot:top1.., the one-shot finalists) and `spread` more at evenly spaced
    ranks of the rest (oneshot:rank<r>, r = the one-shot rank, 1 = best): searched allocations, not seeds. Allocations in `skip`
    (already trained standalone, e.g. by the pilot) are not picked for the spread."""
    def key(spec: AllocationSpec) -> tuple:
        return spec.experts, spec.top_k, spec.rank

    seen, distinct = set(), []
    for spec, score in ranked:
        if key(spec) not in seen and score == score:
            seen.add(key(spec))
            distinct.append(spec)
    def seed(prefix: str, rank: int, spec: AllocationSpec) -> Seed:
        return Seed(f"{prefix}{rank}".replace(":", "-"), spec, origin=f"{prefix}{rank}")

    out = [seed(TOP_PREFIX, i + 1, distinct[i]) for i in range(min(top_n, len(distinct)))]
    skipped = {key(s) for s in skip} | {key(s.spec) for s in out}
    rest = [(r, spec) for r, spec in enumerate(distinct) if key(spec) not in skipped]
    if spread > 0 and rest:
        picks = sorted({round(i * (len(rest) - 1) / max(1, spread - 1)) for i in range(spread)})
        out += [seed(SPREAD_PREFIX, rest[p][0] + 1, rest[p][1]) for p in picks]
    return out


def kendall_tau(x: Sequence[float], y: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                seed: int = 0) -> dict[str, float]:
    """Kendall's tau-b of paired scores, with a percentile bootstrap interval over the pairs.

    Returns {"tau", "low", "high", "n"}; tau is NaN below 2 pairs or when either side is constant, and
    the interval is NaN below `MIN_PAIRS` pairs. Resamples whose tau is undefined (all tied) are skipped.
    """
    import numpy as np
    from scipy.stats import kendalltau

    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a == a and b == b]
    n = len(pairs)
    out = {"tau": math.nan, "low": math.nan, "high": math.nan, "n": n, "level": level}
    if n < 2:
        return out
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    out["tau"] = float(kendalltau(xs, ys).statistic)
    if n < MIN_PAIRS:
        return out
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if len(set(xs[idx])) < 2 or len(set(ys[idx])) < 2:
            continue
        t = kendalltau(xs[idx], ys[idx]).statistic
        if t == t:
            taus.append(t)
    if taus:
        alpha = (1 - level) / 2
        out["low"], out["high"] = float(np.quantile(taus, alpha)), float(np.quantile(taus, 1 - alpha))
    return out


def rank_agreement(weights: Sequence[float], experts: Sequence[int]) -> float:
    """Spearman's rho between a signal's per-layer weights and an allocation's expert counts
    (NaN when either is constant)."""
    from scipy.stats import spearmanr

    if len(set(weights)) < 2 or len(set(experts)) < 2:
        return float("nan")
    return float(spearmanr(list(weights), list(experts)).statistic)


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
        return _json_safe(d)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Trust":
        names = {"supernet", "scoring", "trial_fidelity", "finalists", "pairs", "signals", "metric"}
        values = {k: v for k, v in raw.items() if k in names}
        for key in ("trial_fidelity", "finalists"):
            if values.get(key):
                values[key] = {k: (math.nan if v is None else v) for k, v in values[key].items()}
        return cls(**values)


def write_trust(folder: str | Path, trust: Trust) -> Path:
    path = Path(folder) / ONESHOT_JSON
    path.write_text(json.dumps(trust.to_dict(), indent=2) + "\n")
    return path


def read_trust(folder: str | Path) -> Trust | None:
    path = Path(folder) / ONESHOT_JSON
    if not path.is_file():
        return None
    try:
        return Trust.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None


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


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
