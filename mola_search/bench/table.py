"""`mola-bench table`: methods x tasks x seeds, one ordinary run folder per cell, and Table 1.

Every cell is a `mola-train` run (same `RunConfig`, loop, prompts and scoring) written to
``<out>/<task>/<method>/seed<k>/``. A cell whose folder holds ``metrics.json`` is finished
and is read back instead of rerun, so an interrupted table resumes where it stopped and a
rerun with more seeds, tasks or methods only runs the new cells. The outputs are rebuilt
from every finished cell each time. Cells score only the split the table reports (``--split``,
default test), which halves the scoring time of a cell:

* ``cells.csv``: one row per cell (accuracies, parameters, speed, folder);
* ``table.csv``: one row per method, mean / sample std (ddof=1) / n of the accuracy per task;
* ``table.md`` / ``table.html``: the paper's Table 1 layout, accuracy in % as mean ± std over
  seeds, best mean per task in bold, trainable parameters as % of the base model, and the
  majority-class accuracy of each task as a reference row;
* ``table.png``: grouped bars with std error bars.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mola_search.errors import UserError
from mola_search.methods import METHODS
from mola_search.train.run import RunConfig
from mola_search.train.trainer import TrainingDiverged

MANIFEST = "bench.json"
# RunConfig keys each cell sets itself; every other key must agree between reruns of one --out.
_PER_CELL = ("task", "method", "shape", "allocation", "lora_rank", "num_virtual_tokens", "out", "threads")


# --------------------------------------------------------------------------------------------------
# Method specs


@dataclass(frozen=True)
class MethodSpec:
    """One column entry of `--methods`: 'lora', 'lora:match', 'mola:inverted_triangle', 'mola:spec.json' ..."""

    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-")

    def apply(self, config: RunConfig) -> RunConfig:
        """The cell's config. A MoLA spec sets the allocation; other methods keep the flags' shape /
        allocation, which `lora:match` matches (default: inverted_triangle at the default budget)."""
        if self.method == "mola":
            config = replace(config, shape=None, allocation=None)
        return replace(config, method=self.method, **self.overrides)


def parse_method(text: str) -> MethodSpec:
    text = text.strip()
    name, _, arg = text.partition(":")
    name, arg = name.strip().lower(), arg.strip()
    if name not in METHODS:
        raise UserError(f"unknown method '{text}': use one of {', '.join(METHODS)} "
                        "(mola:<shape | digits | spec.json>, lora:<rank | match>, prompt-tuning:<tokens>)")
    if name == "mola":
        arg = arg or "inverted_triangle"
        if arg.endswith(".json") or Path(arg).is_file():
            if not Path(arg).is_file():
                raise UserError(f"method '{text}': allocation file {arg} does not exist")
            return MethodSpec(f"mola:{Path(arg).stem}", "mola", {"allocation": arg})
        return MethodSpec(f"mola:{arg}", "mola", {"shape": arg})
    if name == "lora":
        if not arg:
            return MethodSpec("lora", "lora", {})
        if arg.lower() == "match":
            return MethodSpec("lora:match", "lora", {"lora_rank": "match"})
        if arg.isdigit() and int(arg) > 0:
            return MethodSpec(f"lora:{int(arg)}", "lora", {"lora_rank": int(arg)})
        raise UserError(f"method '{text}': lora takes a positive rank or 'match', e.g. lora:16 or lora:match")
    if name == "prompt-tuning":
        if not arg:
            return MethodSpec("prompt-tuning", "prompt-tuning", {})
        if arg.isdigit() and int(arg) > 0:
            return MethodSpec(f"prompt-tuning:{int(arg)}", "prompt-tuning", {"num_virtual_tokens": int(arg)})
        raise UserError(f"method '{text}': prompt-tuning takes a number of virtual tokens, e.g. prompt-tuning:20")
    if arg:
        raise UserError(f"method '{text}': {name} takes no argument")
    return MethodSpec(name, name, {})


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma list of method specs; 'mola:2,4,6,8' (a comma list allocation) stays one spec."""
    pieces: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if piece.isdigit() and pieces and pieces[-1].lower().startswith("mola:"):
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    if not pieces:
        raise UserError(f"no methods given; use e.g. `methods` lora,mola:inverted_triangle (known: {', '.join(METHODS)})")
    specs = [parse_method(p) for p in pieces]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(f"method {dupes[0]} is listed twice")
    return specs


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"no {what} given")
    return items


def preflight(config: RunConfig, specs: list[MethodSpec]) -> None:
    """Check every method against the model before any cell runs (allocations, PEFT support)."""
    from mola_search.methods import adaption_prompt_types
    from mola_search.models import decoder_layers, load_base_model
    from mola_search.train.run import resolve_spec

    base, _ = load_base_model(config.model, dtype=config.dtype, device=config.device)
    layers = len(decoder_layers(base))
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    for spec in specs:
        c = spec.apply(config)
        if spec.method == "mola" or c.lora_rank == "match":
            resolve_spec(replace(c, method="mola"), layers)
        if spec.method == "llama-adapter" and model_type not in adaption_prompt_types():
            raise UserError(f"llama-adapter: PEFT's adaption prompt does not support model type '{model_type}' "
                            f"(it supports {', '.join(adaption_prompt_types())}); drop it from `methods`")


# --------------------------------------------------------------------------------------------------
# Running cells


def run_cell(config: RunConfig, data, *, progress: bool = False) -> dict[str, Any]:
    """Train and score one cell; its folder (config.out) gets the usual run files. Patched in tests."""
    from mola_search.train.run import execute, prepare

    return execute(prepare(config, data=data), progress=progress).metrics


def cell_dir(out: Path, task: str, spec: MethodSpec, seed: int) -> Path:
    return out / task_slug(task) / spec.slug / f"seed{seed}"


def task_slug(task: str) -> str:
    """Folder name of a task: its name, or for custom:/instruct: paths a readable stem + a short hash."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", task):
        return task
    import hashlib

    kind, _, ref = task.partition(":")
    ref_path = Path(ref.strip())
    readable = "-".join(x for x in (kind, ref_path.parent.name, ref_path.stem) if x)
    return f"{_slug(readable)[:40]}-{hashlib.sha1(task.encode()).hexdigest()[:6]}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60]


def check_manifest(out: Path, config: RunConfig) -> None:
    """An --out folder belongs to one set of training settings: refuse to mix cells of two."""
    settings = _comparable(config)
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text()).get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UserError(f"{out} holds cells made with other settings ({', '.join(diff[:5])} differ); "
                            "rerun with the same settings, or pass a new `out`")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings}, indent=2, default=str) + "\n")


def _comparable(config: RunConfig) -> dict[str, Any]:
    d = config.to_dict()
    train = d.pop("train")
    train.pop("seed", None)
    flat = {k: v for k, v in d.items() if k not in _PER_CELL}
    flat.update({f"train.{k}": v for k, v in train.items()})
    return json.loads(json.dumps(flat, default=str))


def run_table(config: RunConfig, tasks: list[str], specs: list[MethodSpec], seeds: list[int], out: str | Path, *,
              progress: bool = False, retry_failed: bool = False, split: str = "test",
              log=print) -> list[dict[str, Any]]:
    """Run every unfinished cell, then write cells.csv, table.csv/.md/.html and table.png; return the cell rows."""
    from mola_search.tasks import load_task

    out = Path(out)
    cells = [(t, s, seed) for t in tasks for s in specs for seed in seeds]
    todo = [c for c in cells if not _finished(cell_dir(out, *c), retry_failed)]
    # every task and method is checked before the output folder exists: bad input leaves no folder behind
    data_cache: dict[str, Any] = {t: load_task(t, config.data_dir, val_seed=0) for t in dict.fromkeys(t for t, _, _ in todo)}
    if todo:
        preflight(config, sorted({s for _, s, _ in todo}, key=specs.index))
    check_manifest(out, config)
    log(f"mola-bench table: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run -> {out}")
    for n, (task, spec, seed) in enumerate(todo, 1):
        folder = cell_dir(out, task, spec, seed)
        if task not in data_cache:
            data_cache[task] = load_task(task, config.data_dir, val_seed=0)
        cell_config = replace(spec.apply(config), task=task, out=str(folder), eval_splits=(split,),
                              train=replace(config.train, seed=seed))  # score only the split the table reports
        t0 = time.perf_counter()
        try:
            metrics = run_cell(cell_config, data_cache[task], progress=progress)
        except TrainingDiverged as exc:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "failed.json").write_text(json.dumps({"reason": str(exc)}) + "\n")
            log(f"[{n}/{len(todo)}] {task} {spec.label} seed {seed}: diverged ({exc})")
            continue
        acc = (metrics.get(split) or {}).get("accuracy")
        log(f"[{n}/{len(todo)}] {task} {spec.label} seed {seed}: {split} accuracy "
            f"{_fmt(acc)} ({time.perf_counter() - t0:.0f} s)")
    rows = collect(out, tasks, specs, seeds, split)
    write_outputs(out, rows, tasks, specs, split, config)
    return rows


def _finished(folder: Path, retry_failed: bool) -> bool:
    return (folder / "metrics.json").is_file() or (not retry_failed and (folder / "failed.json").is_file())


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


# --------------------------------------------------------------------------------------------------
# Collecting and writing


def collect(out: Path, tasks: list[str], specs: list[MethodSpec], seeds: list[int], split: str) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        for spec in specs:
            for seed in seeds:
                folder = cell_dir(out, task, spec, seed)
                row: dict[str, Any] = {"task": task, "method": spec.label, "seed": seed, "folder": str(folder)}
                if (folder / "metrics.json").is_file():
                    m = json.loads((folder / "metrics.json").read_text())
                    row.update(status="ok", validation_acc=(m.get("validation") or {}).get("accuracy"),
                               test_acc=(m.get("test") or {}).get("accuracy"),
                               score=(m.get(split) or {}).get("accuracy"),
                               majority=(m.get(split) or {}).get("majority_baseline"),
                               n_eval=(m.get(split) or {}).get("n"),
                               trainable_params=m.get("trainable_params"),
                               trainable_percent=m.get("trainable_percent"),
                               train_examples=(m.get("split_sizes") or {}).get("train"),
                               train_steps=m.get("train_steps"), tokens_per_second=m.get("tokens_per_second"),
                               wall_time_s=m.get("wall_time_s"))
                elif (folder / "failed.json").is_file():
                    row.update(status="diverged")
                else:
                    row.update(status="missing")
                rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], tasks: list[str], specs: list[MethodSpec]) -> list[dict[str, Any]]:
    """Per method: params, and mean / sample std / n of the score per task, plus the average of task means."""
    summary = []
    for spec in specs:
        mine = [r for r in rows if r["method"] == spec.label]
        params = next((r for r in mine if r.get("trainable_params") is not None), {})
        entry: dict[str, Any] = {"method": spec.label, "trainable_params": params.get("trainable_params"),
                                 "trainable_percent": params.get("trainable_percent"), "tasks": {}}
        for task in tasks:
            scores = [r["score"] for r in mine if r["task"] == task and r.get("score") is not None]
            entry["tasks"][task] = mean_std(scores)
        means = [entry["tasks"][t]["mean"] for t in tasks]
        entry["avg"] = sum(means) / len(means) if means and all(m is not None for m in means) else None
        summary.append(entry)
    return summary


def mean_std(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def majority_by_task(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, float | None]:
    return {t: next((r["majority"] for r in rows if r["task"] == t and r.get("majority") is not None), None)
            for t in tasks}


def write_outputs(out: Path, rows: list[dict[str, Any]], tasks: list[str], specs: list[MethodSpec], split: str,
                  config: RunConfig) -> None:
    from mola_search.bench.plots import table_bars

    fields = ["task", "method", "seed", "status", "validation_acc", "test_acc", "majority", "n_eval",
              "trainable_params", "trainable_percent", "train_examples", "train_steps", "tokens_per_second",
              "wall_time_s", "folder"]
    with open(out / "cells.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows, tasks, specs)
    majority = majority_by_task(rows, tasks)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "trainable_params", "trainable_percent"]
                   + [f"{t}_{k}" for t in tasks for k in ("mean", "std", "n")] + ["avg"])
        for e in summary:
            w.writerow([e["method"], e["trainable_params"], e["trainable_percent"]]
                       + [e["tasks"][t][k] for t in tasks for k in ("mean", "std", "n")] + [e["avg"]])
        w.writerow(["majority class", "", ""] + [v for t in tasks for v in (majority[t], "", "")] + [""])
    header, body, foot = table_cells(summary, tasks, majority)
    caption = (f"Accuracy (%) on the {split} split, mean ± std over seeds (sample std; n per cell in "
               f"table.csv); best mean per task in bold. Model {config.model}; train examples "
               f"{config.max_train_examples or 'all'}, eval examples {config.max_eval_examples or 'all'}, "
               f"{'max_steps ' + str(config.train.max_steps) if config.train.max_steps else str(config.train.epochs) + ' epoch(s)'}, "
               f"lr {config.train.lr}, scoring {config.eval_mode}.")
    (out / "table.md").write_text(markdown_table(header, body, foot, caption))
    (out / "table.html").write_text(html_table(header, body, foot, caption))
    table_bars(summary, tasks, majority, out / "table.png", title=f"{split} accuracy ({config.model})")


def table_cells(summary: list[dict[str, Any]], tasks: list[str], majority: dict[str, float | None]):
    """Header, body rows of (text, bold) cells and a reference row; shared by the Markdown and HTML writers."""
    header = ["Method", "Params (%)"] + tasks + ["Avg"]
    best = {}
    for t in tasks + ["avg"]:
        vals = [_round(e["avg"] if t == "avg" else e["tasks"][t]["mean"]) for e in summary]
        vals = [v for v in vals if v is not None]
        best[t] = max(vals) if vals else None
    body = []
    for e in summary:
        pct = e["trainable_percent"]
        row = [(e["method"], False), (_pct(pct, e["trainable_params"]), False)]
        for t in tasks:
            s = e["tasks"][t]
            text = "—" if s["mean"] is None else (f"{100 * s['mean']:.1f}" if s["n"] < 2 else
                                                  f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}")
            row.append((text, s["mean"] is not None and _round(s["mean"]) == best[t]))
        row.append(("—" if e["avg"] is None else f"{100 * e['avg']:.1f}",
                    e["avg"] is not None and _round(e["avg"]) == best["avg"]))
        body.append(row)
    foot = [("majority class (scored examples)", False), ("—", False)] + [
        ("—" if majority[t] is None else f"{100 * majority[t]:.1f}", False) for t in tasks] + [("", False)]
    return header, body, foot


def _round(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 1)


def _pct(pct: float | None, params: int | None) -> str:
    if pct is None:
        return "—"
    digits = 3 if pct < 1 else 2
    return f"{pct:.{digits}f}% ({_human(params)})"


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def markdown_table(header, body, foot, caption: str) -> str:
    def cell(text, bold):
        return f"**{text}**" if bold else text
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in body + [foot]:
        lines.append("| " + " | ".join(cell(t, b) for t, b in row) + " |")
    return "\n".join(lines) + f"\n\n{caption}\n"


def html_table(header, body, foot, caption: str) -> str:
    def cell(text, bold, tag="td"):
        text = html.escape(text)
        return f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>"
    rows = ["<tr>" + "".join(cell(h, False, "th") for h in header) + "</tr>"]
    rows += ["<tr>" + "".join(cell(t, b) for t, b in row) + "</tr>" for row in body]
    rows.append("<tr class=\"ref\">" + "".join(cell(t, b) for t, b in foot) + "</tr>")
    style = ("table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #999;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}tr.ref{color:#666;font-style:italic}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><style>{style}</style></head><body>\n"
            f"<table>\n<caption>{html.escape(caption)}</caption>\n" + "\n".join(rows) + "\n</table>\n</body></html>\n")
