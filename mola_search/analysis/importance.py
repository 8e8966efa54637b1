"""Which layers matter: Optuna's importance evaluators plus a direct per-layer estimate.

Two views of the same question, answered from the study's runs:

* `optuna_importances`: PED-ANOVA and fANOVA (`optuna.importance`) on the encoding
  parameters (w_block*, w_layer*, w_knot*, top_k, rank). They say how much of the
  score's variation a parameter explains, not in which direction.
* `layer_effects`: a ridge regression of the score on the trained expert counts (one
  column per layer, or per block of layers), with bootstrap confidence intervals.
  The training seed is a blocking factor: runs are compared only with runs of the
  same seed (per-seed intercepts, fitted by centring within the seed), so seed luck
  and the finalists' different fidelity cancel. The budget is fixed, so the counts
  sum to the same total in every run: only *moves* of experts between layers are
  identifiable. The minimum-norm (ridge) solution has coefficients that sum to ~0,
  so a coefficient reads as "score change per expert added to this layer, paid for
  evenly by the other layers".

`headline` answers "which layers deserve more experts" from the intervals alone (a
block deserves more only when its interval lies above 0) next to the noise floor;
`verdicts` turns the estimates into sentences that say what the data supports, and
when it supports nothing (too few runs, all scores equal, CIs crossing 0).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_IMPORTANCE_TRIALS = 10
MIN_EFFECT_TRIALS = 5
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
    """Score change per expert added to a group of layers, with a bootstrap CI."""

    label: str
    layers: tuple[int, int]      # first, last (inclusive)
    coef: float
    lo: float
    hi: float

    @property
    def supported(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def outside(self) -> bool:
        """The point estimate lies outside its own percentile interval (a skewed, biased bootstrap)."""
        return self.coef < self.lo or self.coef > self.hi


@dataclass
class EffectEstimate:
    effects: list[Effect]
    n: int                        # observations used (trials + finalist runs)
    alpha: float                  # ridge penalty (GCV choice)
    r2: float                     # in-sample fit (within training seed when blocked)
    level: float = 0.95
    notes: list[str] = field(default_factory=list)
    blocks: int = 1               # training seeds (blocks) the scores were compared within

    @property
    def usable(self) -> bool:
        return bool(self.effects)

    def outside(self) -> list[Effect]:
        return [e for e in self.effects if e.outside]


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge coefficients of already-centred x, y."""
    p = x.shape[1]
    return np.linalg.solve(x.T @ x + alpha * np.eye(p), x.T @ y)


def _centre(x: np.ndarray, y: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each block's means: the same fit as unpenalised per-block intercepts (fixed effects)."""
    xc, yc = x.astype(float).copy(), y.astype(float).copy()
    for b in np.unique(block):
        m = block == b
        xc[m] -= xc[m].mean(0)
        yc[m] -= yc[m].mean()
    return xc, yc


def _gcv_alpha(xc: np.ndarray, yc: np.ndarray, lost: int = 1) -> float:
    """Ridge penalty minimising generalised cross-validation on centred data, on a grid scaled to the data.

    `lost`: degrees of freedom the centring used up (1, or one per block).
    """
    n = len(yc)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    uy = u.T @ yc
    scale = float((s ** 2).sum()) / max(1, xc.shape[1]) or 1.0
    best, best_score = scale, math.inf
    for a in scale * np.logspace(-4, 2, 31):
        shrink = s ** 2 / (s ** 2 + a)
        fitted = u @ (shrink * uy)
        rss = float(((yc - fitted) ** 2).sum())
        dof = float(shrink.sum())
        if n - lost - dof <= 0.5:
            continue
        score = n * rss / (n - lost - dof) ** 2
        if score < best_score:
            best, best_score = float(a), score
    return best


def group_matrix(allocations: np.ndarray, groups: Sequence[tuple[int, int]]) -> np.ndarray:
    """Column g = experts summed over the layers of group g."""
    return np.stack([allocations[:, a:b + 1].sum(1) for a, b in groups], axis=1).astype(float)


def layer_effects(allocations: Sequence[Sequence[int]], scores: Sequence[float],
                  groups: Sequence[tuple[int, int]] | None = None, labels: Sequence[str] | None = None, *,
                  blocks: Sequence[Any] | None = None, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                  min_trials: int = MIN_EFFECT_TRIALS) -> EffectEstimate:
    """Ridge regression of score on expert counts per layer (or per group of layers) + bootstrap CIs.

    `blocks` (e.g. each observation's training seed) is a blocking factor: scores are
    compared only within a block (per-block intercepts, unpenalised, fitted by
    centring within the block), so a seed that is luckier for every allocation, or
    a finalist fidelity that scores higher throughout, shifts nothing. A block with
    one observation carries no information and is dropped. The penalty is chosen
    once by GCV, then every bootstrap resample (observations resampled within their
    block) is refitted with it; the CI is the percentile interval.
    """
    x = np.asarray(allocations, dtype=float)
    y = np.asarray(scores, dtype=float)
    block = np.zeros(len(y), dtype=int) if blocks is None else np.unique(np.asarray(blocks), return_inverse=True)[1]
    num_layers = x.shape[1] if x.ndim == 2 else 0
    if groups is None:
        groups = [(j, j) for j in range(num_layers)]
    if labels is None:
        labels = [f"layer {a}" if a == b else f"layers {a}-{b}" for a, b in groups]
    if len(y):
        sizes = np.bincount(block)
        keep = sizes[block] > 1
        x, y, block = x[keep], y[keep], np.unique(block[keep], return_inverse=True)[1]
    n = len(y)
    nb = int(block.max()) + 1 if n else 0
    est = EffectEstimate([], n, math.nan, math.nan, level, blocks=max(1, nb))
    if n - nb + 1 < min_trials:
        what = "completed trials" if nb <= 1 else f"observations beyond one per training seed ({nb} seeds)"
        est.notes.append(f"too few {what} for a per-layer estimate: {n - nb + 1}, need at least {min_trials}")
        return est
    if np.ptp(y) == 0:
        est.notes.append(f"all {n} completed trials scored {y[0]:.4g}: the data say nothing about where experts matter")
        return est
    g = group_matrix(x, groups)
    gc, yc = _centre(g, y, block)
    if np.abs(gc).max() == 0:
        est.notes.append("every completed trial trained the same allocation: nothing to compare")
        return est
    if not np.any(yc):
        est.notes.append("within each training seed every run scored the same: nothing to compare")
        return est
    alpha = _gcv_alpha(gc, yc, nb)
    coef = _ridge(gc, yc, alpha)
    r2 = 1.0 - float(((yc - gc @ coef) ** 2).sum()) / float((yc ** 2).sum())
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(block == b) for b in range(nb)]
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([m[rng.integers(0, len(m), len(m))] for m in members])
        gb, yb = _centre(g[idx], y[idx], block[idx])
        boots.append(_ridge(gb, yb, alpha) if np.any(yb) else np.zeros(len(groups)))
    b = np.asarray(boots)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(b, tail, axis=0), np.percentile(b, 100 - tail, axis=0)
    est.effects = [Effect(str(lab), (int(a), int(bb)), float(c), float(l), float(h))
                   for lab, (a, bb), c, l, h in zip(labels, groups, coef, lo, hi)]
    est.alpha, est.r2 = alpha, r2
    tied = tied_columns(g)
    if tied:
        est.notes.append("these columns had equal counts in every trial, so their coefficients are one shared "
                         "estimate split evenly and cannot be told apart: "
                         + ", ".join("+".join(labels[i].replace("layer ", "") for i in t) for t in tied))
    if n - nb + 1 < 2 * len(groups):
        est.notes.append(f"{n} observations for {len(groups)} coefficients: the estimates lean on the ridge penalty "
                         "and their intervals are wide")
    outside = est.outside()
    if outside:
        est.notes.append(f"the point estimate of {', '.join(e.label for e in outside)} lies outside its own "
                         f"{int(round(level * 100))}% bootstrap interval (the ridge estimate is shrunk and the "
                         "resamples are skewed): read the interval, not the point")
    return est


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
    return f"{v:+.3g}"


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _names(effects: Sequence[Effect]) -> str:
    names = [f"the {e.label}" for e in effects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def headline(blocks: EffectEstimate, noise_line: str = "", unit: str = "score") -> str:
    """The answer to "which layers deserve more experts", generated from the intervals alone.

    A block deserves more experts only when its interval lies above 0, fewer only when
    it lies below; otherwise no block differs at this fidelity. The noise-floor
    line is quoted either way, so the ranking is never read without it.
    """
    noise = _sentence(noise_line)
    if not blocks.usable:
        why = blocks.notes[0] if blocks.notes else "no estimate"
        return " ".join(filter(None, [f"No block can be said to deserve more experts: {why}.", noise]))
    pct = int(round(blocks.level * 100))
    more = sorted((e for e in blocks.effects if e.lo > 0), key=lambda e: -e.lo)
    fewer = sorted((e for e in blocks.effects if e.hi < 0), key=lambda e: e.hi)
    where = (f"{blocks.n} runs compared within {blocks.blocks} training seeds" if blocks.blocks > 1
             else f"{blocks.n} runs")
    if not more and not fewer:
        return " ".join(filter(None, [
            f"No block differs at this fidelity: every block's {pct}% interval includes 0 ({where}), so the data "
            "do not say which layers deserve more experts.", noise]))
    parts = []
    if more:
        verb = "deserves" if len(more) == 1 else "deserve"
        parts.append(_sentence(f"{_names(more)} {verb} more experts: " + "; ".join(
            f"{_fmt(e.coef)} {unit} per expert moved to the {e.label} ({pct}% CI {_fmt(e.lo)} to {_fmt(e.hi)})"
            for e in more)))
    else:
        parts.append("No block is shown to deserve more experts (no interval lies above 0).")
    if fewer:
        verb = "deserves" if len(fewer) == 1 else "deserve"
        parts.append(_sentence(f"{_names(fewer)} {verb} fewer ({pct}% interval{'s' if len(fewer) > 1 else ''} "
                               "below 0: " + "; ".join(f"{_fmt(e.lo)} to {_fmt(e.hi)}" for e in fewer) + ")"))
    parts.append(_sentence(f"From {where}"))
    return " ".join(filter(None, [*parts, noise]))


def verdicts(blocks: EffectEstimate, layers: EffectEstimate | None = None,
             importances: Importances | None = None, unit: str = "score") -> list[str]:
    """Sentences stating what the estimates support, and where they support nothing."""
    out: list[str] = []
    if not blocks.usable:
        out.extend(f"No per-layer conclusion: {n}." for n in blocks.notes)
        return out
    pct = int(round(blocks.level * 100))
    helps = [e for e in blocks.effects if e.supported and e.coef > 0]
    hurts = [e for e in blocks.effects if e.supported and e.coef < 0]
    unclear = [e for e in blocks.effects if not e.supported]
    for e in sorted(helps, key=lambda e: -e.coef):
        out.append(f"Supported: {e.label}: {_fmt(e.coef)} {unit} per expert moved here "
                   f"({pct}% CI {_fmt(e.lo)} to {_fmt(e.hi)}).")
    for e in sorted(hurts, key=lambda e: e.coef):
        out.append(f"Supported: experts in the {e.label} are worth less than average: {_fmt(e.coef)} {unit} per "
                   f"expert ({pct}% CI {_fmt(e.lo)} to {_fmt(e.hi)}).")
    if unclear:
        out.append("Not supported (CI crosses 0): " + "; ".join(
            f"{e.label} {_fmt(e.coef)} [{_fmt(e.lo)}, {_fmt(e.hi)}]" for e in unclear) + ".")
    if not helps and not hurts:
        out.insert(0, f"The {blocks.n} runs support no conclusion about which block needs more experts: "
                      "every block's interval crosses 0.")
    out.extend(f"Caveat: {n}." for n in blocks.notes)
    if layers is not None and layers.usable:
        strong = sorted((e for e in layers.effects if e.supported and e.coef > 0), key=lambda e: -e.coef)
        if strong:
            out.append("Per layer, intervals above 0: " + ", ".join(
                f"{e.label.replace('layer ', '')} ({_fmt(e.coef)})" for e in strong) + ".")
        else:
            out.append(f"Per layer ({len(layers.effects)} coefficients from {layers.n} runs), no interval lies "
                       "above 0: the per-layer data are too thin for layer-level claims.")
        out.extend(f"Per-layer caveat: {n}." for n in layers.notes)
    elif layers is not None:
        out.extend(f"Per layer: {n}." for n in layers.notes)
    if importances is not None:
        for ev in EVALUATORS:
            ranked = importances.ranked(ev)
            if ranked:
                top = ", ".join(f"{k} {v:.2f}" for k, v in ranked[:3])
                out.append(f"{ev} (share of score variation, no direction): {top}.")
        out.extend(f"Note: {n}." for n in importances.notes)
    out.append("With a fixed budget an expert added to one layer is taken from the others, so coefficients are "
               "relative to an average layer and sum to about 0.")
    return out
