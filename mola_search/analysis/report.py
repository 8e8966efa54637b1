"""`mola-search report`: one study folder -> report/index.html (+ PNGs) and report/summary.md.

Sections: 1 the noise floor (can this fidelity separate allocations at all?), 2
results (finalists chosen on validation, scored on the test split once, paired
with every seeded shape), 3 allocation pictures, 4 which layers deserve more
experts (a headline generated from the intervals, Optuna importance, ridge
regression with the training seed as a blocking factor), 5 optimisation history,
6 expert redundancy (trained adapters only), 7 routing, 8 provenance. Works on a
study that is still running or was interrupted (it uses what has finished and
says so at the top). `study_summary` renders sections 1, 2 and the layer headline
as Markdown without drawing anything (for the search's own summary.md).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mola_search.analysis.document import Bullets, Figure, Para, Section, Table, to_markdown, write
from mola_search.analysis.importance import (EXPERTS_MOVED, EffectEstimate, Importances, block_groups, headline,
                                             layer_effects, optuna_importances, param_depths, verdicts)
from mola_search.analysis.results import EXAMPLES_X_SEEDS, Paired, ResultTable, result_table
from mola_search.analysis.studydata import FinalistRecord, StudyData, load_study, require_completed
from mola_search.search.study import StudyFolder
from mola_search.allocation import run_length



@dataclass
class LayerFindings:
    importances: Importances
    per_layer: EffectEstimate
    per_block: EffectEstimate
    sentences: list[str]
    headline: str = ""            # "which layers deserve more experts", from the block intervals
    trials: int = 0               # search / pilot trials among the observations
    finalist_runs: int = 0        # finalist runs (validation scores) among them


def layer_observations(data: StudyData) -> tuple[list[tuple[int, ...]], list[float], list[str], int, int]:
    """What the layer regression sees: (allocations, scores, blocks, #trials, #finalist runs).

    Every completed trial (duplicates once, pilot replicates included) with its
    validation score of the study metric, plus every finalist run's validation score
    of the same metric. The block is the training seed, kept apart for trials and
    finalists (they train at different fidelities), so scores are only compared
    between runs that shared a seed: its training subset, order and initialisation.
    """
    allocs, scores, blocks = [], [], []
    trials = data.completed(unique=True, replicates=True)
    for t in trials:
        allocs.append(t.allocation)
        scores.append(float(t.value))
        blocks.append(f"trial:{data.trial_seed(t)}")
    runs = 0
    for f in data.finalists:
        if f.allocation is None or f.metric != data.metric:
            continue
        for seed, v in sorted(f.validation.items()):
            allocs.append(f.allocation)
            scores.append(v)
            blocks.append(f"finalist:{seed}")
            runs += 1
    return allocs, scores, blocks, len(trials), runs


def analyse_layers(data: StudyData, *, n_boot: int = 1000, importance: bool = True) -> LayerFindings:
    """Optuna importance + per-layer and per-block ridge effects (seed-blocked) + the headline and verdicts."""
    allocations, scores, seeds, n_trials, n_runs = layer_observations(data)
    L = data.num_layers
    blocks = data.space.blocks if data.space is not None and data.space.encoding == "blocks" else 4
    groups, labels = block_groups(L, blocks)
    per_block = layer_effects(allocations, scores, groups, labels, blocks=seeds)
    per_layer = layer_effects(allocations, scores, blocks=seeds)
    search = {t.number for t in data.completed(unique=False)}   # the search's seed: no pilot replicates
    imp = optuna_importances(data.study, numbers=search) if importance else Importances()
    unit = f"`{data.metric}`"
    sentences = verdicts(per_block, per_layer, imp, unit=unit)
    pruned = data.count("PRUNED")
    if pruned and per_block.usable:
        sentences.append(f"The regression uses completed trials and finalist runs; {pruned} pruned trials (stopped "
                         "at a lower rung) are left out, so it sees mostly allocations that survived pruning.")
    return LayerFindings(imp, per_layer, per_block, sentences, headline(per_block, data.noise_line(), unit),
                         n_trials, n_runs)


def build_report(folder: str | Path, out: str | Path | None = None, *, n_boot: int = 1000) -> Path:
    """Write the report of the study in `folder`; returns the path of index.html."""
    data = load_study(folder)
    require_completed(data)
    out = Path(out) if out else StudyFolder(data.folder).report_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that this one may not redraw
        old.unlink()
    started = time.time()
    table = result_table(data, n_boot=max(1000, n_boot))
    findings = analyse_layers(data, n_boot=n_boot)
    _caution(table, findings)
    sections = [
        _decision_section(data),
        _noise_section(data),
        *_oneshot_section(data),
        _results_section(data, table),
        _allocation_section(data, table, out),
        _importance_section(data, findings, out),
        _history_section(data, out),
        *_adapter_sections(data, out),
        _throughput_section(data),
        _provenance_section(data, started),
    ]
    if not data.finished:
        done = len(data.completed())
        runs = sum(len(f.test) for f in data.finalists)
        sections[0].blocks.insert(0, Para(
            f"This study is still running or was interrupted: the report uses the {done} completed trials and "
            f"{runs} finished finalist runs available now. " + "; ".join(data.notes) + ".", "warning"))
    page, _ = write(out, f"mola-search study {data.name}", _subtitle(data), sections)
    return page


def study_summary(study: str | Path | StudyData, *, n_boot: int = 1000, importance: bool = False) -> str:
    """Markdown of the noise floor, the honest result table and the layer headline; draws no figure.

    For the search's own summary.md: `study` is a study folder (or loaded StudyData).
    """
    data = study if isinstance(study, StudyData) else load_study(study)
    table = result_table(data, n_boot=max(1000, n_boot))
    sections = [_decision_section(data), _noise_section(data), *_oneshot_section(data), _results_section(data, table)]
    if len(data.completed()) >= 2:
        findings = analyse_layers(data, n_boot=n_boot, importance=importance)
        _caution(table, findings)
        sections.append(Section("Which layers deserve more experts", anchor="layers")
                        .add(Para(findings.headline), Bullets(findings.sentences)))
    return to_markdown(f"mola-search study {data.name}", _subtitle(data), sections)


def _subtitle(data: StudyData) -> str:
    return (f"task `{data.config.task}`, model `{data.config.model}`, objective `{data.config.objective}`, "
            f"metric `{data.metric}`, {data.num_layers} layers, budget {data.budget}; written "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def _caution(table: ResultTable, findings: LayerFindings) -> None:
    if table.nothing_learned:
        findings.sentences.insert(0, "Caution: no finalist beat the majority class (section 2), so the trial scores "
                                     "these estimates come from are mostly seed noise: read any 'supported' line "
                                     "below as a hypothesis for a longer study, not as a finding.")


# ------------------------------------------------------------------------------------------ sections


def _fmt(v: float | None, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _fmt_p(p: float) -> str:
    return "–" if p != p else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _decision_section(data: StudyData) -> Section:
    """What the study can say: the race's decision, every contender's part in it, and what would move it on."""
    s = Section("Decision", anchor="decision")
    d = data.decision
    if d is None:
        s.add(Para("This study made no decision (it has no racing.json: made before races, or stopped before its "
                   f"final stage). `mola-search decide {data.folder}` races its finalists now; nothing finished is "
                   "trained again.", "warning"))
        return s
    s.add(Para(_cap(d.words()) + ".", "" if d.decision == "winner" else "warning"))
    s.add(Para(f"Raced on mean validation `{d.metric}` over shared fresh seeds: every look drops a contender worse "
               f"than the leader (Holm over the pairs); the race stops at a winner, at equivalence within "
               f"±{d.min_effect:g} (two one-sided tests), or when its budget of {d.max_runs} fine-tunes is spent. "
               f"All its claims together hold at family-wise level {d.level:g} ({d.spending_words()}). Test scores "
               f"chose nothing.", "muted"))
    rows = [[e.name + (" (exported)" if e.label == d.chosen else ""), f"`{run_length(e.experts)}`", e.status,
             str(len(e.validation)), _fmt(e.val_mean), _fmt(e.test_mean), e.reason or "–"]
            for e in sorted(d.contenders, key=lambda e: (e.status != "live", -(e.val_mean if e.validation else -9e9)))]
    s.add(Table(["contender", "experts per layer", "status", "seeds", f"validation `{d.metric}`",
                 f"test `{d.metric}` (reported once)", "why"], rows))
    looks = [[str(k["rounds"]), f"{k['alpha']:.2g}", d.contender(k["leader"]).name if d.contender(k["leader"]) else
              k["leader"], _fmt(k.get("se")), ", ".join(d.contender(c).name for c in k["dropped"]) or "–",
              k["decision"]] for k in d.looks]
    if looks:
        s.add(Table(["look after seeds", "error budget spent", "leader", "SE of a difference", "dropped",
                     "decision"], looks))
    s.add(Para(f"Next: `{d.next_command(str(data.folder))}`"))
    return s


def _noise_section(data: StudyData) -> Section:
    s = Section("1. Noise floor", anchor="noise")
    noise = data.noise
    if noise is None:
        s.add(Para(f"No noise floor: {data.noise_note}.", "warning"))
        return s
    s.add(Para(_cap(noise.line()) + "."))
    sd = math.sqrt(noise.residual_var) if noise.residual_var == noise.residual_var else None
    s.add(Para(f"Pilot: the same allocations trained with several training seeds at the search's fidelity. A "
               f"search trial is compared with another trained on the same seed, so only the allocation x seed "
               f"residual (sd {_fmt(sd)} `{noise.metric}`) blurs a comparison; two trials closer than "
               f"{_fmt(noise.min_detectable_difference, 4)} cannot be told apart.", "muted"))
    seeds = list(noise.seeds)
    rows = []
    for name in noise.allocations:
        row = noise.scores.get(name, {})
        values = [row.get(k) for k in seeds]
        finite = [v for v in values if v is not None]
        rows.append([name, *[_fmt(v) for v in values], _fmt(sum(finite) / len(finite) if finite else None)])
    if rows:
        s.add(Table(["allocation", *[f"seed {k}" for k in seeds], "mean"], rows))
    if noise.notes:
        s.add(Bullets([f"Note: {n}." for n in noise.notes]))
    if len(data.noise_rounds) > 1:
        s.add(Para(f"--auto-fidelity: {len(data.noise_rounds)} rounds, the fidelity doubled until allocations "
                   "separated (or the budget ran out); the last round is the one the search used."))
        rows = []
        for i, r in enumerate(data.noise_rounds):
            fid = ", ".join(f"{k}={v}" for k, v in (r.fidelity or {}).items()) or "–"
            lo, hi = r.share_ci
            rows.append([str(i + 1), fid, _pct(r.allocation_share), f"[{_pct(lo)}, {_pct(hi)}]",
                         _fmt(r.min_detectable_difference), "yes" if r.can_separate else "no"])
        s.add(Table(["round", "fidelity", "allocation share", f"{int(round(noise.level * 100))}% CI",
                     "min. detectable difference", "separates"], rows, {len(rows) - 1}))
    return s


def _oneshot_section(data: StudyData) -> list[Section]:
    """One-shot studies: how far the supernet's ranking agreed with standalone training (oneshot.json)."""
    from mola_search.search.strategies.oneshot.trust import Trust

    raw = StudyFolder(data.folder).read_oneshot()
    if raw is None:
        return []
    try:
        trust = Trust.from_dict(raw)
    except TypeError:
        return []
    s = Section("One-shot search: can its ranking be trusted?", anchor="oneshot")
    s.add(Para(_cap(trust.line()) + ".", "" if trust.trustworthy else "warning"))
    if trust.bullets():
        s.add(Bullets(trust.bullets()))
    for header, rows in (trust.pair_rows(), trust.signal_rows()):
        if rows:
            s.add(Table(header, rows))
    return [s]


def _pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:.0f}%"


def _cap(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:]


def _mean_std(values: dict[int, float]) -> str:
    if not values:
        return "–"
    mean = sum(values.values()) / len(values)
    if len(values) == 1:
        return _fmt(mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values.values()) / (len(values) - 1))
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _delta(p: Paired | None) -> str:
    return "–" if p is None else p.text()


def _results_section(data: StudyData, table: ResultTable) -> Section:
    s = Section("2. Results", anchor="results")
    m = f"`{table.metric_name}`"
    if table.on_test:
        on = "validation" if table.selected_on == "validation" else "TEST (no validation scores)"
        seeds = sorted({k for r in table.rows for k in r.scores})
        reused = sorted(set(seeds) & {data.trial_seed(t) for t in data.trials})
        s.add(Para(f"Finalists are retrained with training seeds {', '.join(map(str, seeds))} ("
                   + (f"seed {', '.join(map(str, reused))} also trained search trials, so a finalist can repeat the "
                      "run that selected it" if reused else "none used by the search")
                   + f"). The best is chosen by mean {on} {m} over those seeds; test scores are reported once"
                   f"{' and chose nothing' if table.selected_on == 'validation' else ''}. Δ is the mean test "
                   f"difference to the best seeded baseline ({table.best_seed or '–'}), paired on the same test "
                   "examples and seeds, with a 95% bootstrap CI and p-value."))
    else:
        s.add(Para(f"Scores: {table.metric}. The best seeded baseline is {table.best_seed or '–'}; Δ is the "
                   "difference to it (single runs: no CI, no test)."))
    extras = table.extras
    rows, emphasis = [], set()
    for i, r in enumerate(table.rows):
        p = r.vs_best_seed
        diff = "reference" if r.name == table.best_seed else _delta(p)
        cells = [r.role, r.name, f"`{run_length(r.allocation)}`" if r.allocation else "–", _mean_std(r.validation)]
        if table.on_test:
            cells += [_mean_std(r.scores), _mean_std(r.accuracy), *[_mean_std(r.extra.get(k, {})) for k in extras]]
        cells += [str(len(r.scores)), diff, "–" if p is None else _fmt_p(r.vs_best_seed_holm),
                  r.majority_claim or "–", f"{r.trainable_params:,}" if r.trainable_params else "–"]
        rows.append(cells)
        if "best" in r.role.split(", "):
            emphasis.add(i)
    head = ["", "allocation", "experts per layer", f"validation {m}"]
    if table.on_test:
        head += [f"test {m}", "test accuracy", *[f"test {k}" for k in extras]]
    head += ["seeds", f"Δ test {m} vs best seed [95% CI]" if table.on_test else "Δ vs best seed", "p (Holm)",
             "vs majority class (Holm)", "trainable params"]
    if table.majority is not None:  # the score a model gets without learning anything
        rows.append(["reference", "majority class", "–", "–", "–", _fmt(table.majority),
                     *["–"] * (len(head) - 6)])
    s.add(Table(head, rows, emphasis))
    best = table.row("best")
    if table.vs_seeds and best is not None:
        s.add(Para(f"The chosen best ({best.name}) against every seeded shape, on the test split (best − seed):"))
        vs_rows = []
        for c in table.vs_seeds:
            p = c.metric
            vs_rows.append([c.seed, _delta(p), "–" if p is None else _fmt_p(c.metric_holm), _delta(c.accuracy),
                            "–" if c.accuracy is None else _fmt_p(c.accuracy_holm), c.verdict,
                            "–" if p is None else (f"{p.n} seeds x {p.n_examples} examples"
                                                   if p.method == EXAMPLES_X_SEEDS else f"{p.n} seeds (per-seed)")])
        s.add(Table(["seed shape", f"Δ test {m} [95% CI]", "p (Holm)", "Δ test accuracy [95% CI]", "p (Holm)",
                     "verdict", "paired on"], vs_rows))
    if data.best:
        exported = data.exported_finalist()
        s.add(Para("Exported best_allocation.json: "
                   + (f"{exported.name} " if exported is not None else "")
                   + f"`{','.join(map(str, data.best.get('experts') or ()))}` ({data.best.get('chosen_by')})."))
    if table.notes:
        s.add(Bullets([f"Note: {n.rstrip('.')}." for n in table.notes]))
    return s


def _allocation_section(data: StudyData, table: ResultTable, out: Path) -> Section:
    from mola_search.analysis import figures  # matplotlib: loaded only when a figure is drawn

    s = Section("3. Allocations", anchor="allocations")
    seeds = data.seed_trials()
    best = table.row("best")
    shown: list[tuple[str, Sequence[int]]] = []
    highlight = None
    if best is not None and best.allocation:
        highlight = best.name if best.is_seed else f"best: {best.name}"
        if not best.is_seed:
            shown.append((highlight, best.allocation))
    searched = table.row("best searched")
    if searched is not None and searched.allocation and searched is not best:
        shown.append((f"best searched: {searched.name}", searched.allocation))
    order = [n for n in data.config.seed_names if n in seeds] + [n for n in seeds if n not in data.config.seed_names]
    shown += [(n, seeds[n].allocation) for n in order]
    max_e = data.space.max_experts if data.space is not None else None
    if shown:
        figures.allocation_bars(out / "allocations.png", shown, highlight, max_e)
        s.add(Figure("allocations.png", "Expert count per layer: the best allocation (red) beside the seeded "
                                        "shapes and the AlphaLoRA seed, on the same budget."))
    done = sorted(data.completed(unique=True), key=lambda t: -t.value)
    labels = [f"#{t.number} {t.value:.3f} {t.seed_name or t.origin}" for t in done]
    figures.trial_heatmap(out / "trials_heatmap.png", list(zip(labels, [t.allocation for t in done])),
                          data.space.min_experts if data.space is not None else 1, max_e)
    s.add(Figure("trials_heatmap.png", f"The {len(done)} distinct allocations trained with the study seed (trials: "
                                       f"{data.census_text()}), sorted by validation score; colour = experts in "
                                       "that layer."))
    return s


def _importance_section(data: StudyData, f: LayerFindings, out: Path) -> Section:
    from mola_search.analysis import figures  # matplotlib: loaded only when a figure is drawn

    s = Section("4. Which layers deserve more experts", anchor="layers")
    s.add(Para(f.headline), Para("What the data supports:"), Bullets(f.sentences))
    if f.per_block.usable:
        rows = [[e.label, *(f"{v:+.2g}" for v in e.moved()[:1]), "[{:+.2g}, {:+.2g}]".format(*e.moved()[1:]),
                 "yes" if e in f.per_block.claims() else ("no (the fit explains nothing)" if e.supported else
                                                         "no (interval includes 0)")]
                for e in f.per_block.effects]
        seeds = f.per_block.blocks
        s.add(Table(["block", f"`{data.metric}` for {EXPERTS_MOVED} experts moved in",
                     f"{int(round(100 * f.per_block.level))}% simultaneous interval", "claimed"], rows),
              Para(f"Least squares of the validation `{data.metric}` on the expert counts over {f.per_block.n} "
                   f"runs ({f.trials} completed trials and {f.finalist_runs} finalist runs), with the training seed "
                   f"as a blocking factor ({seeds} seed block{'s' if seeds != 1 else ''}: runs are compared only "
                   f"with runs of the same seed); {f.per_block.df} residual degrees of freedom; within-seed R² "
                   f"{f.per_block.r2:.2f} per block (adjusted {f.per_block.adjusted_r2:.2f}), {f.per_layer.r2:.2f} "
                   f"per layer. Intervals are t intervals at the Bonferroni level over the blocks, so all hold "
                   f"together at {int(round(100 * f.per_block.level))}%.", "muted"))
    spans = param_depths(sorted({p for v in f.importances.values.values() for p in v}), data.num_layers)
    if f.importances.values:
        figures.importance_over_depth(out / "importance.png", f.importances.values, spans, data.num_layers)
        dups = sum(1 for t in data.trials if t.state == "COMPLETE" and t.duplicate_of is not None)
        s.add(Figure("importance.png", f"PED-ANOVA and fANOVA importance of the encoding parameters over the "
                                       f"{f.importances.trials} complete trials at the study seed (trials: "
                                       f"{data.census_text()})"
                                       + (f"; duplicate proposals count, as other points of the space that decode to "
                                          "an allocation already trained" if dups > 0 else "")
                                       + ", in depth order. Importance has no sign: a parameter also matters "
                                       "when good trials keep it low."))
        names = sorted({p for v in f.importances.values.values() for p in v}, key=lambda n: (n not in spans, n))
        evs = list(f.importances.values)
        s.add(Table(["parameter", "layers", *evs],
                    [[n, _span_text(spans.get(n)), *[_fmt(f.importances.values[e].get(n), 3) for e in evs]]
                     for n in names]))
    if f.per_layer.usable or f.per_block.usable:
        figures.effects_over_depth(out / "layer_effects.png", f.per_layer, f.per_block, data.num_layers)
        s.add(Figure("layer_effects.png", "Score change per expert added to a layer (points) or block (bars), "
                                          "paid for by the other layers; vertical lines span the simultaneous "
                                          "intervals (Bonferroni over the layers, and over the blocks)."))
    return s


def _or(value, missing: str = "all"):
    """A setting as a reader expects it: None (no limit) in words, never Python's None."""
    return missing if value is None else value


def _span_text(span: tuple[float, float] | None) -> str:
    if span is None:
        return "–"
    a, b = span
    if a == b:
        return f"{a:g}"
    return f"{a:g}–{b:g}"


def _history_section(data: StudyData, out: Path) -> Section:
    from mola_search.analysis import figures  # matplotlib: loaded only when a figure is drawn

    s = Section("5. Optimisation history", anchor="history")
    figures.optimisation_history(out / "history.png", data.trials)
    s.add(Figure("history.png", "Validation score per trial; the red line is the best so far. Seeds are stars, "
                                "pruned trials are drawn at the score of their last rung, failed ones at the bottom."),
          Para(f"Trials: {data.census_text()}; "
               f"{sum(1 for t in data.trials if t.state == 'RUNNING')} running."))
    fails = [t for t in data.trials if t.state == "FAIL" and t.failure and t.duplicate_of is None]
    if fails:
        s.add(Bullets([f"trial {t.number} ({t.origin}): {t.failure[:200]}" for t in fails[:10]]))
    return s


def _adapter_sections(data: StudyData, out: Path) -> list[Section]:
    """6 redundancy and 7 routing, from the trained adapters of the best finalist and the rectangle seed."""
    analyses = _adapter_analyses(data)
    if not analyses:
        why = ("the objective is synthetic: no adapter is trained" if data.config.objective.startswith("synthetic")
               else "no finalist run folder holds a trained adapter yet")
        red = Section("6. Expert redundancy", anchor="redundancy")
        rout = Section("7. Routing", anchor="routing")
        red.add(Para(f"Not available: {why}."))
        rout.add(Para(f"Not available: {why}."))
        return [red, rout]
    return [_redundancy_section(analyses, data.num_layers, out), _routing_section(analyses, data.num_layers, out)]


def _adapter_analyses(data: StudyData) -> dict[str, list]:
    """analyze_adapter of every trained run of the best finalist and the rectangle seed, by display name;
    finalists without a trained adapter are left out."""
    from mola_search.analysis.adapter import analyze_adapter

    best = data.best_finalist()
    rect = data.finalist_for_seed("rectangle")
    chosen: list[tuple[str, FinalistRecord]] = []
    if best is not None:
        chosen.append((f"best ({best.name})", best))
    if rect is not None and (best is None or rect.label != best.label):
        chosen.append(("rectangle", rect))
    analyses = {}
    for name, fin in chosen:
        found = [analyze_adapter(p) for p in fin.adapters()]
        if found:
            analyses[name] = found
    return analyses


def _redundancy_section(analyses: dict[str, list], L: int, out: Path) -> Section:
    """6. Expert redundancy: pairwise expert distances per layer, averaged over each finalist's seeds."""
    from mola_search.analysis import figures
    from mola_search.analysis.redundancy import QUANTITIES, QUANTITY_LABELS

    red = Section("6. Expert redundancy", anchor="redundancy")
    panels: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, runs in analyses.items():
        kinds = runs[0].kinds()
        panels[name] = {q: {**{k: _mean_runs([r.layer_means(q, k) for r in runs]) for k in kinds},
                            "all": _mean_runs([r.layer_means(q) for r in runs])} for q in QUANTITIES}
    figures.redundancy_over_depth(out / "redundancy.png", panels, L, QUANTITIES, QUANTITY_LABELS)
    red.add(Para("Mean Frobenius distance between every two different experts of a module, per layer (the MoLA "
                 "paper's Figure 3): of the weight updates s·B_iA_i, and of the A and B matrices. Small = "
                 "redundant experts. Averaged over the finalist's training seeds "
                 + ", ".join(f"{n}: {len(r)}" for n, r in analyses.items())
                 + "; layers with one expert have no pair (gap)."),
            Figure("redundancy.png", "Expert redundancy over depth, per module type (thin) and their mean (bold)."))
    head = ["layer", *[f"{n}: experts" for n in panels], *[f"{n}: ΔW dist" for n in panels]]
    rows = []
    for j in range(L):
        rows.append([str(j), *[str(analyses[n][0].config.experts[j]) for n in panels],
                     *[_fmt(panels[n]["delta"]["all"][j], 4) for n in panels]])
    red.add(Table(head, rows))
    return red


def _routing_section(analyses: dict[str, list], L: int, out: Path) -> Section:
    """7. Routing: selection shares of the first routed run, and the load-balance loss per layer."""
    from mola_search.analysis import figures

    rout = Section("7. Routing", anchor="routing")
    routed = {n: [r for r in runs if r.routing is not None] for n, runs in analyses.items()}
    routed = {n: r for n, r in routed.items() if r}
    if not routed:
        rout.add(Para("Not available: the finalist runs have no router_stats.json."))
        return rout
    first_name, first_runs = next(iter(routed.items()))
    figures.routing_heatmaps(out / "routing.png", first_runs[0].routing,
                             f"Routing of {first_name}, first training seed, on the validation split")
    exact = all(r.routing.exact_balance for runs in routed.values() for r in runs)
    balances = {n: _mean_runs([r.routing.balance for r in runs]) for n, runs in routed.items()}
    figures.balance_over_depth(out / "balance.png", balances, exact)
    tokens = first_runs[0].routing.tokens
    rout.add(Para(f"Per layer and expert, the share of top-k selections and the mean routing weight (renormalised "
                  f"top-k gate) on the validation split ({tokens:.0f} tokens), averaged over the layer's "
                  f"{len(first_runs[0].routing.kinds)} module types. Grey cells: the layer has fewer experts."),
             Figure("routing.png", f"Expert selection share and mean routing weight: {first_name}."),
             Figure("balance.png", "Load-balance loss per layer, N·Σ f_i·P_i (f_i selection share, P_i mean router "
                                   "probability), averaged over module types and seeds; 1 = perfectly balanced."))
    full = sorted({j for runs in routed.values() for r in runs for j in range(L)
                   if r.config.top_k[j] >= r.config.experts[j]})
    if full:
        rout.add(Para(f"In layer(s) {', '.join(map(str, full))} top-k equals the expert count: every token uses "
                      "every expert, so the balance loss is 1 and the shares are equal by construction.", "muted"))
    if not exact:
        rout.add(Para("These router stats predate the mean router probability: the balance curve is the proxy "
                      "N·Σ f_i² (the loss with P_i replaced by f_i).", "muted"))
    rows = []
    for j in range(L):
        rows.append([str(j), *[_fmt(balances[n][j], 3) for n in balances],
                     _fmt(max((v for v in first_runs[0].routing.share[j] if v == v), default=math.nan), 3)])
    rout.add(Table(["layer", *[f"{n}: balance loss" for n in balances], f"{first_name}: top expert share"], rows))
    return rout


def _mean_runs(series: Sequence[Sequence[float]]) -> list[float]:
    out = []
    for values in zip(*series):
        finite = [v for v in values if v == v]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _throughput_section(data: StudyData) -> Section:
    """What each phase ran, its hours and peak memory: what the next study can be sized from."""
    from mola_search.search.study.throughput import phase_use, throughput_lines

    handle = StudyFolder(data.folder)
    lines = throughput_lines(phase_use(data.study, handle, handle.read_oneshot(), handle.read_racing()),
                             wall_time_s=(data.best or {}).get("study_wall_time_s"),
                             cpus_per_trial=data.config.cpus_per_trial, gpus_per_trial=data.config.gpus_per_trial)
    s = Section("Throughput", anchor="throughput")
    if not lines:
        return s.add(Para("No run recorded its time or memory."))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    s.add(Table([c.strip() for c in lines[0].strip("|").split("|")], rows))
    for line in lines[2:]:
        if not line.startswith("|"):
            s.add(Para(line.strip()))
    return s


def _provenance_section(data: StudyData, started: float) -> Section:
    from mola_search.search.study.best import provenance

    c = data.config
    s = Section("8. Provenance", anchor="provenance")
    sp = data.space
    space = (f"`{c.space}`" + (f": {sp.encoding}" + (f", {sp.blocks} blocks" if sp.encoding == "blocks" else "")
                               + (f", {sp.knots} knots" if sp.encoding == "profile" else "")
                               + f", experts per layer {sp.min_experts}..{_or(sp.max_experts, 'budget')}, top-k {sp.top_k}"
                               + (" (searched)" if sp.search_top_k else "") + f", rank {sp.rank}"
                               + (" (searched)" if sp.search_rank else "") if sp is not None else " (definition not found)"))
    fidelity = {**(sp.fidelity.to_dict() if sp is not None else {}), **c.fidelity}
    starts = [t.start for t in data.trials if t.start]
    ends = [t.complete for t in data.trials if t.complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    trial_time = sum(t.wall_time_s or 0.0 for t in data.trials)
    fin_time = sum(float(m.get("wall_time_s") or 0.0) for f in data.finalists for m in f.metrics.values())
    nodes = sorted({t.node for t in data.trials if t.node})
    envs = [m.get("environment") for f in data.finalists for m in f.metrics.values() if m.get("environment")]
    recorded = (data.best or {}).get("provenance", {})
    now = provenance()
    versions = recorded.get("versions") or now["versions"]
    rows = [
        ["study", f"`{data.folder}` (Optuna study `{data.name}`)"],
        ["model / task / objective", f"`{c.model}` / `{c.task}` / `{c.objective}`"],
        ["layers / budget", f"{data.num_layers} / {data.budget} experts"],
        ["search space", space],
        ["sampler / scheduler / seed", f"{c.sampler} / {c.scheduler} / {c.seed}"],
        ["trials", f"{c.trials} to train; {data.census_text()}"],
        ["fidelity of a search trial", ", ".join(f"{k}={_or(v)}" for k, v in fidelity.items())],
        ["train settings", ", ".join(f"{k}={v}" for k, v in c.train.items()) or "defaults"],
        ["seeded baselines", ", ".join(c.seed_names)],
        ["finalists", f"top {c.finalist_top_n} searched + seeds, {c.finalist_seeds} training seeds each, "
                      f"train/eval examples {_or(c.finalist_train_examples or fidelity.get('max_train_examples'))}/"
                      f"{_or(c.finalist_eval_examples or fidelity.get('max_eval_examples'))}"],
        ["executor / resources", f"{c.executor}, {c.cpus_per_trial:g} CPU + {c.gpus_per_trial:g} GPU per trial, "
                                 + (f"at most {c.max_concurrent} at once (max_concurrent)" if c.max_concurrent else
                                    "as many at once as the CPUs, GPUs and memory hold (max_concurrent not set)")],
        ["wall time", (f"search {span / 60:.1f} min (first trial start to last finish)" if span is not None else "–")
         + f"; trials {trial_time / 60:.1f} min summed; finalist runs {fin_time / 60:.1f} min summed"],
        ["hardware", (f"nodes {', '.join(nodes)}" if nodes else "nodes unknown")
         + (f"; runs: {envs[0].get('machine')}, {envs[0].get('threads')} threads, torch {envs[0].get('torch')}"
            if envs else "") + (f"; recorded host {recorded.get('host')} ({recorded.get('machine')})"
                                if recorded else "")],
        ["versions (study)", ", ".join(f"{k} {v}" for k, v in versions.items() if v)
         + (f", python {recorded.get('python')}" if recorded.get("python") else "")],
        ["report", f"written {now['written']} on {platform.node()} ({os.cpu_count()} CPUs), python "
                   f"{now['python']}, optuna {now['versions'].get('optuna')}, in {time.time() - started:.1f} s"],
    ]
    s.add(Table(["", ""], rows))
    return s
