"""summary.md: the study's settings and trial counts, then the analysis (or, without one, the noise floor and
the finalists). This module owns the file's layout; `StudyFolder.write_summary` writes it."""

from __future__ import annotations

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
                     analysis: str | None = None, sections: Sequence[str] = (), decision: Any = None,
                     folder: str = "runs/<study>", throughput: Sequence[str] = (),
                     session_s: float | None = None) -> str:
    """summary.md: the study's settings and trial counts, the decision, then `analysis` (Markdown from the report,
    its own title dropped) or, without it, the noise floor, the finalists and `sections` (Markdown lines,
    e.g. the one-shot trust section). `wall_time_s` counts every session of the study; `session_s`, when it
    is less, is the last one's (a resumed or continued study)."""
    lines = _header(name, config, study, best, wall_time_s, session_s) + decision_lines(decision, folder)
    if throughput:
        lines += ["", "## Throughput", "", *throughput]
    if analysis is not None:
        body = analysis.strip().splitlines()
        while body and not body[0].startswith("## "):  # its own title and subtitle: the lines above say it
            body = body[1:]
        body = _drop_section(body, "## Decision")  # said above, from the same record
        return "\n".join([*lines, "", *body, "", FILES_NOTE]) + "\n"
    lines += _noise_lines(noise) + _finalist_lines(finalists, best, config.get("metric", "accuracy"), noise)
    return "\n".join([*lines, *(["", *sections] if sections else []), "", FILES_NOTE]) + "\n"


def _header(name: str, config: dict[str, Any], study: Any, best: Finalist | None, wall: float | None,
            session: float | None = None) -> list[str]:
    metric = config.get("metric", "accuracy")
    lines = [f"# mola-search study `{name}`", "",
             f"- task **{config.get('task')}**, model **{config.get('model')}**, objective `{config.get('objective')}`, "
             f"metric `{metric}` (validation), budget **{best.spec.budget if best else config.get('budget')}**",
             f"- space `{config.get('space')}`, sampler `{config.get('sampler')}`, pruner `{config.get('scheduler')}`",
             f"- trials: {census_text(census(trial_rows(study), int(config.get('seed') or 0)))}"]
    if wall is None and session is not None:
        lines.append(f"- wall time: {session / 60:.1f} min in this session (earlier sessions recorded none)")
    if wall is not None:
        earlier = wall - session if session is not None else 0.0
        lines.append(f"- wall time: {wall / 60:.1f} min" + (f" ({earlier / 60:.1f} min before this session, "
                                                           f"{session / 60:.1f} min in it)" if earlier > 1 else ""))
    return lines


def decision_lines(decision: Any, folder: str) -> list[str]:
    """The decision section (also the report's): the verdict in words, then every contender's race."""
    if decision is None:
        return ["", "## Decision", "", "No finalist was retrained: nothing separates the allocations beyond one "
                "seed's validation score (decision: undecided)."]
    metric = decision.metric
    lines = ["", "## Decision", "", _sentence(decision.words()), "",
             f"Compared on mean validation `{metric}` over shared fresh seeds; δ (`min_effect`) = "
             f"{decision.min_effect:g}, family-wise level {decision.level:g} for the claims (Holm over the pairs at "
             f"each look, {decision.spending_words()}). Test scores chose nothing and are reported once.", "",
             f"| contender | allocation | status | seeds | validation `{metric}` | test `{metric}` | why |",
             "|---|---|---|---|---|---|---|"]
    for e in sorted(decision.contenders, key=lambda e: (e.status != "live", -(e.val_mean if e.validation else -9e9))):
        mark = " **(exported)**" if e.label == decision.chosen else ""
        lines.append(f"| {e.name}{mark} | `{run_length(e.experts)}` | {e.status} | {len(e.validation)} | "
                     f"{_num(e.val_mean)} | {_num(e.test_mean)} | {e.reason or '–'} |")
    lines += ["", f"Next: `{decision.next_command(folder)}`"]
    return lines


def _noise_lines(noise: Any) -> list[str]:
    lines = ["", "## Noise floor", ""]
    if noise is None:
        return lines + ["Not measured (--no-pilot): nothing here says how much of a score difference is seed noise."]
    lines += [noise.line() + ".", "", "| allocation | " + " | ".join(f"seed {s}" for s in noise.seeds) + " |",
              "|---|" + "---|" * len(noise.seeds)]
    for name in noise.allocations:
        lines.append(f"| {name} | " + " | ".join(f"{noise.scores[name][s]:.4f}" for s in noise.seeds) + " |")
    return lines


def _finalist_lines(finalists: Sequence[Finalist], best: Finalist | None, metric: str, noise: Any) -> list[str]:
    if not finalists:
        return []
    lines = ["", f"## Finalists (fresh seeds; decided on validation {metric}, test reported once)", "",
             f"| | origin | allocation | validation {metric} | test {metric} | test accuracy | seeds |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted(finalists, key=lambda f: -(f.val_mean if f.validation else float("inf"))):
        mark = "**exported**" if best is not None and f.label == best.label else ""
        if not f.validation:
            lines.append(f"| | {f.origin} | `{run_length(f.spec.experts)}` | failed: {'; '.join(f.failures)} | | | 0 |")
            continue
        lines.append(f"| {mark} | {f.origin} | `{run_length(f.spec.experts)}` | {f.val_mean:.4f} ± {f.val_std:.4f} "
                     f"| {f.test_mean:.4f} ± {f.test_std:.4f} | {_num(f.test_accuracy_mean)} | {len(f.validation)} |")
    if noise is not None and noise.min_detectable_difference == noise.min_detectable_difference:
        lines.append(f"\nNoise floor: a single seed-paired difference below {noise.min_detectable_difference:.4f} is "
                     "within seed noise at trial fidelity; paired intervals over examples x seeds are in "
                     "`mola-search report`.")
    return lines


def _drop_section(body: list[str], heading: str) -> list[str]:
    if heading not in body:
        return body
    start = body.index(heading)
    end = next((i for i in range(start + 1, len(body)) if body[i].startswith("## ")), len(body))
    return body[:start] + body[end:]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _num(value: float) -> str:
    return f"{value:.4f}" if value == value else "–"
