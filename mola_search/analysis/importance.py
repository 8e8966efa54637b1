"""Which layers matter: Optuna's importance evaluators plus a direct per-layer estimate.

Two views of the same question, answered from the study's runs:

* `optuna_importances`: PED-ANOVA and fANOVA (`optuna.importance`) on the encoding
  parameters (w_block*, w_layer*, w_knot*, top_k, rank). They say how much of the
  score's variation a parameter explains, not in which direction.
* `layer_effects`: a least-squares regression of the score on the trained expert counts (one
  column per layer, or per block of layers), with simultaneous t intervals.
  The training seed is a blocking factor: runs are compared only with runs of the
  same seed (per-seed intercepts, fitted by centring within the seed), so seed luck
  and the finalists' different fidelity cancel. The budget is fixed, so the counts
  sum to the same total in every run: only *moves* of experts between layers are
  identifiable. The minimum-norm (pseudo-inverse) solution has coefficients that sum to 0,
  so a coefficient reads as "score change per expert added to this layer, paid for
  evenly by the other layers".

The intervals are simultaneous: with B blocks (or L layers) each t interval is taken at the
Bonferroni level 1 - 0.05 / B, so all B hold together with probability >= 95%, and every claim the
headline can make ("block b deserves more", "block b deserves fewer": B blocks in two directions) is
controlled as one family. Effects are reported for moving `EXPERTS_MOVED` (8) experts into a block, paid for
by the others, with two significant digits. The fit's F test of "no block matters" gates the family (closed
testing): when it does not reject, the regression explains nothing and no block is named whatever its
interval.

`headline` answers "which layers deserve more experts" from those intervals alone (a block deserves more
only when its simultaneous interval lies above 0) next to the noise floor; `verdicts` turns the estimates
into sentences that say what the data supports, and when it supports nothing (too few runs, all scores
equal, intervals crossing 0, a fit that explains nothing).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scipy import stats

from mola_search.stats.family import bonferroni_level

MIN_IMPORTANCE_TRIALS = 10
MIN_EFFECT_TRIALS = 5
EXPERTS_MOVED = 8     # effects are read as the score change for moving this many experts into a block

EVALUATORS: tuple[str, ...] = ("PED-ANOVA", "fANOVA")

_WEIGHT = re.compile(r"^w_(block|layer|knot)(\d+)$")


# ------------------------------------------------------------------------------------------------
# parameters -> depth


def param_depths(names: Sequence[str], num_layers: int) -> dict[str, tuple[float, float]]:
    """Depth span (first layer, last layer; fractional for knots) of each weight parameter.

    w_block<b> covers its block (same split as the search space), w_layer<j> layer j,
    w_knot<k> the depth of its knot. Non-weight parameters (top_k, rank) are left out.
    """
    from mola_search.allocation import block_sizes

    kinds: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        m = _WEIGHT.match(n)
        if m:
            kinds.setdefault(m.group(1), []).append((int(m.group(2)), n))
    out: dict[str, tuple[float, float]] = {}
    for kind, items in kinds.items():
        items.sort()
        count = len(items)
        if kind == "layer":
            out.update({n: (float(i), float(i)) for i, n in items})
        elif kind == "block":
            sizes = block_sizes(num_layers, count)
            starts = np.cumsum([0] + sizes)
            out.update({n: (float(starts[i]), float(starts[i + 1] - 1)) for i, n in items})
        else:  # knots at evenly spaced depths from the first to the last layer
            for i, n in items:
                pos = i * (num_layers - 1) / max(1, count - 1)
                out[n] = (pos, pos)
    return out


# ------------------------------------------------------------------------------------------------
# Optuna importance


@dataclass
class Importances:
    values: dict[str, dict[str, float]] = field(default_factory=dict)   # evaluator -> param -> importance
    trials: int = 0
    notes: list[str] = field(default_factory=list)

    def ranked(self, evaluator: str) -> list[tuple[str, float]]:
        return sorted(self.values.get(evaluator, {}).items(), key=lambda kv: -kv[1])


def optuna_importances(study: Any, *, min_trials: int = MIN_IMPORTANCE_TRIALS, seed: int = 0,
                       numbers: Collection[int] | None = None) -> Importances:
    """PED-ANOVA and fANOVA importances (normalised to sum 1) over the study's completed trials.

    `numbers`: only these trials (e.g. those trained with the search's seed, so that
    noise-floor replicates at other seeds do not pass seed luck off as importance).
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and (numbers is None or t.number in numbers)]
    if numbers is not None:  # the evaluators read a whole study: give them one holding just these trials
        subset = optuna.create_study(directions=study.directions)
        subset.add_trials(done)
        study = subset
    out = Importances(trials=len(done))
    if len(done) < min_trials:
        which = "complete trials at the study seed" if numbers is not None else "complete trials"
        out.notes.append(f"Optuna importance skipped: {len(done)} {which}, the evaluators need at least "
                         f"{min_trials} to say anything")
        return out
    if len({round(t.value, 12) for t in done}) < 2:
        out.notes.append(f"Optuna importance skipped: all {len(done)} completed trials have the same score")
        return out
    names = sorted(set.intersection(*(set(t.params) for t in done)))
    evaluators = {"PED-ANOVA": PedAnovaImportanceEvaluator(),
                  "fANOVA": FanovaImportanceEvaluator(seed=seed)}
    for label, evaluator in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prev = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.ERROR)
                try:
                    raw = get_param_importances(study, evaluator=evaluator, params=names)
                finally:
                    optuna.logging.set_verbosity(prev)
        except Exception as exc:  # noqa: BLE001 - one evaluator failing must not sink the report
            out.notes.append(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        values = {k: float(v) for k, v in raw.items()}
        if not values or not all(math.isfinite(v) for v in values.values()):
            out.notes.append(f"{label} gave no finite importances")
            continue
        out.values[label] = values
    if "PED-ANOVA" in out.values and len(done) < 20:
        out.notes.append(f"PED-ANOVA compares the top 10% of trials with the rest: with {len(done)} trials that is "
                         f"{max(1, len(done) // 10)} trial(s), so its ranking is unreliable")
    return out


# ------------------------------------------------------------------------------------------------
# per-layer effect of the expert count


@dataclass
class Effect:
    """Score change per expert added to a group of layers (paid for evenly by the others), with a simultaneous
    interval (`EffectEstimate.interval_level` each)."""

    label: str
    layers: tuple[int, int]      # first, last (inclusive)
    coef: float
    lo: float
    hi: float

    @property
    def supported(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def moved(self, experts: int = EXPERTS_MOVED) -> tuple[float, float, float]:
        """(estimate, low, high) for moving `experts` experts into the group."""
        return experts * self.coef, experts * self.lo, experts * self.hi

    @property
    def outside(self) -> bool:
        """The point estimate lies outside its own interval (never for a t interval; kept for old records)."""
        return self.coef < self.lo or self.coef > self.hi


@dataclass
class EffectEstimate:
    effects: list[Effect]
    n: int                        # observations used (trials + finalist runs)
    alpha: float                  # (kept for old callers: 0, the fit is unpenalised least squares)
    r2: float                     # in-sample fit (within training seed when blocked)
    level: float = 0.95           # the family's level: all intervals hold together with this probability
    notes: list[str] = field(default_factory=list)
    blocks: int = 1               # training seeds (blocks) the scores were compared within
    df: int = 0                   # residual degrees of freedom of the fit
    rank: int = 0                 # estimable contrasts (columns less those the fixed budget ties)

    @property
    def interval_level(self) -> float:
        """Each interval's own level (Bonferroni over the effects)."""
        return bonferroni_level(self.level, len(self.effects))

    @property
    def adjusted_r2(self) -> float:
        """Within-seed R^2 adjusted for the columns fitted: about 0 when the columns fit only noise."""
        if not self.r2 == self.r2 or self.df <= 0:
            return math.nan
        return 1.0 - (1.0 - self.r2) * (self.n - self.blocks) / self.df

    @property
    def f_p_value(self) -> float:
        """The F test of "no group matters" (all coefficients 0) on the within-seed fit."""
        if not self.r2 == self.r2 or self.df <= 0 or self.rank <= 0:
            return math.nan
        if self.r2 >= 1.0:
            return 0.0
        f = (self.r2 / self.rank) / ((1.0 - self.r2) / self.df)
        return float(stats.f.sf(f, self.rank, self.df))

    @property
    def explains_nothing(self) -> bool:
        """The fit's F test does not reject "no group matters" at the family's level: then no group is named
        (a gate before the simultaneous intervals, which keeps the family's error below its level)."""
        return not self.f_p_value < 1 - self.level

    def claims(self) -> list[Effect]:
        """The effects the data support as a family: interval excludes 0, and the fit explains something."""
        return [] if self.explains_nothing else [e for e in self.effects if e.supported]

    @property
    def usable(self) -> bool:
        return bool(self.effects)

    def outside(self) -> list[Effect]:
        return [e for e in self.effects if e.outside]


def _centre(x: np.ndarray, y: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each block's means: the same fit as unpenalised per-block intercepts (fixed effects)."""
    xc, yc = x.astype(float).copy(), y.astype(float).copy()
    for b in np.unique(block):
        m = block == b
        xc[m] -= xc[m].mean(0)
        yc[m] -= yc[m].mean()
    return xc, yc


def group_matrix(allocations: np.ndarray, groups: Sequence[tuple[int, int]]) -> np.ndarray:
    """Column g = experts summed over the layers of group g."""
    return np.stack([allocations[:, a:b + 1].sum(1) for a, b in groups], axis=1).astype(float)


def layer_effects(allocations: Sequence[Sequence[int]], scores: Sequence[float],
                  groups: Sequence[tuple[int, int]] | None = None, labels: Sequence[str] | None = None, *,
                  blocks: Sequence[Any] | None = None, level: float = 0.95,
                  min_trials: int = MIN_EFFECT_TRIALS) -> EffectEstimate:
    """Least squares of score on expert counts per layer (or per group of layers), with the training seed as a
    blocking factor, and simultaneous t intervals (all of them hold together at `level`: Bonferroni).

    `blocks` (e.g. each observation's training seed): scores are compared only within a block (per-block
    intercepts, fitted by centring within the block), so a seed that is luckier for every allocation, or a
    finalist fidelity that scores higher throughout, shifts nothing. A block with one observation carries no
    information and is dropped. The budget is fixed, so the counts sum to the same total in every run: only
    moves of experts between groups are estimable, and the minimum-norm solution (pseudo-inverse) gives the
    coefficients that sum to 0, each "the change per expert added to this group, paid for evenly by the
    others". Its covariance is s^2 (X'X)^+ with s^2 the residual variance on n - seeds - rank(X) degrees of
    freedom; each interval is estimate +- t_{1 - (1-level)/(2G)} x SE over G groups.
    """
    x, y, block, groups, labels = _effect_data(allocations, scores, groups, labels, blocks)
    n = len(y)
    nb = int(block.max()) + 1 if n else 0
    est = EffectEstimate([], n, 0.0, math.nan, level, blocks=max(1, nb))
    g = group_matrix(x, groups) if n else np.zeros((0, len(groups)))
    why = _nothing_to_fit(n, nb, y, g, block, min_trials)
    if why:
        est.notes.append(why)
        return est
    gc, yc = _centre(g, y, block)
    rank = int(np.linalg.matrix_rank(gc))
    df = n - nb - rank
    if df < 2:
        est.notes.append(f"too few runs for a per-layer estimate: {n} runs in {nb} training seeds leave {df} degrees "
                         f"of freedom for {rank} estimable contrasts, need at least 2")
        return est
    pinv = np.linalg.pinv(gc)
    coef = pinv @ yc
    resid = yc - gc @ coef
    s2 = float(resid @ resid) / df
    se = np.sqrt(np.clip(np.diag(pinv @ pinv.T) * s2, 0.0, None))
    half = stats.t.ppf(1 - (1 - level) / (2 * len(groups)), df) * se
    est.r2 = 1.0 - float(resid @ resid) / float(yc @ yc)
    est.df, est.rank = df, rank
    est.effects = [Effect(str(lab), (int(a), int(bb)), float(c), float(c - h), float(c + h))
                   for lab, (a, bb), c, h in zip(labels, groups, coef, half)]
    est.notes += _effect_notes(est, g, labels, nb)
    return est


def _effect_data(allocations, scores, groups, labels, blocks):
    """Arrays for the fit: blocks with a single observation (which carry no information) dropped."""
    x = np.asarray(allocations, dtype=float)
    y = np.asarray(scores, dtype=float)
    block = np.zeros(len(y), dtype=int) if blocks is None else np.unique(np.asarray(blocks), return_inverse=True)[1]
    num_layers = x.shape[1] if x.ndim == 2 else 0
    groups = [(j, j) for j in range(num_layers)] if groups is None else list(groups)
    if labels is None:
        labels = [f"layer {a}" if a == b else f"layers {a}-{b}" for a, b in groups]
    if len(y):
        keep = np.bincount(block)[block] > 1
        x, y, block = x[keep], y[keep], np.unique(block[keep], return_inverse=True)[1]
    return x, y, block, groups, list(labels)


def _nothing_to_fit(n: int, nb: int, y: np.ndarray, g: np.ndarray, block: np.ndarray, min_trials: int) -> str:
    """Why the data cannot be fitted ("" when they can)."""
    if n - nb + 1 < min_trials:
        what = "completed trials" if nb <= 1 else f"observations beyond one per training seed ({nb} seeds)"
        return f"too few {what} for a per-layer estimate: {n - nb + 1}, need at least {min_trials}"
    if np.ptp(y) == 0:
        return f"all {n} completed trials scored {y[0]:.4g}: the data say nothing about where experts matter"
    gc, yc = _centre(g, y, block)
    if np.abs(gc).max() == 0:
        return "every completed trial trained the same allocation: nothing to compare"
    if not np.any(yc):
        return "within each training seed every run scored the same: nothing to compare"
    return ""


def _effect_notes(est: EffectEstimate, g: np.ndarray, labels: list[str], nb: int) -> list[str]:
    notes = []
    if est.explains_nothing:
        notes.append(f"the regression explains nothing: within-seed R² {est.r2:.2f}, and its F test does not reject "
                     f"'no group matters' (p {est.f_p_value:.2g}), so no group is named")
    tied = tied_columns(g)
    if tied:
        notes.append("these columns had equal counts in every trial, so their coefficients are one shared "
                     "estimate split evenly and cannot be told apart: "
                     + ", ".join("+".join(labels[i].replace("layer ", "") for i in t) for t in tied))
    if est.df < 2 * len(labels):
        notes.append(f"{est.n} observations for {len(labels)} coefficients ({est.df} residual degrees of freedom): "
                     "the intervals are wide")
    return notes


def tied_columns(x: np.ndarray) -> list[list[int]]:
    """Sets (size > 1) of columns that are equal in every row (e.g. layers of one block in the blocks encoding)."""
    seen: dict[bytes, list[int]] = {}
    for i in range(x.shape[1]):
        seen.setdefault(np.ascontiguousarray(x[:, i]).tobytes(), []).append(i)
    return [v for v in seen.values() if len(v) > 1]


def block_groups(num_layers: int, blocks: int = 4) -> tuple[list[tuple[int, int]], list[str]]:
    """The paper's granularity: `blocks` contiguous blocks (same split as the shapes)."""
    from mola_search.allocation import block_sizes

    blocks = max(1, min(blocks, num_layers))
    sizes = block_sizes(num_layers, blocks)
    groups, start = [], 0
    for size in sizes:
        groups.append((start, start + size - 1))
        start += size
    names = _block_names(blocks)
    labels = [f"{names[i]} (layers {a}-{b})" if a != b else f"{names[i]} (layer {a})"
              for i, (a, b) in enumerate(groups)]
    return groups, labels


def _block_names(blocks: int) -> list[str]:
    if blocks == 4:
        return ["bottom quarter", "lower-middle quarter", "upper-middle quarter", "top quarter"]
    if blocks == 3:
        return ["lower third", "middle third", "upper third"]
    return [f"block {i + 1}/{blocks}" for i in range(blocks)]


# ------------------------------------------------------------------------------------------------
# words


def _fmt(v: float) -> str:
    return f"{v:+.2g}"


def _moved(e: Effect) -> str:
    """"+0.0023 (0.0011 to 0.0035)": the change for moving EXPERTS_MOVED experts into the group, two significant
    digits."""
    est, lo, hi = e.moved()
    return f"{_fmt(est)} ({_fmt(lo)} to {_fmt(hi)})"


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _names(effects: Sequence[Effect]) -> str:
    names = [f"the {e.label}" for e in effects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _family(est: EffectEstimate) -> str:
    return (f"{int(round(est.level * 100))}% simultaneous intervals (Bonferroni over {len(est.effects)} "
            f"{'blocks' if len(est.effects) != 1 else 'block'}, each at {100 * est.interval_level:.3g}%)")


def headline(blocks: EffectEstimate, noise_line: str = "", unit: str = "score") -> str:
    """The answer to "which layers deserve more experts", generated from the simultaneous intervals alone.

    A block deserves more experts only when its interval lies above 0, fewer only when it lies below, and
    only when the fit explains something (its F test rejects "no block matters"); otherwise no block differs at this
    fidelity. Effects are the change of `unit` for moving EXPERTS_MOVED experts into the block. The
    noise-floor line is quoted either way, so the ranking is never read without it.
    """
    noise = _sentence(noise_line)
    if not blocks.usable:
        why = blocks.notes[0] if blocks.notes else "no estimate"
        return " ".join(filter(None, [f"No block can be said to deserve more experts: {why}.", noise]))
    where = (f"{blocks.n} runs compared within {blocks.blocks} training seeds" if blocks.blocks > 1
             else f"{blocks.n} runs")
    if blocks.explains_nothing:
        return " ".join(filter(None, [
            f"No block differs at this fidelity: the regression explains nothing (within-seed R² {blocks.r2:.2f}, "
            f"F test p {blocks.f_p_value:.2g}, {where}), so the data do not say which layers deserve more "
            "experts.", noise]))
    claims = blocks.claims()
    more = sorted((e for e in claims if e.lo > 0), key=lambda e: -e.lo)
    fewer = sorted((e for e in claims if e.hi < 0), key=lambda e: e.hi)
    if not more and not fewer:
        return " ".join(filter(None, [
            f"No block differs at this fidelity: every block's interval includes 0 ({_family(blocks)}, {where}), so "
            "the data do not say which layers deserve more experts.", noise]))
    parts = []
    for group, word in ((more, "more"), (fewer, "fewer")):
        if group:
            verb = "deserves" if len(group) == 1 else "deserve"
            parts.append(_sentence(f"{_names(group)} {verb} {word} experts: " + "; ".join(
                f"{_moved(e)} {unit} for {EXPERTS_MOVED} experts moved into the {e.label}" for e in group)))
    if not more:
        parts.insert(0, "No block is shown to deserve more experts (no interval lies above 0).")
    parts.append(_sentence(f"From {where}; {_family(blocks)}"))
    return " ".join(filter(None, [*parts, noise]))


def verdicts(blocks: EffectEstimate, layers: EffectEstimate | None = None,
             importances: Importances | None = None, unit: str = "score") -> list[str]:
    """Sentences stating what the estimates support, and where they support nothing."""
    if not blocks.usable:
        return [f"No per-layer conclusion: {n}." for n in blocks.notes]
    claims = blocks.claims()
    out = [f"Supported: {e.label}: {_moved(e)} {unit} for {EXPERTS_MOVED} experts moved here"
           + ("" if e.coef > 0 else " (worth less than an average block)") + "."
           for e in sorted(claims, key=lambda e: -e.coef)]
    unclear = [e for e in blocks.effects if e not in claims]
    if unclear:
        out.append("Not supported: " + "; ".join(f"{e.label} {_moved(e)}" for e in unclear) + ".")
    if not claims:
        out.insert(0, f"The {blocks.n} runs support no conclusion about which block needs more experts"
                      + (" (the fit explains nothing)." if blocks.explains_nothing else
                         ": every block's interval crosses 0."))
    out.extend(f"Caveat: {n}." for n in blocks.notes)
    out += _layer_verdicts(layers) + _importance_verdicts(importances)
    out.append(f"Effects are the change of {unit} for moving {EXPERTS_MOVED} experts into a block, taken evenly from "
               f"the others (the budget is fixed); intervals are {_family(blocks)}.")
    return out


def _layer_verdicts(layers: EffectEstimate | None) -> list[str]:
    if layers is None:
        return []
    if not layers.usable:
        return [f"Per layer: {n}." for n in layers.notes]
    strong = sorted((e for e in layers.claims() if e.coef > 0), key=lambda e: -e.coef)
    if strong:
        out = ["Per layer (simultaneous over the layers), intervals above 0: " + ", ".join(
            f"{e.label.replace('layer ', '')} ({_fmt(e.moved()[0])})" for e in strong) + "."]
    else:
        out = [f"Per layer ({len(layers.effects)} coefficients from {layers.n} runs), no simultaneous interval lies "
               "above 0: the per-layer data are too thin for layer-level claims."]
    return out + [f"Per-layer caveat: {n}." for n in layers.notes]


def _importance_verdicts(importances: Importances | None) -> list[str]:
    if importances is None:
        return []
    out = []
    for ev in EVALUATORS:
        ranked = importances.ranked(ev)
        if ranked:
            out.append(f"{ev} (share of score variation, no direction): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:3]) + ".")
    return out + [f"Note: {n}." for n in importances.notes]
