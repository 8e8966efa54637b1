"""`mola-bench`: the paper's comparisons on your model and hardware.

  mola-bench table --tasks mrpc,rte,cola --methods lora,mola:inverted_triangle,mola:rectangle --seeds 3
  mola-bench continual --order mrpc,rte,cola --methods lora,mola:inverted_triangle
  mola-bench continual --task scienceqa --split-field topic --methods lora,mola:inverted_triangle

Every cell is an ordinary mola-train run (same loop, prompts and scoring); the training
flags below apply to every cell. Reruns with the same --out skip finished cells.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from mola_search.cli.common import OneLineParser, run_main
from mola_search.cli.train import config_from_args, lora_rank_arg
from mola_search.errors import UserError
from mola_search.train.run import RunConfig

METHOD_HELP = ("comma list of method specs: lora, lora:<rank>, lora:match, prompt-tuning[:<tokens>], "
               "llama-adapter, full, mola:<shape | digits like 2468 | spec.json>")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON run config with the shared training settings; flags override it")
    p.add_argument("--methods", required=True, help=METHOD_HELP)
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell: --seed, --seed+1, ...")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", help="output folder (default runs/bench-<kind>-<time>); rerun with it to resume")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    g = p.add_argument_group("model and data (all cells)")
    g.add_argument("--model", help="embedded 'smollm2-135m-instruct' (default), tiny-llama, a HF id or a folder")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"])
    g.add_argument("--device", help="auto (CUDA when present, default) | cpu | cuda | cuda:N")
    g.add_argument("--data-dir", dest="data_dir")
    g.add_argument("--max-train-examples", type=int, dest="max_train_examples")
    g.add_argument("--max-eval-examples", type=int, dest="max_eval_examples")
    g.add_argument("--eval-batch-size", type=int, dest="eval_batch_size")
    g.add_argument("--eval-mode", choices=["loglik", "generate"], dest="eval_mode")
    g.add_argument("--threads", type=int)
    a = p.add_argument_group("adapters (all cells)")
    a.add_argument("--shape", help="allocation that lora:match matches (default inverted_triangle)")
    a.add_argument("--allocation", help="allocation spec JSON that lora:match matches")
    a.add_argument("--budget", type=int)
    a.add_argument("--top-k", type=int, dest="top_k")
    a.add_argument("--rank", type=int, help="MoLA expert rank, and the plain 'lora' rank")
    a.add_argument("--min-experts", type=int, dest="min_experts")
    a.add_argument("--max-experts", type=int, dest="max_experts")
    a.add_argument("--lora-alpha", type=float, dest="lora_alpha")
    a.add_argument("--lora-dropout", type=float, dest="lora_dropout")
    a.add_argument("--aux-loss-coef", type=float, dest="aux_loss_coef")
    a.add_argument("--targets", help="comma list of linear module suffixes to adapt")
    a.add_argument("--lora-rank", type=lora_rank_arg, dest="lora_rank", help="rank of plain 'lora' (int or match)")
    a.add_argument("--num-virtual-tokens", type=int, dest="num_virtual_tokens")
    t = p.add_argument_group("training (all cells)")
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int, dest="max_steps")
    t.add_argument("--batch-size", type=int, dest="batch_size")
    t.add_argument("--micro-batch-size", type=int, dest="micro_batch_size")
    t.add_argument("--cutoff-len", type=int, dest="cutoff_len")
    t.add_argument("--warmup-ratio", type=float, dest="warmup_ratio")
    t.add_argument("--weight-decay", type=float, dest="weight_decay")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mola-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    tp = sub.add_parser("table", help="methods x tasks x seeds -> Table 1 (csv, md, html, png)",
                        argument_default=argparse.SUPPRESS, param_flags={"target_modules": "--targets"})
    tp.add_argument("--tasks", required=True, help="comma list of tasks (mrpc, rte, cola, ..., custom:<yaml>)")
    tp.add_argument("--split", default="test", choices=["test", "validation"], help="split the table reports")
    tp.add_argument("--retry-failed", action="store_true", dest="retry_failed", help="rerun cells that diverged")
    _common(tp)
    cp = sub.add_parser("continual", help="train the same adapters on domains in order -> R[t][i], OP, BWT",
                        argument_default=argparse.SUPPRESS,
                        param_flags={"tasks": "--order", "values": "--domains", "min_examples": "--min-domain-examples",
                                 "target_modules": "--targets"})
    cp.add_argument("--order", help="comma list of tasks, trained in this order (one domain per task)")
    cp.add_argument("--task", dest="field_task", help="one task whose examples are split by --split-field")
    cp.add_argument("--split-field", dest="split_field", help="metadata field whose values are the domains (e.g. topic)")
    cp.add_argument("--domains", help="with --split-field: the values to use, in training order")
    cp.add_argument("--min-domain-examples", type=int, default=20, dest="min_domain_examples",
                    help="fewest training and eval examples a domain may have")
    cp.add_argument("--eval-split", default="test", choices=["test", "validation"], dest="eval_split")
    cp.add_argument("--init-from", dest="init_from", help="adapter folder the sequence starts from")
    _common(cp)
    return p


def _config(args: argparse.Namespace) -> RunConfig:
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items()
                               if k not in ("seed", "out", "methods", "seeds", "command")})
    return replace(config_from_args(ns), out=None)


def _get(args: argparse.Namespace, name: str, default=None):
    return getattr(args, name, default)


def main(argv: list[str] | None = None) -> int:
    from mola_search.bench import parse_methods
    from mola_search.bench.table import parse_list

    args = build_parser().parse_args(argv)
    specs = parse_methods(args.methods)
    if _get(args, "seeds", 1) < 1:
        raise UserError("--seeds must be >= 1")
    base_seed = _get(args, "seed", 0)
    seeds = list(range(base_seed, base_seed + _get(args, "seeds", 1)))
    config = _config(args)
    out = Path(_get(args, "out") or f"runs/bench-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = not _get(args, "no_progress", False)
    t0 = time.perf_counter()
    if args.command == "table":
        from mola_search.bench import run_table

        tasks = parse_list(args.tasks, "tasks")
        run_table(config, tasks, specs, seeds, out, progress=progress,
                  retry_failed=_get(args, "retry_failed", False), split=_get(args, "split", "test"))
        print(f"wrote {out}/table.md, table.html, table.csv, cells.csv, table.png "
              f"({time.perf_counter() - t0:.0f} s)")
        print((out / "table.md").read_text())
        return 0
    from mola_search.bench import field_domains, run_continual, task_domains

    order, field_task, split_field = _get(args, "order"), _get(args, "field_task"), _get(args, "split_field")
    minimum = _get(args, "min_domain_examples", 20)
    eval_split = _get(args, "eval_split", "test")
    if order and (field_task or split_field):
        raise UserError("pass either --order task1,task2,... or --task T --split-field F, not both")
    if order:
        domains = task_domains(parse_list(order, "tasks"), config, eval_split=eval_split,
                               min_examples=minimum, seed=base_seed)
    elif field_task and split_field:
        values = parse_list(args.domains, "domains") if _get(args, "domains") else None
        domains = field_domains(field_task, split_field, config, values=values, eval_split=eval_split,
                                min_examples=minimum, seed=base_seed)
    else:
        raise UserError("continual needs domains: --order task1,task2,... or --task T --split-field F")
    run_continual(config, domains, specs, seeds, out, progress=progress, init_from=_get(args, "init_from"))
    print(f"wrote {out}/summary.md, summary.csv, matrices.png and per-run matrices ({time.perf_counter() - t0:.0f} s)")
    print((out / "summary.md").read_text())
    return 0


def entry() -> int:
    return run_main("mola-bench", main)


if __name__ == "__main__":
    raise SystemExit(entry())
