"""Figures of `mola-bench`: grouped accuracy bars (table) and accuracy-matrix heat maps (continual).

Matplotlib with the non-interactive Agg backend, so plots work on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table_bars(summary: list[dict[str, Any]], tasks: list[str], majority: dict[str, float | None],
               path: str | Path, *, title: str = "accuracy") -> Path:
    """One group per task, one bar per method (mean, std error bar); a dashed line at the majority class."""
    plt = _pyplot()
    n_methods = max(1, len(summary))
    width = 0.8 / n_methods
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + len(tasks) * (0.5 + 0.35 * n_methods)), 3.8))
    for m, entry in enumerate(summary):
        xs, ys, errs = [], [], []
        for t, task in enumerate(tasks):
            s = entry["tasks"][task]
            if s["mean"] is None:
                continue
            xs.append(t - 0.4 + width * (m + 0.5))
            ys.append(100 * s["mean"])
            errs.append(100 * (s["std"] or 0.0))
        ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=3, label=entry["method"])
    for t, task in enumerate(tasks):
        if majority.get(task) is not None:
            ax.hlines(100 * majority[task], t - 0.45, t + 0.45, colors="k", linestyles="dashed", linewidth=1,
                      label="majority class (scored examples)" if t == 0 else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    lows = [100 * e["tasks"][t]["mean"] for e in summary for t in tasks if e["tasks"][t]["mean"] is not None]
    lows += [100 * v for v in majority.values() if v is not None]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 15), min(100.0, max(lows) + 10))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def matrix_heatmaps(panels: list[tuple[str, list[list[float | None]]]], domains: list[str],
                    path: str | Path) -> Path:
    """Heat maps of R[t][i] (row: after training domain t; column: domain i scored), one panel per method."""
    plt = _pyplot()
    n = max(1, len(panels))
    size = max(3.2, 1.0 + 0.75 * len(domains))
    fig, axes = plt.subplots(1, n, figsize=(size * n + 1.6, size + 0.8), squeeze=False)
    fig.subplots_adjust(wspace=0.15)
    image = None
    for k, (ax, (title, matrix)) in enumerate(zip(axes[0], panels)):
        grid = [[math.nan if v is None else 100 * v for v in row] for row in matrix]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for t, row in enumerate(grid):
            for i, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(i, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 60 else "black")
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(domains)), [f"after {d}" for d in domains] if k == 0 else [], fontsize=8)
        ax.set_xlabel("domain scored")
        ax.set_title(title.replace(": ", ":\n", 1), fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="accuracy (%)")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
