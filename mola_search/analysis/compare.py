"""`mola-search compare`: two (or more) studies side by side, e.g. two tasks or two models.

Studies of different depth are put on a relative depth axis (layer j of L at
(j + 0.5) / L), and allocations are shown relative to an even split (count /
mean count), so a 30-layer and an 8-layer study, or budgets 160 and 40, compare.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

from mola_search.analysis import figures
from mola_search.analysis.importance import EXPERTS_MOVED
from mola_search.analysis.document import Bullets, Figure, Para, Section, Table, write
from mola_search.analysis.report import LayerFindings, analyse_layers, _fmt
from mola_search.analysis.results import ResultRow, ResultTable, result_table
from mola_search.analysis.studydata import StudyData, load_study, require_completed
from mola_search.errors import UserError
from mola_search.allocation import run_length


def default_out(folders: Sequence[str | Path]) -> Path:
    first = Path(folders[0])
    names = "-vs-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(f).resolve().name) for f in folders)[:120]
    return first.resolve().parent / f"compare-{names}"


def compare_studies(folders: Sequence[str | Path], out: str | Path | None = None, *, n_boot: int = 1000) -> Path:
    """Write compare-<a>-vs-<b>/index.html (+ summary.md, PNGs); returns the page's path."""
    studies = _load_studies(folders)
    names = _unique_names([d.folder.name for d in studies])
    tables = [result_table(d) for d in studies]
    findings = [analyse_layers(d, n_boot=n_boot) for d in studies]
    out = _clean_out(folders, out)
    bests = [t.row("best") for t in tables]
    sections = [_overview_section(names, studies, tables, bests), _allocations_section(names, bests, out),
                _layers_section(names, findings, out)]
    subtitle = " vs ".join(f"`{d.folder}`" for d in studies) + f"; written {time.strftime('%Y-%m-%d %H:%M')}"
    page, _ = write(out, "mola-search comparison: " + " vs ".join(names), subtitle, sections)
    return page


def _load_studies(folders: Sequence[str | Path]) -> list[StudyData]:
    """The completed studies of two or more different folders (UserError otherwise)."""
    if len(folders) < 2:
        raise UserError("compare needs at least two study folders")
    resolved = [Path(f).resolve() for f in folders]
    if len(set(resolved)) < len(resolved):
        raise UserError("compare was given the same study folder twice: pass different studies")
    studies = [load_study(f) for f in folders]
    for d in studies:
        require_completed(d, what="compare")
    return studies


def _clean_out(folders: Sequence[str | Path], out: str | Path | None) -> Path:
    """The output folder (default_out unless given), created, without the PNGs of an earlier comparison."""
    out = Path(out) if out else default_out(folders)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    return out


def _overview_section(names: Sequence[str], studies: Sequence[StudyData], tables: Sequence[ResultTable],
                      bests: Sequence[ResultRow | None]) -> Section:
    """1. Studies: one column per study (settings, census, best allocation and score, best seed)."""
    overview = Section("1. Studies", anchor="studies")
    head = ["", *names]
    rows = []

    def row(label: str, values: Sequence[str]) -> None:
        rows.append([label, *values])

    row("task / model", [f"`{d.config.task}` / `{d.config.model}`" for d in studies])
    row("objective", [f"`{d.config.objective}`" for d in studies])
    row("layers / budget", [f"{d.num_layers} / {d.budget}" for d in studies])
    row("space / sampler", [f"{d.config.space} / {d.config.sampler}" for d in studies])
    row("trials complete / pruned / failed",
        [f"{d.count('COMPLETE')} / {d.count('PRUNED')} / {d.count('FAIL')}" for d in studies])
    row("best allocation", [f"`{run_length(b.allocation)}` ({b.name})" if b and b.allocation else "–" for b in bests])
    row("metric", [f"`{d.metric}`" for d in studies])
    row("noise floor", [d.noise_line() for d in studies])
    row("best score (chosen on validation)",
        [f"{_fmt(b.mean)} ± {_fmt(b.std)} (n={len(b.scores)})" if b else "–" for b in bests])
    refs = [next((r for r in t.rows if r.name == t.best_seed), None) for t in tables]
    row("best seed", [f"{r.name}: {_fmt(r.mean)} ± {_fmt(r.std)}" if r else "–" for r in refs])
    searched = [t.row("best searched") for t in tables]
    row("best searched − best seed [95% CI]",
        [f"{s.vs_best_seed.mean_diff:+.4f} [{_fmt(s.vs_best_seed.lo)}, {_fmt(s.vs_best_seed.hi)}]"
         if s is not None and s.vs_best_seed is not None else "–" for s in searched])
    row("scores are", [t.metric for t in tables])
    overview.add(Table(head, rows))
    for name, d in zip(names, studies):
        if not d.finished:
            overview.add(Para(f"{name} is still running or was interrupted: " + "; ".join(d.notes) + ".", "warning"))
    return overview


def _allocations_section(names: Sequence[str], bests: Sequence[ResultRow | None], out: Path) -> Section:
    """2. Each study's best allocation relative to its even split, over relative depth (allocations.png)."""
    alloc = Section("2. Best allocations over relative depth", anchor="allocations")
    shapes = {n: [c / (sum(b.allocation) / len(b.allocation)) for c in b.allocation]
              for n, b in zip(names, bests) if b is not None and b.allocation}
    if shapes:
        figures.relative_depth_lines(out / "allocations.png", shapes, ylabel="experts / mean experts per layer",
                                     title="Best allocations relative to an even split")
        alloc.add(Figure("allocations.png", "Each study's best allocation as a multiple of its even split "
                                            "(1 = rectangle), over relative depth."))
    return alloc


def _layers_section(names: Sequence[str], findings: Sequence[LayerFindings], out: Path) -> Section:
    """3. Which layers matter: per-layer effects (layer_effects.png), the block table, each study's findings."""
    layers = Section("3. Which layers matter, per study", anchor="layers")
    effects = {n: f.per_layer for n, f in zip(names, findings) if f.per_layer.usable}
    if effects:
        figures.relative_depth_lines(
            out / "layer_effects.png", {n: [e.coef for e in est.effects] for n, est in effects.items()},
            bands={n: ([e.lo for e in est.effects], [e.hi for e in est.effects]) for n, est in effects.items()},
            ylabel="score per expert moved here", title="Per-layer effect of one more expert (simultaneous 95%)",
            zero=True)
        layers.add(Figure("layer_effects.png", "Least-squares estimates of the score change per expert added to a "
                                               "layer, over relative depth; shaded: simultaneous 95% intervals."))
    block_rows = _block_rows(names, findings)
    if block_rows:
        layers.add(Table(["study", "block", f"score for {EXPERTS_MOVED} experts moved in", "simultaneous 95%",
                          "claimed"], block_rows))
    for n, f in zip(names, findings):
        layers.add(Para(f"{n}: {f.headline}"), Bullets(f.sentences))
    agreement = _agreement(names, findings)
    if agreement:
        layers.add(Para(agreement))
    return layers


def _block_rows(names: Sequence[str], findings: Sequence[LayerFindings]) -> list[list[str]]:
    """One row per study and block: the score for EXPERTS_MOVED experts moved in, its interval, claimed or not."""
    rows = []
    for n, f in zip(names, findings):
        for e in f.per_block.effects:
            moved, lo, hi = e.moved()
            rows.append([n, e.label, f"{moved:+.2g}", f"[{lo:+.2g}, {hi:+.2g}]",
                         "yes" if e in f.per_block.claims() else "no"])
    return rows


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _agreement(names: Sequence[str], findings: Sequence) -> str:
    """Do the studies agree on which block gains most? Only stated when every study supports an answer."""
    tops = []
    for f in findings:
        supported = [e for e in f.per_block.claims() if e.coef > 0]
        if not supported:
            return ("The studies cannot be compared block by block: at least one supports no block "
                    "(every interval crosses 0 or too few trials).")
        best = max(supported, key=lambda e: e.coef)
        tops.append((best.layers[0] + best.layers[1]) / 2 / max(1, _depth(f) - 1))
    spread = max(tops) - min(tops)
    where = ", ".join(f"{n}: relative depth {t:.2f}" for n, t in zip(names, tops))
    if spread <= 0.25:
        return f"Agreement: the block with the largest supported gain sits at a similar depth ({where})."
    return f"Disagreement: the blocks with the largest supported gain sit at different depths ({where})."


def _depth(f) -> int:
    return max((e.layers[1] for e in f.per_layer.effects), default=0) + 1 if f.per_layer.effects else \
        max((e.layers[1] for e in f.per_block.effects), default=0) + 1

