"""summary.md: the study's settings and trial counts, then the analysis (or, without one, the noise floor and
the finalists). This module owns the file's layout; `StudyFolder.write_summary` writes it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mola_search.allocation import run_length
from mola_search.search.study.finalist import Finalist
from mola_search.search.study.origin import Origin
from mola_search.search.study.tables import census, census_text, trial_rows

FILES_NOTE = ("Files: `noise.json` (pilot), `trials.csv` (every trial), `finalists.csv`, `best_allocation.json` "
              "(export with `mola-search export`), `study.db` (Optuna storage; `optuna-dashboard sqlite:///study.db`), "
              "`report/` (`mola-search report`).")


def summary_markdown(name: str, config: dict[str, Any], study: Any, finalists: Sequence[Finalist],
                     best: Finalist | None, wall_time_s: float | None, noise: Any = None,
                     analysis: str | None = None, sections: Sequence[str] = ()) -> str:
    """summary.md: the study's settings and trial counts, then `analysis` (Markdown from the report,
    its own title dropped) or, without it, the noise floor, the finalists and `sections` (Markdown lines,
    e.g. the one-shot trust section)."""
    metric = config.get("metric", "accuracy")
    lines = [f"# mola-search study `{name}`", "",
             f"- task **{config.get('task')}**, model **{config.get('model')}**, objective `{config.get('objective')}`, "
             f"metric `{metric}` (validation), budget **{best.spec.budget if best else config.get('budget')}**",
             f"- space `{config.get('space')}`, sampler `{config.get('sampler')}`, pruner `{config.get('scheduler')}`",
             f"- trials: {census_text(census(trial_rows(study), int(config.get('seed') or 0)))}",
             ]
    if wall_time_s is not None:
        lines.append(f"- wall time: {wall_time_s / 60:.1f} min")
    if analysis is not None:
        body = analysis.strip().splitlines()
        while body and not body[0].startswith("## "):  # its own title and subtitle: the lines above say it
            body = body[1:]
        lines += ["", *body, "", FILES_NOTE]
        return "\n".join(lines) + "\n"
    lines += ["", "## Noise floor", ""]
    if noise is not None:
        lines.append(noise.line() + ".")
        lines += ["", "| allocation | " + " | ".join(f"seed {s}" for s in noise.seeds) + " |",
                  "|---|" + "---|" * len(noise.seeds)]
        for name in noise.allocations:
            lines.append(f"| {name} | " + " | ".join(f"{noise.scores[name][s]:.4f}" for s in noise.seeds) + " |")
    else:
        lines.append("Not measured (--no-pilot): nothing here says how much of a score difference is seed noise.")
    if finalists:
        lines += ["", f"## Finalists (fresh seeds; chosen on validation {metric}, test reported once)", "",
                  f"| | origin | allocation | validation {metric} | test {metric} | test accuracy | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for f in sorted(finalists, key=lambda f: -(f.val_mean if f.validation else float("inf"))):
            mark = "**best**" if best is not None and f.label == best.label else ""
            if not f.validation:
                lines.append(f"| | {f.origin} | `{run_length(f.spec.experts)}` | failed: {'; '.join(f.failures)} | | | 0 |")
                continue
            lines.append(f"| {mark} | {f.origin} | `{run_length(f.spec.experts)}` | {f.val_mean:.4f} ± {f.val_std:.4f} "
                         f"| {f.test_mean:.4f} ± {f.test_std:.4f} | {_num(f.test_accuracy_mean)} | {len(f.validation)} |")
        if best is not None:
            lines += ["", f"Best allocation (highest mean validation {metric}): "
                          f"`{','.join(map(str, best.spec.experts))}` ({best.origin}, trial {best.number})."]
            for s in finalists:
                if s.label == best.label or not Origin(s.origin).is_seed or not s.test:
                    continue
                common = [i for i, seed in enumerate(best.seeds) if seed in s.seeds]
                diffs = [best.test[i] - s.test[s.seeds.index(best.seeds[i])] for i in common]
                if diffs:
                    lines.append(f"- vs {Origin(s.origin).name}: {statistics.fmean(diffs):+.4f} test {metric} "
                                 f"(mean of {len(diffs)} seed-paired differences; CIs over examples x seeds in "
                                 "`mola-search report`)")
            if noise is not None and noise.min_detectable_difference == noise.min_detectable_difference:
                lines.append(f"- noise floor: a single seed-paired difference below "
                             f"{noise.min_detectable_difference:.4f} is within seed noise at trial fidelity")
    if sections:
        lines += ["", *sections]
    lines += ["", FILES_NOTE]
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return f"{value:.4f}" if value == value else "–"
