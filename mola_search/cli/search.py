"""`mola-search`: find where a model needs its LoRA experts.

    mola-search --budget 160 --task mrpc                 # a study with the defaults
    mola-search --resume runs/<study>                    # continue an interrupted study
    mola-search export runs/<study> --format json        # the best allocation spec
    mola-search report runs/<study>                      # report/index.html: results, layers, routing
    mola-search analyze runs/<study>/finalists/<trial>/seed0/adapter   # redundancy + routing
    mola-search compare runs/a runs/b                    # two studies side by side
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from mola_search.cli.common import OneLineParser, load_config_file, run_main, top_k_arg
from mola_search.errors import ResourceTimeout, UserError

SUBCOMMANDS = ("decide", "export", "convert", "report", "analyze", "compare")

# flag dest -> StudyConfig field (flags absent from the command line leave preset/config values alone)
_STUDY_FLAGS = ("task", "model", "budget", "out", "space", "objective", "trials", "sampler", "seed", "data_dir", "dtype",
                "device",
                "storage", "study_name", "executor", "address", "cpus_per_trial", "gpus_per_trial",
                "max_concurrent", "resource_timeout", "scheduler", "finalist_top_n", "finalist_seeds",
                "finalist_train_examples",
                "finalist_eval_examples", "metric", "pilot", "pilot_seeds", "auto_fidelity", "noise_threshold",
                "time_budget", "strategy", "supernet_factor", "oneshot_trials", "oneshot_eval_examples",
                "oneshot_checks", "final_stage", "min_effect", "max_finalist_runs", "race_min_seeds", "balance_loss",
                "aux_loss_coef")
_FIDELITY_FLAGS = {"max_train_examples": "max_train_examples", "max_eval_examples": "max_eval_examples",
                   "epochs": "epochs", "max_steps": "max_steps"}
_TRAIN_FLAGS = ("lr", "batch_size", "micro_batch_size", "cutoff_len", "activation_checkpointing")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mola-search", description=__doc__.splitlines()[0],
                      epilog="subcommands: decide, export, convert, report, analyze, compare (see `mola-search <subcommand> -h`)",
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML/JSON study settings; flags override them")
    p.add_argument("--resume", metavar="STUDY_DIR", help="continue the study in this folder")
    p.add_argument("--preset", help="cpu-quick (default without a GPU; a demonstration of about 10 min on 2 cores), "
                                    "cpu-standard (longer trials and finalists; docs/strategies.md has its measured "
                                    "limits) or paper")
    for add in (_what_flags, _search_flags, _noise_flags, _fidelity_flags, _resource_flags, _final_flags):
        add(p)
    return p


def _what_flags(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("what to search")
    w.add_argument("--task", help="mrpc | rte | cola | scienceqa | commonsenseqa | openbookqa | custom:task.yaml")
    w.add_argument("--model", help="embedded smollm2-135m-instruct (default), a HF id or a local folder")
    w.add_argument("--budget", type=int, help="total experts over all layers (default 5 x layers)")
    w.add_argument("--space", help="search space: blocks | per_layer | profile or a YAML file")
    w.add_argument("--objective", help="mola (fine-tune and score), python:<module>:<function> (your own, see "
                                       "docs/library.md) or synthetic[:upper|middle|sparse]")
    w.add_argument("--data-dir", dest="data_dir")
    w.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"])
    w.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N for --executor local; under Ray each "
                                    "trial uses the GPU(s) Ray assigns (--gpus-per-trial)")


def _search_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int, help="trials to train (seeds included)")
    s.add_argument("--sampler", help="tpe | cmaes | gp | random")
    s.add_argument("--pruner", "--scheduler", dest="scheduler",
                   help="asha (default) | wilcoxon (paired over validation examples) | none")
    s.add_argument("--strategy", help="standalone (default: every trial a short fine-tune) | one-shot (train one "
                                      "supernet, score --oneshot-trials allocations by masking, check on standalone "
                                      "trials; see docs/strategies.md)")
    s.add_argument("--oneshot-trials", type=int, dest="oneshot_trials",
                   help="one-shot: distinct allocations scored on the supernet (default 200)")
    s.add_argument("--oneshot-checks", type=int, dest="oneshot_checks",
                   help="one-shot: allocations spread over the one-shot ranking also trained standalone (default 6), "
                        "beside the one-shot top --finalists, the router-usage, redundancy and saliency allocations "
                        "and the seeded shapes, which are always checked")
    s.add_argument("--oneshot-eval-examples", type=int, dest="oneshot_eval_examples",
                   help="one-shot: validation examples per masked score (default 256)")
    s.add_argument("--supernet-factor", type=float, dest="supernet_factor",
                   help="one-shot: supernet optimizer steps as a multiple of one trial's (default 4)")
    s.add_argument("--metric", help="what the search maximises on validation: gold_logprob (default; "
                                    "mean log p(gold answer | choices)) | margin | accuracy | f1 | mcc")
    s.add_argument("--seed", type=int)
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the study folder)")
    s.add_argument("--study-name", dest="study_name")
    s.add_argument("--out", help="study folder (default runs/<task name>-b<budget>-<time>)")


def _noise_flags(p: argparse.ArgumentParser) -> None:
    n = p.add_argument_group("noise floor (pilot) and fidelity")
    n.add_argument("--no-pilot", dest="pilot", action="store_false",
                   help="skip the pilot (3 paper shapes x 3 seeds) that measures the noise floor first")
    n.add_argument("--pilot-seeds", type=int, dest="pilot_seeds", help="seeds per pilot allocation (default 3)")
    n.add_argument("--auto-fidelity", dest="auto_fidelity", action="store_true",
                   help="double the trial fidelity until the allocation explains --noise-threshold of the "
                        "score variance (or --time-budget would be exceeded)")
    n.add_argument("--noise-threshold", type=float, dest="noise_threshold",
                   help="allocation share of score variance --auto-fidelity aims for (default 0.5)")
    n.add_argument("--time-budget", type=float, dest="time_budget", help="minutes the whole study may take")


def _fidelity_flags(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fidelity of one trial")
    f.add_argument("--max-train-examples", type=int, dest="max_train_examples")
    f.add_argument("--max-eval-examples", type=int, dest="max_eval_examples")
    f.add_argument("--epochs", type=float)
    f.add_argument("--max-steps", type=int, dest="max_steps")
    f.add_argument("--lr", type=float)
    f.add_argument("--batch-size", type=int, dest="batch_size")
    f.add_argument("--micro-batch-size", type=int, dest="micro_batch_size")
    f.add_argument("--cutoff-len", type=int, dest="cutoff_len")
    f.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing",
                   help="trials recompute each decoder layer in backward: same results, less memory per trial (on by "
                        "default where memory, not cores or GPUs, limits how many trials run at once)")
    f.add_argument("--no-activation-checkpointing", action="store_false", dest="activation_checkpointing",
                   help="never turn activation checkpointing on, even when memory limits the trials at once")
    f.add_argument("--balance-loss", dest="balance_loss",
                   help="per-module (default) | official (GCYZSL/MoLA's: pooled per decoder layer, summed, coefficient "
                        "0.001; docs/official-code.md); mola-official is an alias")
    f.add_argument("--aux-loss-coef", type=float, dest="aux_loss_coef",
                   help="weight of the balance loss (default: 0.01 per-module, 0.001 official)")


def _resource_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("resources")
    r.add_argument("--executor", help="ray (default) | local (in-process, sequential)")
    r.add_argument("--address", help="Ray cluster address, e.g. auto or 10.0.0.1:6379")
    r.add_argument("--cpus-per-trial", type=float, dest="cpus_per_trial")
    r.add_argument("--gpus-per-trial", type=float, dest="gpus_per_trial", help="fractions share a GPU, e.g. 0.25")
    r.add_argument("--max-concurrent", type=int, dest="max_concurrent")
    _resource_timeout_flag(r)


def _resource_timeout_flag(group) -> None:
    group.add_argument("--resource-timeout", type=float, dest="resource_timeout", metavar="MINUTES",
                       help="Ray: while no node can run a trial (a node lost, no free CPUs or GPUs) the study says "
                            "what it waits for every minute, and after this long ends (exit 3) with every finished "
                            "trial kept, for --resume (default 30; 0 = wait forever)")


def _final_flags(p: argparse.ArgumentParser) -> None:
    fi = p.add_argument_group("finalists and the decision")
    fi.add_argument("--finalists", type=int, dest="finalist_top_n",
                    help="contenders beside the paper shapes: the best by search score, whatever their origin")
    fi.add_argument("--finalist-train-examples", type=int, dest="finalist_train_examples")
    fi.add_argument("--finalist-eval-examples", type=int, dest="finalist_eval_examples")
    _decision_flags(fi)
    fi.add_argument("--no-racing", dest="final_stage", action="store_const", const="finalists",
                    help="a fixed block instead of a race: every contender gets --finalist-seeds seeds, one look")
    fi.add_argument("--finalist-seeds", type=int, dest="finalist_seeds",
                    help="--no-racing: seeds per contender (0 = no finalists)")


def _decision_flags(group) -> None:
    group.add_argument("--min-effect", type=float, dest="min_effect",
                       help="the smallest difference of the metric worth telling apart (delta; default 0.01 "
                            "gold_logprob, about 1.3 accuracy points: docs/strategies.md)")
    group.add_argument("--max-finalist-runs", type=int, dest="max_finalist_runs",
                       help="the race's budget of fine-tunes (default: the preset's, else 24)")
    group.add_argument("--race-min-seeds", type=int, dest="race_min_seeds",
                       help="seeds every contender gets before the race's first look (default 2)")


def study_config_from_args(args: argparse.Namespace):
    from mola_search.search.config import apply_preset, default_preset

    given = vars(args)
    raw: dict[str, Any] = load_config_file(given["config"]) if "config" in given else {}
    for key in _STUDY_FLAGS:
        if key in given:
            raw[key] = given[key]
    raw.setdefault("fidelity", {})
    raw.setdefault("train", {})
    for flag, key in _FIDELITY_FLAGS.items():
        if flag in given:
            raw["fidelity"][key] = given[flag]
    for key in _TRAIN_FLAGS:
        if key in given:
            raw["train"][key] = given[key]
    preset = given.get("preset", raw.pop("preset", None))
    if preset is None:
        preset = default_preset() or None
    return apply_preset(preset, raw)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return {"decide": decide_main, "export": export_main, "convert": convert_main, "report": _analysis("report_main"),
                "analyze": _analysis("analyze_main"), "compare": _analysis("compare_main")}[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    from mola_search.search.config import StudyConfig

    if "resume" in args:
        folder = Path(args.resume)
        config = StudyConfig.load(folder)
        # What a resume may change: how much more to search, where to run, and how many fresh seeds the
        # finalists get (finished finalist runs are kept; more seeds add runs, fewer report the first ones).
        extra = {k: v for k, v in vars(args).items() if k in RESUMABLE}
        if extra:
            config = StudyConfig.from_dict({**config.to_dict(), **extra})
            config.save(folder)
        return _run(config, folder, resume=True)
    config = study_config_from_args(args)
    from mola_search.tasks import task_name

    name = config.study_name or f"{_slug(task_name(config.task))}-b{config.budget or 'auto'}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(config.out or f"runs/{name}")
    from mola_search.search.study import StudyFolder

    if StudyFolder(folder).is_study():
        raise UserError(f"{folder} already holds a study; continue it with `mola-search --resume {folder}` "
                        "or choose another --out")
    config = StudyConfig.from_dict({**config.to_dict(), "out": str(folder), "study_name": name})
    return _run(config, folder)


# What a resume may change: how much more to search, where to run, how many fresh seeds a fixed block gets
# (finished runs are kept; more seeds add runs, fewer report the first ones), and the race's question and budget.
RESUMABLE = ("trials", "executor", "address", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "resource_timeout",
             "finalist_seeds", "min_effect", "max_finalist_runs", "time_budget")


def decide_main(argv: list[str]) -> int:
    """`mola-search decide <study>`: continue (or start) the race of an existing study."""
    p = OneLineParser(prog="mola-search decide", argument_default=argparse.SUPPRESS,
                      description="Continue the race of a study until it can say winner, equivalent or undecided: "
                                  "finished finalist runs count as they are (a study made before races included), "
                                  "nothing is trained twice.")
    p.add_argument("study", help="study folder")
    _decision_flags(p)
    p.add_argument("--time-budget", type=float, dest="time_budget", help="minutes, counted from now")
    for flag, dest, kind in (("--executor", "executor", str), ("--address", "address", str),
                             ("--cpus-per-trial", "cpus_per_trial", float), ("--max-concurrent", "max_concurrent", int)):
        p.add_argument(flag, dest=dest, type=kind)
    _resource_timeout_flag(p)
    args = vars(p.parse_args(argv))
    folder = Path(args.pop("study"))
    from mola_search.search.runner import decide_study

    try:
        decide_study(folder, summarize=_summarize, **args)
    except ResourceTimeout as exc:
        raise ResourceTimeout(f"{exc}; finished runs are kept: `mola-search decide {folder}` continues the race "
                              "once a node can run one") from None
    except KeyboardInterrupt:
        print(f"mola-search: interrupted; finished runs are kept: `mola-search decide {folder}` continues the race",
              file=sys.stderr)
        return 130
    return 0


def _run(config, folder: Path, resume: bool = False) -> int:
    from mola_search.search.runner import run_study

    try:
        run_study(config, folder, resume=resume, summarize=_summarize)
    except ResourceTimeout as exc:
        raise ResourceTimeout(f"{exc}; finished trials and runs are kept: `mola-search --resume {folder}` continues "
                              "the study once a node can run a trial") from None
    except KeyboardInterrupt:
        print(f"mola-search: interrupted; finished trials and runs are kept: `mola-search --resume {folder}` "
              "continues the study", file=sys.stderr)
        return 130
    return 0


def _summarize(folder: Path) -> str:
    """summary.md: the report's text (noise floor, paired results, layer headline), without figures."""
    from mola_search.analysis.report import study_summary

    return study_summary(folder)


def export_main(argv: list[str]) -> int:
    p = OneLineParser(prog="mola-search export",
                      description="Print or write a study's exported allocation, or a folder for the official code.")
    p.add_argument("study", help="study folder")
    p.add_argument("--format", choices=["json", "mola-flags", "official"], default="json",
                   help="json (the spec and the decision) | mola-flags (one line for the official mola_training.py) "
                        "| official (a folder: flags, dataset, train.sh, evaluate.sh, NOTES.md; needs --out)")
    p.add_argument("--output", help="json / mola-flags: write here instead of stdout")
    p.add_argument("--out", help="official: the folder to write (must not exist, or be empty)")
    p.add_argument("--model", help="official: what the official scripts load as --base_model (default: the study's)")
    args = p.parse_args(argv)
    from mola_search._io import dumps
    from mola_search.search.study.best import exported_best

    folder = Path(args.study)
    spec, meta = exported_best(folder)
    if args.format == "official":
        return _export_official(folder, spec, args)
    if args.format == "json":
        text = dumps({**spec.to_dict(), **meta})
    else:  # refused (one line, exit 2) when the official code cannot run the study's model
        text = _mola_flags(folder, spec) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _mola_flags(folder: Path, spec) -> str:
    from mola_search.mola.official import official_flags
    from mola_search.search.config import StudyConfig
    from mola_search.train.run import RunConfig

    study = StudyConfig.load(folder)
    # The "mola" objective fine-tunes with RunConfig's adapter settings and the study's balance loss; what another
    # objective trained (a synthetic one: nothing) is not recorded.
    settings = (RunConfig(balance_loss=study.balance_loss, aux_loss_coef=study.aux_loss_coef)
                if study.objective.strip().lower() == "mola" else None)
    flags, notes = official_flags(spec, study.model, settings)
    for note in notes:
        print(f"# note: {note}", file=sys.stderr)
    return flags


def _export_official(folder: Path, spec, args) -> int:
    """A folder the official scripts train and evaluate the exported allocation with, as the study trained it."""
    from mola_search.official.export import write_official_export
    from mola_search.search.context import effective_fidelity
    from mola_search.search.config import StudyConfig
    from mola_search.tasks import load_task

    if not args.out:
        raise UserError("`--format official` writes a folder: pass `out` (a new or empty folder)")
    study = StudyConfig.load(folder)
    settings = {**study.to_dict(), "fidelity": effective_fidelity(folder, study).to_dict()}
    out = write_official_export(spec, settings, load_task(study.task, study.data_dir, val_seed=0).splits, args.out,
                                model=args.model)
    print(f"{out}: train.sh trains {spec.source or 'the exported allocation'} with the official mola_training.py; "
          "NOTES.md lists what does not carry over")
    return 0


def convert_main(argv: list[str]) -> int:
    """`mola-search convert SRC DST`: an official MoLA checkpoint to one of our adapter folders, or back."""
    p = OneLineParser(prog="mola-search convert",
                      description="Convert an official MoLA checkpoint (GCYZSL/MoLA) into an adapter folder, or an "
                                  "adapter folder into the official checkpoint layout (the direction is read from SRC).")
    p.add_argument("source", help="an official checkpoint folder, or one of our adapter folders")
    p.add_argument("target", help="the folder to write")
    p.add_argument("--top-k", dest="top_k", type=top_k_arg,
                   help="official checkpoints do not record top-k: the one it was trained with (default: its "
                        "allocation.json, else 2)")
    p.add_argument("--model", help="our adapter -> official: the base model the checkpoint is for")
    args = p.parse_args(argv)
    from mola_search.mola.official_checkpoint import (convert_adapter_to_official, convert_official_to_adapter,
                                                      is_official_checkpoint)

    if is_official_checkpoint(args.source):
        out = convert_official_to_adapter(args.source, args.target, args.top_k)
        print(f"{out}: an adapter folder (mola-train --init-from, mola-search analyze, MoLAModel.from_pretrained)")
    else:
        out = convert_adapter_to_official(args.source, args.target, base_model=args.model)
        print(f"{out}: an official checkpoint folder (the official evaluation script's --lora_weights)")
    return 0


def _analysis(name: str):
    """A subcommand of mola_search.cli.analysis, imported only when it runs (matplotlib is slow to load)."""
    def run(argv: list[str]) -> int:
        from mola_search.cli import analysis

        return getattr(analysis, name)(argv)
    return run


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40]


def entry() -> int:
    return run_main("mola-search", main)


if __name__ == "__main__":
    raise SystemExit(entry())
