"""One trained MoLA adapter folder: its experts' redundancy and, when recorded, its routing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mola_search.analysis.redundancy import QUANTITIES, ModuleRedundancy, adapter_redundancy, kinds, per_layer
from mola_search.analysis.routing import STATS_NAME, LayerRouting, load_router_stats, routing_by_layer
from mola_search.errors import UserError


@dataclass
class AdapterAnalysis:
    folder: Path
    config: Any                          # MoLAConfig
    modules: list[ModuleRedundancy]
    routing: LayerRouting | None
    routing_source: Path | None

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def layer_means(self, quantity: str, kind: str | None = None) -> list[float]:
        return per_layer(self.modules, quantity, self.num_layers, kind)

    def kinds(self) -> list[str]:
        return kinds(self.modules)

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: experts, top-k, mean redundancy per quantity, routing balance."""
        rows = []
        means = {q: self.layer_means(q) for q in QUANTITIES}
        for j in range(self.num_layers):
            row: dict[str, Any] = {"layer": j, "experts": self.config.experts[j], "top_k": self.config.top_k[j]}
            row.update({q: means[q][j] for q in QUANTITIES})
            if self.routing is not None:
                row["balance_loss"] = self.routing.balance[j]
                share = [s for s in self.routing.share[j] if s == s]
                row["max_share"] = max(share) if share else math.nan
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": str(self.folder), "experts": list(self.config.experts),
                "layers": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                           for r in self.table()],
                "modules": [m.__dict__ for m in self.modules],
                "routing_source": str(self.routing_source) if self.routing_source else None,
                "balance_is_exact": self.routing.exact_balance if self.routing else None}


def analyze_adapter(folder: str | Path, router_stats: str | Path | None = None) -> AdapterAnalysis:
    """Redundancy of every module, plus the run's routing stats (`router_stats.json` next to the adapter).

    Bad input (no adapter_config.json, no weights, tensors that do not match the config)
    is a UserError.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mola_search.mola.config import CONFIG_NAME, WEIGHTS_NAME, MoLAConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a MoLA adapter folder, e.g. "
                        "runs/<study>/finalists/<trial>/seed0/adapter")
    config = MoLAConfig.load(folder)  # one-line UserError when adapter_config.json is missing or bad
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights} is not a readable safetensors file ({exc})") from None
    scaling = [config.scaling(j) for j in range(config.num_layers)]
    try:
        modules = adapter_redundancy(tensors, scaling)
    except (ValueError, IndexError) as exc:
        raise UserError(f"{weights}: {exc}") from None
    if not modules:
        raise UserError(f"{weights} holds no <module>.lora_A / .lora_B tensors: not a MoLA adapter")
    for m in modules:
        if m.layer >= config.num_layers or m.experts != config.experts[m.layer]:
            raise UserError(f"{weights}: {m.module} has {m.experts} experts but {CONFIG_NAME} allocates "
                            f"{config.experts[m.layer] if m.layer < config.num_layers else 'no'} to layer {m.layer}")
    source = Path(router_stats) if router_stats else next(
        (p for p in (folder / STATS_NAME, folder.parent / STATS_NAME) if p.is_file()), None)
    routing = routing_by_layer(load_router_stats(source), config.num_layers) if source else None
    return AdapterAnalysis(folder, config, modules, routing, source)


def format_table(analysis: AdapterAnalysis) -> str:
    """Plain-text per-layer table for the terminal."""
    has_routing = analysis.routing is not None
    head = f"{'layer':>5} {'experts':>7} {'top_k':>5} {'dW dist':>10} {'A dist':>10} {'B dist':>10}"
    if has_routing:
        head += f" {'balance':>8} {'max share':>9}"
    lines = [head]

    def num(v: float, width: int, fmt: str = ".4g") -> str:
        return f"{v:>{width}{fmt}}" if v == v else f"{'-':>{width}}"

    for r in analysis.table():
        line = (f"{r['layer']:>5} {r['experts']:>7} {r['top_k']:>5} {num(r['delta'], 10)} {num(r['A'], 10)} "
                f"{num(r['B'], 10)}")
        if has_routing:
            line += f" {num(r['balance_loss'], 8, '.3f')} {num(r['max_share'], 9, '.3f')}"
        lines.append(line)
    return "\n".join(lines)
