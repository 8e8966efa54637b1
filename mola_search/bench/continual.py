"""`mola-bench continual`: the same adapters trained on domains in order, every seen domain scored after each.

Domains are either an ordered list of tasks (``--order mrpc,rte,cola``) or the values of a
metadata field of one task (``--task scienceqa --split-field topic``, the paper's setting:
that needs the full topic-labelled text-only ScienceQA; the copy in ../shared/data is MoLA's
200-row biology-only sample, which has a single topic and cannot serve).

One model is built (MoLA or a baseline) and kept across domains; each domain gets a fresh
optimizer and schedule (`train`), then every domain i <= t is scored on its eval split:
``R[t][i]``. With T domains:

* OP  = mean_i R[T-1][i]                         (overall performance after the last domain)
* BWT = mean_{i < T-1} (R[T-1][i] - R[i][i])      (backward transfer; negative = forgetting,
                                                   the "performance drop" of earlier domains)

Per method and seed, ``<out>/<method>/seed<k>/`` gets continual.json (matrix, OP, BWT, per-domain
training records), matrix.csv and matrix.png, and the adapter after the last domain; a folder
that already holds continual.json is finished and not rerun. ``<out>`` gets summary.csv,
summary.md and matrices.png (seed-mean matrix per method).
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mola_search.bench.table import MethodSpec, check_manifest, mean_std
from mola_search.errors import UserError
from mola_search.tasks import Example, TaskData
from mola_search.train.run import RunConfig

RESULT = "continual.json"


@dataclass
class Domain:
    name: str
    data: TaskData                 # the task the domain comes from (whole task, not just this domain)
    train: list[Example]
    eval: list[Example]
    majority: float | None = None


# --------------------------------------------------------------------------------------------------
# Arithmetic


def continual_scores(matrix: list[list[float | None]]) -> dict[str, float]:
    """OP and BWT of a lower-triangular accuracy matrix R[t][i] (entries above the diagonal unused)."""
    T = len(matrix)
    if T == 0 or any(len(row) < T for row in matrix):
        raise ValueError("the accuracy matrix must be T x T")
    last = [matrix[T - 1][i] for i in range(T)]
    if any(v is None for v in last) or any(matrix[i][i] is None for i in range(T)):
        raise ValueError("the last row and the diagonal of the accuracy matrix must be filled")
    op = sum(last) / T
    bwt = sum(matrix[T - 1][i] - matrix[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else math.nan
    return {"OP": op, "BWT": bwt}


# --------------------------------------------------------------------------------------------------
# Domains


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)


def _majority(train: list[Example], rows: list[Example]) -> float | None:
    if not train or not rows:
        return None
    counts = Counter(ex.label for ex in train)
    top = min(counts, key=lambda lab: (-counts[lab], lab))
    return sum(ex.label == top for ex in rows) / len(rows)


def task_domains(tasks: list[str], config: RunConfig, *, eval_split: str = "test",
                 min_examples: int = 20, seed: int = 0) -> list[Domain]:
    """One domain per task, in the given order."""
    from mola_search.tasks import load_task

    if len(tasks) < 2:
        raise UserError("continual learning needs at least two domains: pass `tasks` task1,task2[,...]")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"`tasks` lists a task twice: {','.join(tasks)}")
    domains = []
    for task in tasks:
        data = load_task(task, config.data_dir, val_seed=0)
        if data.is_generative:
            raise UserError(f"task '{task}' has no labels to score; continual domains must be classification tasks")
        train = _subsample(data.splits["train"], config.max_train_examples, seed)
        ev = _subsample(data.splits[eval_split], config.max_eval_examples, 0)
        domains.append(Domain(task, data, train, ev, _majority(data.splits["train"], ev)))
    _check_sizes(domains, min_examples)
    return domains


def field_domains(task: str, field_name: str, config: RunConfig, *, values: list[str] | None = None,
                  eval_split: str = "test", min_examples: int = 20, seed: int = 0) -> list[Domain]:
    """Domains = values of `field_name` in the examples' metadata (e.g. ScienceQA's topic)."""
    from mola_search.tasks import load_task

    data = load_task(task, config.data_dir, val_seed=0)
    train_all, eval_all = data.splits["train"], data.splits[eval_split]
    if not any(field_name in ex.meta for ex in train_all):
        seen = sorted({k for ex in train_all for k in ex.meta})
        raise UserError(f"task '{task}' has no field '{field_name}' to split into domains "
                        f"(its examples carry: {', '.join(seen) or 'no metadata'})")
    counts = Counter(str(ex.meta.get(field_name)) for ex in train_all if field_name in ex.meta)
    if values is None:
        values = sorted(counts, key=lambda v: (-counts[v], v))
        if len(values) < 2:
            raise UserError(f"task '{task}' has a single '{field_name}' value ({values[0]!r}, {counts[values[0]]} "
                            f"training examples): continual learning needs at least two domains"
                            + (" (the local scienceqa is MoLA's biology-only sample; the paper's split needs "
                               "the full topic-labelled ScienceQA)" if task.lower() == "scienceqa" else ""))
    else:
        unknown = [v for v in values if v not in counts]
        if unknown:
            raise UserError(f"'{field_name}' value {unknown[0]!r} does not occur in {task}'s training data; values: "
                            + ", ".join(f"{v} ({counts[v]})" for v in sorted(counts, key=lambda v: -counts[v])))
        if len(values) < 2:
            raise UserError("continual learning needs at least two domains: list two or more `values`")
    domains = []
    for value in values:
        tr = [ex for ex in train_all if str(ex.meta.get(field_name)) == value]
        ev = [ex for ex in eval_all if str(ex.meta.get(field_name)) == value]
        domains.append(Domain(value, data, _subsample(tr, config.max_train_examples, seed),
                              _subsample(ev, config.max_eval_examples, 0), _majority(tr, ev)))
    _check_sizes(domains, min_examples, hint=f"; pick domains with `values` (values of '{field_name}')")
    return domains


def _check_sizes(domains: list[Domain], min_examples: int, hint: str = "") -> None:
    for d in domains:
        for what, rows in (("training", d.train), ("evaluation", d.eval)):
            if len(rows) < min_examples:
                raise UserError(f"domain '{d.name}' has only {len(rows)} {what} examples "
                                f"(`min_examples` is {min_examples}){hint}")


# --------------------------------------------------------------------------------------------------
# Running


def run_sequence(config: RunConfig, domains: list[Domain], *, progress: bool = False,
                 init_from: str | None = None, log=print) -> dict[str, Any]:
    """Train one model on `domains` in order; return the matrix, OP/BWT and per-domain records."""
    from mola_search.models import load_base_model
    from mola_search.train.evaluate import evaluate_accuracy
    from mola_search.train.run import build_model, describe, json_safe, prepare
    from mola_search.train.trainer import train

    base = load_base_model(config.model, dtype=config.dtype, device=config.device)
    first = replace(config, task=domains[0].data.name)
    prepared = prepare(first, base=base, data=domains[0].data)
    prepared.splits = {"train": domains[0].train, "validation": [], "test": domains[0].eval}
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    model = build_model(prepared)
    if init_from:
        from mola_search.methods import load_adapter_into
        load_adapter_into(model, init_from)
    info = describe(prepared, model)
    tokenizer = prepared.tokenizer
    T = len(domains)
    matrix: list[list[float | None]] = [[None] * T for _ in range(T)]
    steps = []
    t_start = time.perf_counter()
    for t, domain in enumerate(domains):
        t0 = time.perf_counter()
        result = train(model, tokenizer, domain.train, config.train, progress=progress)
        for i in range(t + 1):
            res = evaluate_accuracy(model, tokenizer, domains[i].eval, batch_size=config.eval_batch_size,
                                    cutoff_len=config.train.cutoff_len)
            matrix[t][i] = res.accuracy
        steps.append({"domain": domain.name, "train_examples": len(domain.train), "train_steps": result.steps,
                      "final_loss": result.loss_curve[-1][1] if result.loss_curve else None,
                      "tokens_per_second": result.tokens_per_second, "wall_time_s": time.perf_counter() - t0})
        log(f"  after {domain.name}: " + ", ".join(f"{domains[i].name} {100 * matrix[t][i]:.1f}"
                                                  for i in range(t + 1)))
    scores = continual_scores(matrix)
    record = {"domains": [d.name for d in domains], "matrix": matrix, **scores,
              "majority": [d.majority for d in domains],
              "eval_sizes": [len(d.eval) for d in domains], "steps": steps,
              "trainable_params": info["trainable_params"], "trainable_percent": info["trainable_percent"],
              "method_info": info.get("method_info"), "allocation": info.get("allocation"),
              "wall_time_s": time.perf_counter() - t_start,
              "config": replace(config, task="continual:" + ",".join(d.name for d in domains)).to_dict()}
    return {"record": json_safe(record), "model": model}


def run_continual(config: RunConfig, domains: list[Domain], specs: list[MethodSpec], seeds: list[int],
                  out: str | Path, *, progress: bool = False, init_from: str | None = None,
                  log=print) -> list[dict[str, Any]]:
    """Each method x seed in its folder (skipped when finished); then summary.csv/.md and matrices.png."""
    from mola_search.bench.plots import matrix_heatmaps

    out = Path(out)
    check_manifest(out, config)
    manifest = json.loads((out / "bench.json").read_text())
    manifest["domains"] = [d.name for d in domains]
    (out / "bench.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    results = []
    for spec in specs:
        for seed in seeds:
            folder = out / spec.slug / f"seed{seed}"
            if (folder / RESULT).is_file():
                record = json.loads((folder / RESULT).read_text())
                if record.get("domains") != [d.name for d in domains]:
                    raise UserError(f"{folder} was run on domains {record.get('domains')}, not "
                                    f"{[d.name for d in domains]}; pass a new `out`")
                log(f"{spec.label} seed {seed}: finished earlier (OP {100 * record['OP']:.1f}, "
                    f"BWT {100 * record['BWT']:+.1f})")
            else:
                log(f"{spec.label} seed {seed}: {' -> '.join(d.name for d in domains)}")
                cfg = replace(spec.apply(config), train=replace(config.train, seed=seed), out=str(folder))
                done = run_sequence(cfg, domains, progress=progress, init_from=init_from, log=log)
                record = {"method": spec.label, "seed": seed, **done["record"]}
                folder.mkdir(parents=True, exist_ok=True)
                done["model"].save_adapter(folder / "adapter", domains=[d.name for d in domains])
                _write_matrix_csv(folder / "matrix.csv", record["domains"], record["matrix"])
                matrix_heatmaps([(f"{spec.label} seed {seed}: OP {100 * record['OP']:.1f}, "
                                  f"BWT {100 * record['BWT']:+.1f}", record["matrix"])],
                                record["domains"], folder / "matrix.png")
                (folder / RESULT).write_text(json.dumps(record, indent=2) + "\n")
                log(f"{spec.label} seed {seed}: OP {100 * record['OP']:.1f}, BWT {100 * record['BWT']:+.1f}")
            results.append({"method": spec.label, "seed": seed, "record": record})
    write_summary(out, results, specs, [d.name for d in domains])
    return results


def _write_matrix_csv(path: Path, domains: list[str], matrix: list[list[float | None]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["after \\ scored"] + domains)
        for name, row in zip(domains, matrix):
            w.writerow([name] + ["" if v is None else v for v in row])


def mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    T = len(matrices[0])
    return [[statistics.fmean(m[t][i] for m in matrices) if matrices[0][t][i] is not None else None
             for i in range(T)] for t in range(T)]


def write_summary(out: Path, results: list[dict[str, Any]], specs: list[MethodSpec], domains: list[str]) -> None:
    from mola_search.bench.plots import matrix_heatmaps

    rows, panels = [], []
    for spec in specs:
        mine = [r["record"] for r in results if r["method"] == spec.label]
        if not mine:
            continue
        op, bwt = mean_std([r["OP"] for r in mine]), mean_std([r["BWT"] for r in mine])
        final = mean_matrix([r["matrix"] for r in mine])
        rows.append({"method": spec.label, "seeds": len(mine), "OP_mean": op["mean"], "OP_std": op["std"],
                     "BWT_mean": bwt["mean"], "BWT_std": bwt["std"],
                     "trainable_params": mine[0].get("trainable_params"),
                     "trainable_percent": mine[0].get("trainable_percent"),
                     **{f"final_{d}": final[-1][i] for i, d in enumerate(domains)},
                     **{f"just_trained_{d}": final[i][i] for i, d in enumerate(domains)}})
        panels.append((f"{spec.label} (n={len(mine)}): OP {100 * op['mean']:.1f}, BWT {100 * bwt['mean']:+.1f}",
                       final))
    if not rows:
        return
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def pm(mean, std, n, sign=""):
        return f"{100 * mean:{sign}.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")

    best_op = max(round(100 * r["OP_mean"], 1) for r in rows)
    best_bwt = max(round(100 * r["BWT_mean"], 1) for r in rows)
    lines = ["| Method | Params (%) | OP | BWT | " + " | ".join(f"{d} (just trained → final)" for d in domains) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(domains)]
    for r in rows:
        op = pm(r["OP_mean"], r["OP_std"], r["seeds"])
        bwt = pm(r["BWT_mean"], r["BWT_std"], r["seeds"], "+")
        op = f"**{op}**" if round(100 * r["OP_mean"], 1) == best_op else op
        bwt = f"**{bwt}**" if round(100 * r["BWT_mean"], 1) == best_bwt else bwt
        pct = r["trainable_percent"]
        cells = [f"{100 * r[f'just_trained_{d}']:.1f} → {100 * r[f'final_{d}']:.1f}" for d in domains]
        lines.append(f"| {r['method']} | {pct:.3f}% | {op} | {bwt} | " + " | ".join(cells) + " |")
    majority = results[0]["record"].get("majority") or []
    if len(majority) == len(domains) and all(m is not None for m in majority):
        # what a model that learned nothing scores: rows equal to it are constant answers, not memory
        lines.append(f"| majority class (scored examples) | — | {100 * statistics.fmean(majority):.1f} | — | "
                     + " | ".join(f"{100 * m:.1f}" for m in majority) + " |")
    lines += ["", "Accuracy (%) on each domain's eval split. OP = mean accuracy over all domains after the last "
              "one; BWT = mean over earlier domains of (final accuracy - accuracy right after training on it); "
              "negative BWT is forgetting. Mean ± sample std over seeds. Order: " + " → ".join(domains) + "."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    matrix_heatmaps(panels, domains, out / "matrices.png")
