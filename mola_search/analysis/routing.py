"""Routing on the validation split (the MoLA paper's analysis): who gets picked, how strongly.

Reads a run's `router_stats.json` (one row per adapted module, written by
`MoLAModel.router_stats()` while the validation split is scored). Per layer, the
rows of its module kinds are averaged: the selection share f_i of each expert (its
fraction of the top-k assignments; the shares of a module sum to 1), the mean
routing weight (the renormalised top-k gate), and the load-balance loss
N * sum_i f_i * P_i (P_i = mean full-softmax router probability, "mean_prob"),
which is 1 for a perfectly balanced router and N for one that always picks the
same experts with certainty. Stats written before "mean_prob" was collected
fall back to N * sum_i f_i^2 (the loss with P replaced by f) and say so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mola_search.errors import UserError

STATS_NAME = "router_stats.json"


def balance_loss(share: Sequence[float], mean_prob: Sequence[float]) -> float:
    """Switch-style load-balance loss N * sum_i f_i P_i of one module (1 = balanced)."""
    if len(share) != len(mean_prob):
        raise ValueError(f"share has {len(share)} experts, mean_prob {len(mean_prob)}")
    n = len(share)
    return n * sum(f * p for f, p in zip(share, mean_prob))


def balance_proxy(share: Sequence[float]) -> float:
    """N * sum_i f_i^2: the balance loss with the router probabilities replaced by the shares."""
    return len(share) * sum(f * f for f in share)


@dataclass
class LayerRouting:
    """Per-layer routing summary; matrices are layers x max(experts), NaN beyond a layer's experts."""

    num_layers: int
    experts: list[int]
    share: list[list[float]]
    mean_weight: list[list[float]]
    balance: list[float]
    kinds: list[str]
    tokens: float
    exact_balance: bool      # False: balance is the f_i^2 proxy (no mean_prob in the stats)

    @property
    def max_experts(self) -> int:
        return max(self.experts) if self.experts else 0


def load_router_stats(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / STATS_NAME
    try:
        rows = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{path} does not exist: routing statistics are written by a MoLA run "
                        "when it scores the validation split") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})") from None
    need = {"layer", "experts", "share"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise UserError(f"{path} is not a router_stats file: expected a list of rows with {sorted(need)}")
    return rows


def routing_by_layer(rows: Sequence[dict[str, Any]], num_layers: int | None = None) -> LayerRouting:
    """Average the module rows of each layer (see the module docstring)."""
    if num_layers is None:
        num_layers = 1 + max((int(r["layer"]) for r in rows), default=-1)
    experts = [0] * num_layers
    for r in rows:
        experts[int(r["layer"])] = max(experts[int(r["layer"])], int(r["experts"]))
    width = max(experts, default=0)
    share = [[0.0] * width for _ in range(num_layers)]
    weight = [[0.0] * width for _ in range(num_layers)]
    balance = [0.0] * num_layers
    count = [0] * num_layers
    exact = all("mean_prob" in r for r in rows)
    kinds: list[str] = []
    tokens = 0.0
    for r in rows:
        j, n = int(r["layer"]), int(r["experts"])
        if n != experts[j]:
            continue  # modules of one layer share its expert count; skip a malformed row
        count[j] += 1
        for i in range(n):
            share[j][i] += float(r["share"][i])
            weight[j][i] += float(r.get("mean_weight", [math.nan] * n)[i])
        balance[j] += balance_loss(r["share"], r["mean_prob"]) if exact else balance_proxy(r["share"])
        if r.get("kind") and r["kind"] not in kinds:
            kinds.append(r["kind"])
        tokens = max(tokens, float(r.get("tokens", 0.0)))
    for j in range(num_layers):
        c = count[j]
        for i in range(width):
            if i >= experts[j] or not c:
                share[j][i] = weight[j][i] = math.nan
            else:
                share[j][i] /= c
                weight[j][i] /= c
        balance[j] = balance[j] / c if c else math.nan
    return LayerRouting(num_layers, experts, share, weight, balance, kinds, tokens, exact)
