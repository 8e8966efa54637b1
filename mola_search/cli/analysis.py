"""The `report`, `analyze` and `compare` subcommands of `mola-search` (argument parsing only)."""

from __future__ import annotations

import json
import sys

from mola_search.cli.common import OneLineParser, top_k_arg


def report_main(argv: list[str]) -> int:
    p = OneLineParser(prog="mola-search report",
                                description="Write a study's report (index.html + PNG figures + summary.md).")
    p.add_argument("study", help="study folder, e.g. runs/<study>")
    p.add_argument("--out", help="report folder (default <study>/report)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    args = p.parse_args(argv)
    from mola_search.analysis.report import build_report

    page = build_report(args.study, args.out, n_boot=max(100, args.bootstrap))
    print(page)
    return 0


def analyze_main(argv: list[str]) -> int:
    p = OneLineParser(prog="mola-search analyze",
                                description="Expert redundancy and routing of one trained MoLA adapter.")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors), or an official "
                                   "MoLA checkpoint (GCYZSL/MoLA; converted on the fly)")
    p.add_argument("--top-k", dest="top_k", type=top_k_arg,
                   help="an official checkpoint's top-k (not recorded there; default: its allocation.json, else 2)")
    p.add_argument("--router-stats", help="router_stats.json (default: next to the adapter or in its run folder)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write redundancy.png / routing.png / balance.png into this folder")
    args = p.parse_args(argv)
    from pathlib import Path

    from mola_search.analysis import figures
    from mola_search.analysis.adapter import analyze_adapter, format_table
    from mola_search.analysis.redundancy import QUANTITIES, QUANTITY_LABELS

    import tempfile

    from mola_search.mola.official_checkpoint import as_adapter_folder

    with tempfile.TemporaryDirectory() as scratch:  # an official checkpoint, converted for the reading only
        a = analyze_adapter(as_adapter_folder(args.adapter, scratch, top_k=args.top_k), args.router_stats)
    if args.json:
        print(json.dumps(a.to_dict(), indent=1))
    else:
        print(f"adapter {a.folder}: {a.num_layers} layers, experts {list(a.config.experts)}, "
              f"{len(a.modules)} modules ({', '.join(a.kinds())})")
        print("mean pairwise Frobenius distance between experts (dW = s*B_i A_i; lower = more redundant)"
              + (f"; routing from {a.routing_source}" if a.routing else "; no router_stats.json found"))
        print(format_table(a))
    if args.out:
        out = Path(args.out)
        panel = {q: {**{k: a.layer_means(q, k) for k in a.kinds()}, "all": a.layer_means(q)} for q in QUANTITIES}
        written = [figures.redundancy_over_depth(out / "redundancy.png", {a.folder.name: panel}, a.num_layers,
                                                 QUANTITIES, QUANTITY_LABELS)]
        if a.routing is not None:
            written.append(figures.routing_heatmaps(out / "routing.png", a.routing, f"Routing of {a.folder}"))
            written.append(figures.balance_over_depth(out / "balance.png", {a.folder.name: a.routing.balance},
                                                      a.routing.exact_balance))
        print("figures: " + ", ".join(str(w) for w in written), file=sys.stderr if args.json else sys.stdout)
    return 0


def compare_main(argv: list[str]) -> int:
    p = OneLineParser(prog="mola-search compare",
                                description="Two (or more) studies side by side: index.html + PNGs + summary.md.")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="study folders (at least two)")
    p.add_argument("--out", help="output folder (default: compare-<a>-vs-<b> beside the first study)")
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    from mola_search.analysis.compare import compare_studies

    page = compare_studies(args.studies, args.out, n_boot=max(100, args.bootstrap))
    print(page)
    return 0
