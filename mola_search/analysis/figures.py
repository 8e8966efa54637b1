"""The report's figures: one small function per figure, built on a few shared helpers.

Every figure is a PNG written with matplotlib's Agg backend (no display needed).
The helpers own the common parts (figure grid, depth axis, heat map with colour
bar, line with confidence band, bars over depth spans, saving), so no figure
repeats another's plotting code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
BEST = "#d62728"
NEUTRAL = "#4c72b0"


# ------------------------------------------------------------------------------------------ helpers


def _figure(rows: int = 1, cols: int = 1, *, width: float = 9.0, row_height: float = 3.0,
            sharex: bool = False, sharey: bool | str = False) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(rows, cols, figsize=(width, max(2.2, row_height * rows)), squeeze=False,
                             sharex=sharex, sharey=sharey)
    return fig, list(axes.ravel())


def _save(fig: Any, path: str | Path, title: str | None = None, legend_from: Any = None) -> Path:
    """Title, layout, write, close. `legend_from`: one legend for all panels (that axes' entries), below them."""
    if title:
        fig.suptitle(title, fontsize=11)
    bottom = 0.0
    if legend_from is not None:
        handles, labels = legend_from.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False)
            bottom = 0.4 / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _depth_axis(ax: Any, num_layers: int, label: str = "layer (0 = next to the embeddings)") -> None:
    step = max(1, int(math.ceil(num_layers / 16)))
    ax.set_xticks(range(0, num_layers, step))
    ax.set_xlim(-0.6, num_layers - 0.4)
    ax.set_xlabel(label)


def _heatmap(fig: Any, ax: Any, matrix: Any, *, cbar: str, cmap: str = "viridis", vmin: float | None = None,
             vmax: float | None = None, discrete: bool = False) -> None:
    data = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    cm = plt.get_cmap(cmap, int(vmax - vmin + 1) if discrete and vmin is not None and vmax is not None else None)
    cm = cm.with_extremes(bad="#eeeeee")
    if discrete and vmin is not None and vmax is not None:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cm, vmin=vmin, vmax=vmax)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(cbar)
    if discrete:
        bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
        bar.update_ticks()


def _series(ax: Any, x: Sequence[float], y: Sequence[float], *, lo: Sequence[float] | None = None,
            hi: Sequence[float] | None = None, label: str | None = None, color: str = NEUTRAL,
            style: str = "-", marker: str = "o", width: float = 1.8, alpha: float = 1.0) -> None:
    """A line over depth (NaN leaves a gap), with an optional shaded interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ax.plot(x, y, style, marker=marker, ms=3.5, lw=width, color=color, label=label, alpha=alpha)
    if lo is not None and hi is not None:
        ax.fill_between(x, np.asarray(lo, float), np.asarray(hi, float), color=color, alpha=0.18 * alpha, lw=0)


def _span_bars(ax: Any, spans: Sequence[tuple[float, float]], values: Sequence[float], *, color: str,
               label: str | None = None, slot: int = 0, slots: int = 1,
               err: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
    """Bars covering depth spans (a block's layers, or one layer), `slots` side by side per span."""
    for i, ((a, b), v) in enumerate(zip(spans, values)):
        full = (b - a) + 0.8
        w = full / slots
        left = a - 0.4 + slot * w
        ax.bar(left, v, width=w * 0.95, align="edge", color=color, label=label if i == 0 else None)
        if err is not None:
            _interval(ax, [left + w / 2], [err[0][i]], [err[1][i]], color="black", cap=w * 0.15)


def _interval(ax: Any, x: Sequence[float], lo: Sequence[float], hi: Sequence[float], *, color: str,
              cap: float = 0.12, label: str | None = None) -> None:
    """Vertical lines from lo to hi, drawn as they are: an estimate need not lie inside its own
    bootstrap interval (matplotlib's yerr refuses that case), so the point is never assumed to."""
    x, lo, hi = np.asarray(x, float), np.asarray(lo, float), np.asarray(hi, float)
    ax.vlines(x, lo, hi, colors=color, lw=1, label=label)
    ax.hlines(np.concatenate([lo, hi]), np.concatenate([x, x]) - cap, np.concatenate([x, x]) + cap, colors=color,
              lw=1)


def _grouped_bars(ax: Any, categories: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """Bars per category, one colour per series, legend above the plot (never over the bars)."""
    x = np.arange(len(categories))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x - 0.4 + (k + 0.5) * width, values, width=width * 0.95, color=PALETTE[k % len(PALETTE)], label=name)
    ax.set_xticks(x)
    rotate = len(categories) > 12
    ax.set_xticklabels(categories, fontsize=7 if rotate else 8, rotation=90 if rotate else 0)
    ax.legend(fontsize=8, frameon=False, ncol=len(series), loc="lower right", bbox_to_anchor=(1.0, 1.0))


def _zero_line(ax: Any) -> None:
    ax.axhline(0.0, color="black", lw=0.8)


def _legend(ax: Any, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, frameon=False, **kwargs)


# ------------------------------------------------------------------------------------------ figures


def allocation_bars(path: str | Path, allocations: Sequence[tuple[str, Sequence[int]]],
                    highlight: str | None = None, max_experts: int | None = None) -> Path:
    """Small multiples: expert count over depth for the best allocation and each seeded shape."""
    cols = 3 if len(allocations) > 4 else max(1, len(allocations))
    rows = math.ceil(len(allocations) / cols)
    fig, axes = _figure(rows, cols, width=3.3 * cols, row_height=2.4, sharey=True)
    top = max_experts or max(max(c) for _, c in allocations)
    for ax, (name, counts) in zip(axes, allocations):
        L = len(counts)
        spans = [(j, j) for j in range(L)]
        _span_bars(ax, spans, counts, color=BEST if name == highlight else NEUTRAL)
        ax.set_title(name + ("  (best)" if name == highlight else ""), fontsize=9,
                     color=BEST if name == highlight else "black")
        _depth_axis(ax, L, label="layer")
        ax.set_ylim(0, top + 0.5)
    for ax in axes[len(allocations):]:
        ax.axis("off")
    axes[0].set_ylabel("experts")
    return _save(fig, path, "Expert allocation over depth")


def trial_heatmap(path: str | Path, rows: Sequence[tuple[str, Sequence[int]]], min_experts: int = 1,
                  max_experts: int | None = None) -> Path:
    """All completed trials: rows sorted by score (best at the top), columns = layers, colour = experts."""
    matrix = np.array([c for _, c in rows], dtype=float)
    n, L = matrix.shape
    fig, axes = _figure(1, 1, width=9.0, row_height=min(14.0, 1.6 + 0.2 * n))
    ax = axes[0]
    hi = max_experts if max_experts is not None else int(matrix.max())
    _heatmap(fig, ax, matrix, cbar="experts", cmap="viridis", vmin=min(min_experts, int(matrix.min())),
             vmax=max(hi, int(matrix.max())), discrete=True)
    step = max(1, int(math.ceil(n / 45)))
    ax.set_yticks(range(0, n, step))
    ax.set_yticklabels([rows[i][0] for i in range(0, n, step)], fontsize=7)
    _depth_axis(ax, L)
    ax.set_ylabel("trials, best score at the top")
    return _save(fig, path, f"Allocations of the {n} completed trials")


def importance_over_depth(path: str | Path, importances: Mapping[str, Mapping[str, float]],
                          spans: Mapping[str, tuple[float, float]], num_layers: int) -> Path:
    """Optuna's importance evaluators per encoding parameter, parameters in depth order (others last)."""
    evaluators = [e for e in importances if importances[e]]
    names = sorted({p for e in evaluators for p in importances[e]}, key=lambda n: (n not in spans, spans.get(n), n))
    fig, axes = _figure(1, 1, width=max(7.0, min(14.0, 2.0 + 0.45 * len(names) * len(evaluators))), row_height=3.4)
    ax = axes[0]
    labels = [n + ("" if n not in spans else "\n" + _span_label(spans[n])) for n in names]
    _grouped_bars(ax, labels, {e: [importances[e].get(n, 0.0) for n in names] for e in evaluators})
    ax.set_ylabel("importance (share)")
    ax.set_xlabel(f"encoding parameter (layers it controls, of {num_layers})")
    return _save(fig, path, "Optuna parameter importance, in depth order")


def _span_label(span: tuple[float, float]) -> str:
    a, b = span
    return f"L{a:g}" if a == b else f"L{a:g}-{b:g}"


def effects_over_depth(path: str | Path, per_layer: Any, per_block: Any, num_layers: int) -> Path:
    """Ridge estimate of score per expert: per layer (points) and per block (bars), each with its interval
    drawn as it is (a point outside its own interval is drawn hollow red, never clipped into it)."""
    fig, axes = _figure(1, 1, width=9.0, row_height=3.4)
    ax = axes[0]
    if per_block is not None and per_block.usable:
        e = per_block.effects
        _span_bars(ax, [x.layers for x in e], [x.coef for x in e], color="#c6dbef", label="per block",
                   err=([x.lo for x in e], [x.hi for x in e]))
    if per_layer is not None and per_layer.usable:
        e = per_layer.effects
        x = np.array([v.layers[0] for v in e], float)
        y = np.array([v.coef for v in e])
        out = np.array([v.outside for v in e], bool)
        _interval(ax, x, [v.lo for v in e], [v.hi for v in e], color=NEUTRAL,
                  label=f"per layer ({int(per_layer.level * 100)}% bootstrap CI)")
        ax.plot(x[~out], y[~out], "o", ms=4, color=NEUTRAL)
        if out.any():
            ax.plot(x[out], y[out], "o", ms=5, mfc="none", color=BEST, label="estimate outside its interval")
    _zero_line(ax)
    _depth_axis(ax, num_layers)
    ax.set_ylabel("score per expert moved here")
    _legend(ax, loc="best")
    return _save(fig, path, "Where an extra expert pays (ridge regression, runs compared within their training seed)")


def optimisation_history(path: str | Path, trials: Sequence[Any]) -> Path:
    """Score per trial with the best so far; seeds starred, pruned at their last rung, failures at the bottom."""
    fig, axes = _figure(1, 1, width=9.0, row_height=3.6)
    ax = axes[0]
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    pruned = [t for t in trials if t.state == "PRUNED" and t.last_score is not None]
    groups = [  # label, trials, marker, face colour, edge colour
        ("searched", [t for t in done if not t.is_seed and t.duplicate_of is None], "o", NEUTRAL, NEUTRAL),
        ("duplicate (cached)", [t for t in done if not t.is_seed and t.duplicate_of is not None], "o", "#c8c8c8",
         "#c8c8c8"),
        ("pruned (last rung)", [t for t in pruned if not t.is_seed], "x", "#7f7f7f", "#7f7f7f"),
        ("seed", [t for t in done if t.is_seed], "*", "#ff7f0e", "#ff7f0e"),
        ("seed, pruned", [t for t in pruned if t.is_seed], "*", "none", "#ff7f0e"),
    ]
    scores = [t.last_score for t in trials if t.last_score is not None]
    floor = min(scores) if scores else 0.0
    for label, items, marker, face, edge in groups:
        if items:
            colours = {"color": edge} if marker == "x" else {"facecolors": face, "edgecolors": edge}
            ax.scatter([t.number for t in items], [t.last_score for t in items], marker=marker,
                       s=90 if marker == "*" else 22, label=f"{label} ({len(items)})", zorder=3, **colours)
    for t in (t for t in trials if t.is_seed and t.last_score is not None):
        ax.annotate(t.seed_name, (t.number, t.last_score), fontsize=7, xytext=(4, -3), textcoords="offset points")
    failed = [t for t in trials if t.state == "FAIL" and t.duplicate_of is None]
    if failed:
        ax.scatter([t.number for t in failed], [floor] * len(failed), marker="v", color=BEST,
                   label=f"failed ({len(failed)})", zorder=3)
    if done:
        order = sorted(done, key=lambda t: t.number)
        best = np.maximum.accumulate([t.value for t in order])
        ax.step([t.number for t in order], best, where="post", color=BEST, lw=1.5, label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation score")
    _legend(ax, loc="lower right")
    return _save(fig, path, "Optimisation history")


def redundancy_over_depth(path: str | Path, panels: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                          num_layers: int, quantities: Sequence[str], labels: Mapping[str, str]) -> Path:
    """Mean pairwise expert distance per layer: rows = quantity, columns = allocation, lines = module type.

    `panels[allocation][quantity][kind]` is a per-layer list; kind "all" (the mean) is drawn bold.
    """
    names = list(panels)
    fig, axes = _figure(len(quantities), len(names), width=5.2 * len(names), row_height=2.7, sharex=True)
    for c, name in enumerate(names):
        for r, q in enumerate(quantities):
            ax = axes[r * len(names) + c]
            lines = panels[name].get(q, {})
            for k, (kind, values) in enumerate((k, v) for k, v in lines.items() if k != "all"):
                _series(ax, range(num_layers), values, label=kind, color=PALETTE[k % len(PALETTE)], width=1.0,
                        marker=".", alpha=0.7)
            if "all" in lines:
                _series(ax, range(num_layers), lines["all"], label="mean", color="black", width=2.4)
            ax.set_title(f"{name}: {labels.get(q, q)}", fontsize=9)
            _depth_axis(ax, num_layers, label="layer" if r == len(quantities) - 1 else "")
            if c == 0:
                ax.set_ylabel("mean Frobenius dist.")
    return _save(fig, path, "Expert redundancy (lower = more similar experts)", legend_from=axes[0])


def routing_heatmaps(path: str | Path, routing: Any, title: str) -> Path:
    """Per layer x expert: selection share and mean routing weight on the validation split."""
    fig, axes = _figure(1, 2, width=11.0, row_height=max(3.0, 0.25 * routing.num_layers + 1.5))
    for ax, matrix, label in ((axes[0], routing.share, "selection share f_i"),
                              (axes[1], routing.mean_weight, "mean routing weight")):
        values = np.asarray(matrix, float)
        _heatmap(fig, ax, values, cbar=label, cmap="magma", vmin=0.0,
                 vmax=float(np.nanmax(values)) if np.isfinite(values).any() else 1.0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=9)
    return _save(fig, path, title)


def balance_over_depth(path: str | Path, balances: Mapping[str, Sequence[float]], exact: bool) -> Path:
    """Load-balance loss N * sum f_i P_i per layer (1 = balanced) for each analysed allocation."""
    fig, axes = _figure(1, 1, width=9.0, row_height=3.0)
    ax = axes[0]
    num_layers = 0
    for k, (name, values) in enumerate(balances.items()):
        num_layers = max(num_layers, len(values))
        _series(ax, range(len(values)), values, label=name, color=PALETTE[k % len(PALETTE)])
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    _depth_axis(ax, num_layers)
    ax.set_ylabel("N·Σ f_i P_i" if exact else "N·Σ f_i² (proxy)")
    _legend(ax)
    return _save(fig, path, "Load-balance loss per layer (1 = perfectly balanced)")


def relative_depth_lines(path: str | Path, series: Mapping[str, Sequence[float]], *, ylabel: str, title: str,
                         bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                         zero: bool = False) -> Path:
    """Lines over relative depth (0 = bottom, 1 = top): compares studies of different depths."""
    fig, axes = _figure(1, 1, width=9.0, row_height=3.2)
    ax = axes[0]
    for k, (name, values) in enumerate(series.items()):
        L = len(values)
        x = [(j + 0.5) / L for j in range(L)]
        band = (bands or {}).get(name)
        _series(ax, x, values, lo=band[0] if band else None, hi=band[1] if band else None, label=name,
                color=PALETTE[k % len(PALETTE)])
    if zero:
        _zero_line(ax)
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (0 = embeddings, 1 = output)")
    ax.set_ylabel(ylabel)
    _legend(ax)
    return _save(fig, path, title)
