"""`mola-train`: one MoLA (or baseline) fine-tuning run from the command line.

Flags map one-to-one onto `RunConfig`; `--config run.yaml` supplies defaults
that flags override, so a run is reproducible from its metrics.json "config".
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mola_search.cli.common import OneLineParser, load_config_file, run_main
from mola_search.errors import UserError
from mola_search.mola.config import BALANCE_LOSS_NAMES
from mola_search.train.run import RunConfig, describe, build_model, execute, prepare
from mola_search.train.trainer import TrainingDiverged

# flag dest -> (RunConfig or TrainConfig field)
_RUN_FLAGS = ("task", "model", "dtype", "device", "data_dir", "method", "shape", "allocation", "budget", "top_k", "rank",
              "min_experts", "max_experts", "lora_alpha", "lora_dropout", "aux_loss_coef", "balance_loss",
              "max_train_examples", "max_eval_examples", "eval_batch_size", "eval_mode", "out", "threads", "lora_rank",
              "num_virtual_tokens")
_TRAIN_FLAGS = ("lr", "epochs", "max_steps", "batch_size", "micro_batch_size", "cutoff_len", "warmup_ratio",
                "weight_decay", "seed", "activation_checkpointing")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mola-train", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS,
                      param_flags={"target_modules": "--targets"})
    p.add_argument("--config", help="YAML/JSON run config; flags override its keys")
    g = p.add_argument_group("what to train")
    g.add_argument("--task", help="mrpc | rte | cola | scienceqa | commonsenseqa | openbookqa | custom:task.yaml | instruct:<path>")
    g.add_argument("--model", help="embedded 'smollm2-135m-instruct' (default), a HF model id or a local folder")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], help="base weight dtype (adapters stay fp32)")
    g.add_argument("--device", help="auto (CUDA when present, default) | cpu | cuda | cuda:N")
    g.add_argument("--data-dir", help="folder with <task>/<split>.jsonl (default: $MOLA_DATA_DIR, else the Hub)")
    g.add_argument("--method", help="mola (default) or a baseline: lora, prompt-tuning, llama-adapter, full")
    g.add_argument("--init-from", help="adapter folder to start from (two-stage training): a mola_search "
                                       "adapter or an official MoLA checkpoint (adapter_model.bin)")
    a = p.add_argument_group("allocation")
    a.add_argument("--shape", help="triangle | inverted_triangle | hourglass | rectangle | diamond, digits like 2468, or a comma list")
    a.add_argument("--allocation", help="allocation spec JSON (e.g. a study's best_allocation.json)")
    a.add_argument("--budget", type=int, help="total experts over all layers (default 5 x layers)")
    a.add_argument("--top-k", type=int, dest="top_k")
    a.add_argument("--rank", type=int)
    a.add_argument("--min-experts", type=int, dest="min_experts")
    a.add_argument("--max-experts", type=int, dest="max_experts")
    a.add_argument("--lora-alpha", type=float, dest="lora_alpha")
    a.add_argument("--lora-dropout", type=float, dest="lora_dropout")
    a.add_argument("--aux-loss-coef", type=float, dest="aux_loss_coef",
                   help="load-balancing loss weight (default: 0.01 for per-module, 0.001 for official, "
                        "the official MoLA code's)")
    a.add_argument("--balance-loss", choices=BALANCE_LOSS_NAMES, dest="balance_loss",
                   help="per-module: one loss per adapted linear, averaged, padding excluded (default); "
                        "official (or its former name mola-official): GCYZSL/MoLA's, pooled per decoder "
                        "layer and summed over layers")
    a.add_argument("--targets", help="comma list of linear module suffixes to adapt")
    b = p.add_argument_group("baselines")
    b.add_argument("--lora-rank", type=lora_rank_arg, dest="lora_rank",
                   help="--method lora: an integer, or 'match' for MoLA's trainable count (default: --rank)")
    b.add_argument("--num-virtual-tokens", type=int, dest="num_virtual_tokens",
                   help="--method prompt-tuning: virtual tokens (default 20)")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int, dest="max_steps",
                   help="optimizer steps (overrides --epochs); 0 only evaluates, e.g. an --init-from adapter")
    t.add_argument("--batch-size", type=int, dest="batch_size", help="effective batch size")
    t.add_argument("--micro-batch-size", type=int, dest="micro_batch_size")
    t.add_argument("--cutoff-len", type=int, dest="cutoff_len")
    t.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing",
                   help="recompute each decoder layer in backward: same results, less memory, ~1 forward more")
    t.add_argument("--warmup-ratio", type=float, dest="warmup_ratio")
    t.add_argument("--weight-decay", type=float, dest="weight_decay")
    t.add_argument("--seed", type=int)
    t.add_argument("--max-train-examples", type=int, dest="max_train_examples")
    t.add_argument("--max-eval-examples", type=int, dest="max_eval_examples")
    t.add_argument("--eval-batch-size", type=int, dest="eval_batch_size")
    t.add_argument("--eval-mode", choices=["loglik", "generate"], dest="eval_mode")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="run folder (default runs/<task>-<shape>-<time>)")
    o.add_argument("--dry-run", action="store_true", dest="dry_run", help="resolve everything, print, exit")
    o.add_argument("--no-progress", action="store_true", dest="no_progress")
    return p


def lora_rank_arg(text: str) -> int | str:
    text = text.strip().lower()
    if text == "match":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"'{text}' is neither a positive integer nor 'match'")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    raw: dict[str, Any] = load_config_file(args.config) if "config" in args else {}
    given = vars(args)
    for key in _RUN_FLAGS:
        if key in given:
            raw[key] = given[key]
    if "targets" in given:
        raw["target_modules"] = [s.strip() for s in given["targets"].split(",") if s.strip()]
    train_raw = raw.pop("train", {}) or {}
    if not isinstance(train_raw, dict):
        raise UserError(f"config key 'train' must be a mapping of training settings, got {train_raw!r}")
    train_raw = dict(train_raw)
    for key in _TRAIN_FLAGS:
        if key in given:
            raw.pop(key, None)  # else the config's flat key (e.g. `seed: 5`) would beat the flag
            train_raw[key] = given[key]
    config = RunConfig.from_dict({**raw, "train": train_raw})
    if config.out is None:
        config = replace(config, out=f"runs/{_slug(config.task)}-{_slug(_run_tag(config))}-{time.strftime('%Y%m%d-%H%M%S')}")
    return config


def _run_tag(config: RunConfig) -> str:
    if config.method != "mola":
        return config.method
    if config.allocation:
        return Path(config.allocation).stem
    return config.shape or "inverted_triangle"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    _quiet_library_progress()
    prepared = prepare(config)
    if getattr(args, "dry_run", False):
        info = describe(prepared, build_model(prepared))
        _print_dry_run(info, config)
        return 0
    try:
        outcome = execute(prepared, progress=not getattr(args, "no_progress", False),
                          init_from=getattr(args, "init_from", None))
    except TrainingDiverged as exc:
        raise UserError(f"training diverged: {exc}; lower --lr (now {config.train.lr:g}) or check the data") from None
    m = outcome.metrics
    brief = {split: {k: v for k, v in m[split].items() if k != "per_example"} if m.get(split) else None
             for split in ("validation", "test")}  # per-example scores stay in metrics.json
    print(json.dumps({"out": config.out, "validation": brief["validation"], "test": brief["test"],
                      "trainable_params": m["trainable_params"], "tokens_per_second": round(m["tokens_per_second"], 1),
                      "wall_time_s": round(m["wall_time_s"], 1)}, indent=2))
    return 0


def _quiet_library_progress() -> None:
    """No "Loading weights" bar from transformers and no Hub retry chatter ("Retrying in 1s ...", which an
    unreachable Hub prints for an unknown model or missing data): both would put lines before a
    one-line error on stderr."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _print_dry_run(info: dict[str, Any], config: RunConfig) -> None:
    lines = [f"model:            {info['model']} ({info['num_layers']} layers)",
             f"task:             {info['task']}  (data: {info['data_source']})",
             f"method:           {info['method']}"]
    if info["allocation"] is not None:
        from mola_search.allocation import default_max_experts

        note = ""
        if not config.allocation:  # a shape: say the bounds it was scaled within
            top = config.max_experts or default_max_experts(info["num_layers"], info["budget"])
            note = (f"; a shape is scaled within {config.min_experts}..{top if top is not None else 'budget'} per "
                    "layer, as in mola-search's built-in spaces")
        lines += [f"allocation:       {','.join(map(str, info['allocation']))}  (budget {info['budget']}{note})",
                  f"top_k:            {','.join(map(str, info['top_k']))}",
                  f"rank:             {','.join(map(str, info['rank']))}"]
    lines += [f"trainable params: {info['trainable_params']:,} ({info['trainable_percent']:.3f}% of base {info['base_params']:,})",
              "splits:           " + ", ".join(f"{k} {v}" for k, v in info["split_sizes"].items())]
    lines += [f"  note: {n}" for n in info["split_notes"]]
    lines += [f"out:              {config.out}"]
    print("\n".join(lines))


def entry() -> int:
    return run_main("mola-train", main)


if __name__ == "__main__":
    raise SystemExit(entry())
