"""A folder that trains and evaluates an allocation with the official MoLA code (GCYZSL/MoLA), as a study did.

`write_official_export(spec, settings, splits, out, model=...)` checks everything first (the model's
architecture and depth, its tokenizer, the training, the examples) and writes nothing when it refuses
(one-line `UserError`). Then, built in a temporary folder beside `out` and renamed to it whole:

    out/
      data/               the study's examples, a Hugging Face DatasetDict (train, validation, test):
                          --data_path of mola_training.py (official_data)
      test.json           the test examples for evaluation_scienceqa.py's --test_dataset
      train.sh            MOLA_REPO=<official checkout> bash train.sh: mola_training.py with the study's
                          training (official_training), then allocation.json copied into the output
      evaluate.sh         evaluation_scienceqa.py with only the flags its argparse accepts
      NOTES.md            every value that does not carry over, this study's and the codes' own
      allocation.json     the allocation (with top-k, which official checkpoints do not record)
      export.json         the flags, notes and sizes, for programs

The official scripts must run from the official checkout (their Prompter reads templates/alpaca.json from
the working directory), so the scripts `cd "$MOLA_REPO"` and name this folder by its own location.
An instruction (generative) task gets no test.json / evaluate.sh: the official evaluation only scores
"The answer is <letter>." answers (NOTES.md says so).

Every JSON file here goes through `mola_search._io.write_json` (the dataset's own files are written by
`datasets`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mola_search._io import atomic_write_text, write_json
from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.mola.official import (OFFICIAL_COMMIT, OFFICIAL_REPO, check_official_model,
                                       official_tokenizer_problem)
from mola_search.official.data import (official_record, study_examples, write_official_dataset,
                                            write_official_test_json)
from mola_search.official.training import OfficialTraining, fire_value, official_train_flags, study_training
from mola_search.tasks import Example

RUN_DIR = "official_run"
SHELL_PATHS = {"data_path": '"$HERE/data"', "output_dir": '"$OUT"'}
EVAL_BATCH_SIZE = 1

ALWAYS_NOTES: tuple[str, ...] = (
    "Prompt: the official Prompter wraps every example in the alpaca template (\"Below is an instruction ... "
    "### Instruction: ... ### Response:\"); the study's prompt is the instruction, and a classification answer "
    "is written \"Answer: The answer is <letter>.\" (with an \"Options: (A) ... (B) ...\" line where the "
    "study's answers were words such as yes/no), as the official ScienceQA data is.",
    "Loss: train_on_inputs False puts the official loss on the whole response (\"Answer: The answer is B.\" "
    "and the EOS token), the study's on the answer token(s) only; official losses are averaged per "
    "micro-batch over its tokens, the study's over all answer tokens of the batch.",
    "Truncation: the official tokenizer cuts at cutoff_len from the right (a long prompt loses its response "
    "and its EOS) and the template adds about 40 tokens; the study cut the prompt from the left to keep "
    "the answer.",
    "Padding: the official collator left-pads with token id 0 (unk) to a multiple of 8, and its rotary "
    "positions count the padding (it passes no position_ids); the study left-padded to a multiple of 16 "
    "(WIDTH_MULTIPLE) with positions restarting at 0 after the padding.",
    "Tokenizer: the official code uses the slow SentencePiece LlamaTokenizer (pad id 0); the study used the "
    "model's fast tokenizer (pad = EOS). Token ids can differ at the edges of the text.",
    "Precision: the official script loads the base model in fp16 and trains under fp16 autocast with loss "
    "scaling (TrainingArguments fp16=True: CUDA only), attention in fp32; the study trained in bf16 on a GPU "
    "or in the model's dtype on a CPU.",
    "Dropout: the official code applies one nn.Dropout per module to each expert's tokens separately (a new "
    "mask per expert); the study drew one mask per adapted input from a keyed pool (DropoutPool), shared by "
    "all experts and by q/k/v and gate/up.",
    "Balance loss: the official one (obalance True) pools the router logits of a decoder layer's modules, "
    "padding included, sums the per-layer losses and is weighted 0.001 (a constant); it is added on cuda:0.",
    "Initialisation and data order: the official script seeds torch with 0, shuffles the data without a "
    "seed (another order every run) and draws experts and routers with kaiming_uniform from the global "
    "generator; the study keyed each expert's initial weights by (seed, layer, module, expert) and shuffled "
    "with its seed, length-sorting within windows of 8 batches.",
    "Scoring: the official code has no scorer for the study's metrics (gold log-prob, margin, log-likelihood "
    "accuracy over the choices). evaluation_scienceqa.py greedy-decodes up to 128 new tokens and counts an "
    "answer right when \"The answer is <letter>.\" occurs exactly once with the gold letter.",
    f"Evaluation: evaluation_scienceqa.py needs CUDA (on a CPU it loads the adapter without number_experts and "
    f"top_k, falling back to its own 26-entry default list), and calls generate without an attention mask, so "
    f"in batches left-padding would be attended: evaluate.sh uses --batch_size {EVAL_BATCH_SIZE}. It reads "
    "lora_r, lora_alpha and lora_dropout from the checkpoint's adapter_config.json and truncates nothing.",
    "Checkpoints: the official output_dir holds adapter_config.json and adapter_model.bin, without top-k; "
    "train.sh copies allocation.json there so mola_search's read_official_checkpoint finds it (mola-train "
    "--init-from, mola-search analyze and convert read that folder). torch >= 2 makes the official script "
    "torch.compile the model; its pinned requirements are torch 1.13.1, transformers 4.28.0, peft 0.4.0, "
    "datasets 2.14.5 (data/ holds plain string and integer columns only, which that version reads).",
)


def write_official_export(spec: AllocationSpec, settings: Mapping[str, Any], splits: Mapping[str, Sequence[Example]],
                          out: str | Path, *, model: str | None = None) -> Path:
    """Write the folder that trains `spec` with the official code as `settings` trained it; returns `out`.

    `settings`: the study's (or run's) settings dict (`official_training` says which keys); `splits`: the
    task's whole splits (`load_task(...).splits`), of which the study's subsets are taken; `model`: what the
    official scripts get as --base_model (default: the settings' model). `out` must not exist or be empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"`out` {out} exists and is not an empty folder: pass a new folder for the export")
    study = study_training(settings)
    model_ref = str(model or study.run.model)
    check_official_model(spec, model_ref, study.run.target_modules)
    problem = official_tokenizer_problem(model_ref)
    if problem:
        raise UserError(f"the official MoLA code cannot load the tokenizer of '{model_ref}': {problem}")
    examples = study_examples(splits, train_examples=study.train_examples, eval_examples=study.eval_examples,
                              seed=study.seed)
    for split_examples in examples.values():
        for example in split_examples:
            official_record(example)  # refuses what the official layout cannot hold, before anything is written
    training = official_train_flags(spec, settings, num_train_examples=len(examples["train"]),
                                    data_path="data", output_dir=RUN_DIR, base_model=model_ref)
    generative = any(ex.is_generative for ex in examples["train"][:1])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_folder(staging, spec, settings, examples, training, generative)
        os.replace(staging, out)  # onto a missing or empty folder: the whole export appears at once
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_folder(folder: Path, spec: AllocationSpec, settings: Mapping[str, Any],
                  examples: Mapping[str, list[Example]], training: OfficialTraining, generative: bool) -> None:
    write_official_dataset(examples, folder / "data")
    write_json(folder / "allocation.json", {**spec.to_dict(), "model": training.flags["base_model"],
                                            "task": settings.get("task")})
    _script(folder / "train.sh", train_script(training.flags))
    evaluation = None if generative else evaluate_flags(training.flags)
    if evaluation is not None:
        write_official_test_json(examples["test"], folder / "test.json")
        _script(folder / "evaluate.sh", evaluate_script(evaluation))
    sizes = {split: len(v) for split, v in examples.items()}
    atomic_write_text(folder / "NOTES.md", notes_markdown(settings, sizes, training.notes, generative))
    write_json(folder / "export.json", {
        "official_repo": OFFICIAL_REPO, "official_commit": OFFICIAL_COMMIT, "allocation": spec.to_dict(),
        "train_flags": training.flags, "evaluate_flags": evaluation, "optimizer_steps": training.steps,
        "examples": sizes, "notes": training.notes, "always_notes": list(ALWAYS_NOTES)})


def _script(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    path.chmod(0o755)


_PREAMBLE = """#!/usr/bin/env bash
# {what} with the official MoLA code ({repo}, read at commit {commit}).
# NOTES.md lists what does not carry over. Needs a CUDA GPU and the official code's environment
# (its requirements.txt). Run from anywhere:  MOLA_REPO=/path/to/MoLA bash {name}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
OUT="${{OUTPUT_DIR:-$HERE/{run}}}"
: "${{MOLA_REPO:?set MOLA_REPO to a checkout of {repo}}}"
cd "$MOLA_REPO"  # the official Prompter reads templates/alpaca.json from the working directory
"""


def train_script(flags: Mapping[str, Any]) -> str:
    """train.sh: mola_training.py with `flags`, then allocation.json copied into the output folder."""
    words = [f"--{name} {SHELL_PATHS.get(name) or shlex.quote(fire_value(value))}" for name, value in flags.items()]
    head = _PREAMBLE.format(what="Trains this allocation as the study trained it", repo=OFFICIAL_REPO,
                            commit=OFFICIAL_COMMIT, name="train.sh", run=RUN_DIR)
    return (head + '"${PYTHON:-python}" mola_training.py \\\n    ' + " \\\n    ".join(words) + "\n"
            + 'cp "$HERE/allocation.json" "$OUT/allocation.json"  # top-k, which the checkpoint does not record\n')


def evaluate_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """evaluation_scienceqa.py's flags (every one its argparse declares, no other) for a training's `flags`."""
    return {"test_dataset": "test.json", "base_model": flags["base_model"], "mola_weights": RUN_DIR,
            "number_experts": flags["number_experts"], "top_k": flags["top_k"],
            "save_path": "official_results.json", "lora_target_modules": flags["lora_target_modules"],
            "batch_size": EVAL_BATCH_SIZE}


def evaluate_script(flags: Mapping[str, Any]) -> str:
    """evaluate.sh: argparse string flags, so lists are plain comma lists (no trailing comma)."""
    shell = {"test_dataset": '"$HERE/test.json"', "mola_weights": '"${MOLA_WEIGHTS:-$OUT}"',
             "save_path": '"$HERE/official_results.json"'}

    def text(value: Any) -> str:
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)

    words = [f"--{name} {shell.get(name) or shlex.quote(text(value))}" for name, value in flags.items()]
    head = _PREAMBLE.format(what="Evaluates the trained allocation (train.sh's output, or $MOLA_WEIGHTS)",
                            repo=OFFICIAL_REPO, commit=OFFICIAL_COMMIT, name="evaluate.sh", run=RUN_DIR)
    return head + 'exec "${PYTHON:-python}" evaluation_scienceqa.py \\\n    ' + " \\\n    ".join(words) + "\n"


def notes_markdown(settings: Mapping[str, Any], sizes: Mapping[str, int], notes: Sequence[str],
                   generative: bool) -> str:
    """NOTES.md: this export's data and notes, then the differences between the two codes."""
    study = study_training(settings)
    lines = ["# What the official MoLA code does not reproduce of this study", "",
             f"Official code: {OFFICIAL_REPO} at commit {OFFICIAL_COMMIT}.", "", "## This export", "",
             f"- Data: {sizes['train']} training examples of `{settings.get('task')}` (drawn with seed "
             f"{study.seed}, as the study's search trials drew them; its finalists drew other subsets with their "
             f"own seeds), {sizes['validation']} validation and {sizes['test']} test examples (seed 0)."]
    if generative:
        lines.append("- Instruction data: no test.json / evaluate.sh, since evaluation_scienceqa.py only scores "
                     "\"The answer is <letter>.\" answers.")
    lines += [f"- {note[0].upper()}{note[1:]}." for note in notes]
    lines += ["", "## Always (the two codes differ)", ""] + [f"- {note}" for note in ALWAYS_NOTES]
    return "\n".join(lines) + "\n"
