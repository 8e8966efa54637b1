"""The export for the official MoLA code: training flags from a study's settings, the dataset layout, the
scripts, and the refusals (which write nothing).

Official formats as read at GCYZSL/MoLA commit 01785c84c70846999638b11b88409fdf86361d9a; the fixtures
(tests/fixtures/official_train_signature.py: train()'s signature and the evaluation's argparse flags;
official_alpaca_template.json: its templates/alpaca.json) are what the tests compare against. Nothing is
fetched at run time; fire 0.5.0 (the official pin) is the `test` extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.official.data import (OFFICIAL_TEMPLATE, example_from_record, official_record, official_text,
                                            read_official_dataset, study_examples, write_official_dataset)
from mola_search.official.export import write_official_export
from mola_search.official.training import (epochs_for_steps, fire_argv, official_steps, official_train_flags,
                                                study_training)
from mola_search.tasks import Example

FIXTURES = Path(__file__).parent / "fixtures"
fire = pytest.importorskip("fire", reason="fire==0.5.0 (the official code's pin) is in the `test` extra")


def _fixture():
    spec = importlib.util.spec_from_file_location("official_train_signature", FIXTURES / "official_train_signature.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFICIAL = _fixture()
SPEC = AllocationSpec.build([2, 3, 4, 5], top_k=[1, 2, 2, 3], rank=[4, 8, 8, 16])
FIDELITY = {"max_train_examples": 100, "max_eval_examples": 50, "epochs": 1.0, "max_steps": None,
            "rungs": [0.5, 1.0]}


def study(**overrides):
    """A study.json-like settings dict (with the effective fidelity)."""
    return {"model": "my/llama", "task": "mrpc", "seed": 3, "fidelity": dict(FIDELITY),
            "train": {"batch_size": 16, "micro_batch_size": 6, "lr": 1e-3, "cutoff_len": 128}, **overrides}


def flags_for(settings, n=100, spec=SPEC):
    return official_train_flags(spec, settings, num_train_examples=n, data_path="/x/data", output_dir="/x/run")


# --- training flags ------------------------------------------------------------------------------


def test_a_study_s_training_becomes_the_official_flags():
    settings = study(balance_loss="official", lora_alpha=32, target_modules=["q_proj", "v_proj", "qkv_proj"])
    result = flags_for(settings)
    f = result.flags
    assert list(f) == [n for n in OFFICIAL.train.__code__.co_varnames[:OFFICIAL.train.__code__.co_argcount]
                       if n in f]  # the official parameter order
    assert (f["base_model"], f["batch_size"], f["learning_rate"], f["cutoff_len"]) == ("my/llama", 16, 1e-3, 128)
    assert f["micro_batch_size"] == 4  # the largest divisor of 16 up to 6: 16 // 6 would train on 12 per step
    assert (f["lora_alpha"], f["lora_dropout"], f["lora_target_modules"]) == (32.0, 0.05, ["q_proj", "v_proj"])
    assert (f["number_experts"], f["top_k"], f["lora_r"]) == ([2, 3, 4, 5], [1, 2, 2, 3], [4, 8, 8, 16])
    assert (f["obalance"], f["val_set_size"], f["train_on_inputs"], f["add_eos_token"]) == (True, 0, False, True)
    # 100 examples, batches of 16: the study took 7 steps; the official Trainer counts 25 micro-batches // 4 = 6
    # steps per epoch, so num_epochs 7/6 makes it take the same 7
    assert result.steps == 7 and f["num_epochs"] == pytest.approx(7 / 6)
    assert official_steps(f["num_epochs"], 100, 16, 4) == 7
    notes = " | ".join(result.notes)
    assert "micro_batch_size 4 instead of the study's 6" in notes and "num_epochs" in notes
    assert "goes from 0 to only 6% of learning_rate" in notes  # 100 official warmup steps, the study's 0 of 7
    assert "balance" not in notes  # official formulation at the official 0.001: exact


def test_max_steps_trials_carry_over_exactly_through_a_float_num_epochs():
    result = flags_for(study(fidelity={**FIDELITY, "max_train_examples": 64, "max_steps": 10},
                             train={"batch_size": 8, "micro_batch_size": 8}), n=64)
    assert result.steps == 10 and result.flags["num_epochs"] == 1.25
    assert any("10 optimizer steps (max_steps)" in n for n in result.notes)
    for n in (1, 7, 37, 100, 1000):
        for batch, micro in ((1, 1), (8, 8), (16, 4), (12, 5), (128, 8)):
            for steps in (1, 3, 10, 99, 1234):
                micro_ok = max(d for d in range(1, min(batch, micro) + 1) if batch % d == 0)
                epochs = epochs_for_steps(steps, n, batch, micro_ok)
                assert official_steps(epochs, n, batch, micro_ok) == steps
                assert official_steps(float(repr(epochs)), n, batch, micro_ok) == steps  # as fire reads it back


def test_balance_loss_per_case():
    per_module = flags_for(study())
    assert per_module.flags["obalance"] is False
    assert any("per-module balance loss (coefficient 0.01)" in n for n in per_module.notes)
    weighted = flags_for(study(train={"balance_loss": "mola-official", "aux_loss_coef": 0.01}))  # inside train too
    assert weighted.flags["obalance"] is True and any("weighted 0.01" in n for n in weighted.notes)
    off = flags_for(study(aux_loss_coef=0))
    assert off.flags["obalance"] is False and not any("balance" in n for n in off.notes)


@pytest.mark.parametrize("settings, needle", [
    (study(method="lora"), r"^`method` is 'lora'"),
    (study(fidelity={**FIDELITY, "max_steps": None}, train={"max_steps": 0}), r"^`max_steps` is 0"),
    (study(target_modules=["lm_head"]), r"^`target_modules` \['lm_head'\] holds none"),
    (study(fidelity={"epochs": 1.0}), r"^`fidelity` lacks max_train_examples, max_eval_examples"),
    (study(train={"learning_rate": 1}), r"unknown run config keys \['learning_rate'\]"),
])
def test_training_that_cannot_be_expressed_is_refused_in_one_line(settings, needle):
    with pytest.raises(UserError, match=needle) as error:
        flags_for(settings)
    assert "\n" not in str(error.value)


def test_a_run_config_is_settings_too():
    from mola_search.train.run import RunConfig

    settings = RunConfig(max_train_examples=32, balance_loss="official").to_dict()
    training = study_training(settings)
    assert (training.train_examples, training.seed, training.run.aux_loss_coef) == (32, 0, 0.001)
    assert flags_for(settings, n=32).flags["obalance"] is True


# --- fire and argparse -----------------------------------------------------------------------------


def parsed_by_fire(argv):
    return fire.Fire(OFFICIAL.train, command=list(argv))


@pytest.mark.parametrize("spec, targets", [
    (SPEC, ["q_proj", "k_proj", "down_proj"]),
    (AllocationSpec.build([3], top_k=[2], rank=[8]), ["v_proj"]),  # one layer, one module: still lists
])
def test_the_flags_parse_under_fire_into_the_official_per_layer_lists(spec, targets):
    result = flags_for(study(target_modules=targets), spec=spec)
    got = parsed_by_fire(fire_argv(result.flags))
    assert OFFICIAL.per_layer_lists(got) == {"lora_r": list(spec.rank), "number_experts": list(spec.experts),
                                             "top_k": list(spec.top_k), "lora_target_modules": targets}
    for name in ("batch_size", "micro_batch_size", "num_epochs", "learning_rate", "cutoff_len", "val_set_size",
                 "lora_alpha", "lora_dropout", "base_model", "data_path", "output_dir", "prompt_template_name"):
        assert got[name] == result.flags[name], name
    for name in ("obalance", "train_on_inputs", "add_eos_token", "group_by_length", "resume_from_checkpoint"):
        assert got[name] is result.flags[name], name


@pytest.mark.parametrize("text", ["123", "True", "a,b", "my model", "1e-3", "(x)", "org/Llama-2-7b-hf", "/m/llama"])
def test_text_values_reach_train_as_the_same_text(text):
    settings = study(model=text)
    got = parsed_by_fire(fire_argv(flags_for(settings).flags))
    assert got["base_model"] == text


# --- the dataset ----------------------------------------------------------------------------------

YES_NO = Example("Are these the same?\nSentence 1: a\nSentence 2: b\nAnswer:", (" no", " yes"), 1)
LETTERS = Example("Pick one.\nQuestion: 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:", (" A", " B", " C"), 1)
FREE = Example("Write a haiku about rain.", (), -1, target="Rain taps the window.")


def official_prompter(template, instruction, input=None, label=None):
    """What the official Prompter.generate_prompt returns (utils/prompter.py), re-stated for the test."""
    text = (template["prompt_input"].format(instruction=instruction, input=input) if input
            else template["prompt_no_input"].format(instruction=instruction))
    return f"{text}{label}" if label else text


def test_the_rendering_is_the_official_template_with_official_answers():
    template = json.loads((FIXTURES / "official_alpaca_template.json").read_text())
    assert {k: template[k] for k in OFFICIAL_TEMPLATE} == OFFICIAL_TEMPLATE
    yes_no = official_record(YES_NO)
    assert (yes_no["instruction"], yes_no["input"], yes_no["output"], yes_no["answer"]) == (
        "Are these the same?\nSentence 1: a\nSentence 2: b\nOptions: (A) no (B) yes", "",
        "Answer: The answer is B.", "B")
    assert official_text(yes_no) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAre these the same?\nSentence 1: a\nSentence 2: b\nOptions: (A) no (B) yes"
        "\n\n### Response:\nAnswer: The answer is B.")
    letters = official_record(LETTERS)  # the options are already letters: no Options line
    assert letters["instruction"] == "Pick one.\nQuestion: 2+2?\nA. 3\nB. 4\nC. 5" and letters["answer"] == "B"
    free = official_record(FREE)
    assert (free["instruction"], free["output"], free["answer"]) == (FREE.prompt, FREE.target, "")
    for record in (yes_no, letters, free):
        assert official_text(record) == official_prompter(template, record["instruction"], record["input"],
                                                          record["output"])
        assert official_text(record, with_output=False) == official_prompter(template, record["instruction"])
        assert example_from_record(record) in (YES_NO, LETTERS, FREE)
    with pytest.raises(UserError, match="27 choices"):
        official_record(Example("?", tuple(f" c{i}" for i in range(27)), 0))


def test_the_dataset_round_trips_through_load_from_disk(tmp_path):
    import datasets

    splits = {"train": [YES_NO, LETTERS, FREE, YES_NO], "validation": [LETTERS], "test": []}
    write_official_dataset(splits, tmp_path / "data")
    loaded = datasets.load_from_disk(str(tmp_path / "data"))  # what mola_training.py calls on data_path
    assert list(loaded) == ["train", "validation"]  # an empty split is left out: datasets cannot load one back
    assert loaded["train"].column_names[:4] == ["instruction", "input", "output", "answer"]
    rendered = [official_text(official_record(e)) for e in splits["train"]]
    assert [official_text(row) for row in loaded["train"]] == rendered
    assert read_official_dataset(tmp_path / "data") == splits
    info = json.loads((tmp_path / "data" / "train" / "dataset_info.json").read_text())
    assert {f["_type"] for f in info["features"].values()} == {"Value"}  # nothing datasets 2.14.5 cannot read


def test_study_examples_are_the_subsets_the_study_used():
    from mola_search.train.run import _subsample

    pool = [Example(f"q{i}\nAnswer:", (" no", " yes"), i % 2) for i in range(40)]
    chosen = study_examples({"train": pool, "validation": pool, "test": pool[:5]}, train_examples=10,
                            eval_examples=8, seed=3)
    assert chosen["train"] == _subsample(pool, 10, 3) and chosen["validation"] == _subsample(pool, 8, 0)
    assert chosen["test"] == pool[:5]


# --- the export folder ----------------------------------------------------------------------------


def model_folder(path, tokenizer=True, **config):
    from transformers import LlamaConfig

    LlamaConfig(**{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "vocab_size": 100, **config}).save_pretrained(path)
    if tokenizer:
        (path / "tokenizer.model").write_bytes(b"sentencepiece model stand-in")  # only its presence is checked
    return str(path)


def splits_of(*examples, n=12):
    return {"train": [examples[i % len(examples)] for i in range(n)], "validation": list(examples),
            "test": list(examples)}


def run_script(script: Path, tmp_path: Path, dumper: str) -> dict:
    """Run an exported script under bash with PYTHON pointing at a stand-in that records what the official
    script would receive (parsed by fire / argparse from the fixtures)."""
    stand_in = tmp_path / f"python-{script.stem}"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'dump.py'} \"$@\"\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "dump.py").write_text(
        "import importlib.util, json, os, sys\n"
        f"s = importlib.util.spec_from_file_location('f', {str(FIXTURES / 'official_train_signature.py')!r})\n"
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n" + dumper)
    repo = tmp_path / "MoLA"
    repo.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": str(stand_in), "MOLA_REPO": str(repo), "OUTPUT_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads((repo / "received.json").read_text())


TRAIN_DUMP = ("import fire\nassert sys.argv[1] == 'mola_training.py' and os.getcwd() == os.environ['MOLA_REPO']\n"
              "got = fire.Fire(m.train, command=sys.argv[2:])\nos.makedirs(got['output_dir'], exist_ok=True)\n"
              "json.dump({**got, **m.per_layer_lists(got)}, open('received.json', 'w'))\n")
EVAL_DUMP = ("assert sys.argv[1] == 'evaluation_scienceqa.py'\n"
             "json.dump(vars(m.evaluation_parser().parse_args(sys.argv[2:])), open('received.json', 'w'))\n")


@pytest.mark.slow
def test_the_export_folder_trains_and_evaluates_with_the_study_s_flags(tmp_path):
    import datasets

    model = model_folder(tmp_path / "llama")
    settings = study(model=model, balance_loss="official", fidelity={**FIDELITY, "max_train_examples": 10})
    out = write_official_export(SPEC, settings, splits_of(YES_NO, LETTERS), tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["NOTES.md", "allocation.json", "data", "evaluate.sh", "export.json", "test.json", "train.sh"]
    assert os.access(out / "train.sh", os.X_OK) and os.access(out / "evaluate.sh", os.X_OK)
    trained = run_script(out / "train.sh", tmp_path, TRAIN_DUMP)
    assert (trained["data_path"], trained["output_dir"]) == (str(out / "data"), str(tmp_path / "run"))
    assert [trained[k] for k in ("number_experts", "top_k", "lora_r")] == [[2, 3, 4, 5], [1, 2, 2, 3], [4, 8, 8, 16]]
    assert trained["obalance"] is True and trained["base_model"] == model and trained["batch_size"] == 16
    assert len(datasets.load_from_disk(trained["data_path"])["train"]) == 10
    assert json.loads((tmp_path / "run" / "allocation.json").read_text())["top_k"] == [1, 2, 2, 3]
    evaluated = run_script(out / "evaluate.sh", tmp_path, EVAL_DUMP)
    assert evaluated == {"test_dataset": str(out / "test.json"), "base_model": model,
                         "mola_weights": str(tmp_path / "run"), "number_experts": "2,3,4,5", "top_k": "1,2,2,3",
                         "save_path": str(out / "official_results.json"),
                         "lora_target_modules": "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
                         "batch_size": 1}
    test = json.loads((out / "test.json").read_text())
    assert [r["answer"] for r in test] == ["B", "B"] and set(test[0]) == {"instruction", "input", "output", "answer"}
    exported = json.loads((out / "export.json").read_text())
    assert exported["official_commit"] == "01785c84c70846999638b11b88409fdf86361d9a"
    assert exported["examples"] == {"train": 10, "validation": 2, "test": 2}
    notes = (out / "NOTES.md").read_text()
    assert "10 training examples of `mrpc`" in notes and "WIDTH_MULTIPLE" in notes and "gold log-prob" in notes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no staging folder left


@pytest.mark.slow
def test_an_instruction_task_gets_no_evaluation(tmp_path):
    out = write_official_export(SPEC, study(model=model_folder(tmp_path / "llama")), splits_of(FREE),
                                tmp_path / "export")
    assert not (out / "evaluate.sh").exists() and not (out / "test.json").exists()
    assert "no test.json / evaluate.sh" in (out / "NOTES.md").read_text()


@pytest.mark.parametrize("model, settings, needle", [
    ("tiny-llama", {}, "grouped-query attention"),
    ("no-tokenizer", {}, "has no tokenizer.model (SentencePiece)"),
    ("llama", {"train": {"max_steps": 0}, "fidelity": {**FIDELITY, "max_steps": None}}, "`max_steps` is 0"),
    ("deep", {}, "the allocation has 4 layers and the model 6"),
])
@pytest.mark.slow
def test_refusals_write_nothing(tmp_path, model, settings, needle):
    paths = {"no-tokenizer": lambda: model_folder(tmp_path / "m", tokenizer=False),
             "llama": lambda: model_folder(tmp_path / "m"),
             "deep": lambda: model_folder(tmp_path / "m", num_hidden_layers=6)}
    ref = paths[model]() if model in paths else "tiny-llama-L4"
    with pytest.raises(UserError, match=re.escape(needle)) as error:
        write_official_export(SPEC, study(model=ref, **settings), splits_of(YES_NO), tmp_path / "export")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "export").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_the_embedded_smollm2_tokenizer_is_refused_by_name(tmp_path):
    from mola_search.mola.official import official_tokenizer_problem

    assert "tokenizer.json without the SentencePiece tokenizer.model" in official_tokenizer_problem("tiny-llama")
    assert "embedded SmolLM2" in official_tokenizer_problem("smollm2-135m-instruct")
    assert official_tokenizer_problem(model_folder(tmp_path / "m")) is None


@pytest.mark.slow
def test_an_existing_export_is_not_overwritten(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"^`out` .* exists and is not an empty folder"):
        write_official_export(SPEC, study(model=model_folder(tmp_path / "m")), splits_of(YES_NO), tmp_path / "export")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["mine.txt"]


@pytest.mark.integration  # the study's task data: the real MRPC
@pytest.mark.skipif(not (Path(os.environ.get("MOLA_DATA_DIR", "../shared/data")) / "mrpc").is_dir(),
                    reason="needs the MRPC data (MOLA_DATA_DIR)")
def test_mola_search_exports_a_study_in_the_official_layout_or_refuses_in_one_line(tmp_path, capsys):
    """`mola-search export --format official --out`: a tokenizer the official loader cannot read is refused
    before anything is written; with a model folder it can read, the folder holds what the scripts need."""
    from helpers import MODEL, search

    study, out = tmp_path / "study", tmp_path / "export"
    assert search(["--task", "mrpc", "--model", "tiny-llama-L4", "--objective", "synthetic:upper", "--executor",
                   "local", "--no-pilot", "--trials", "6", "--max-finalist-runs", "8", "--out", str(study)]) == 0
    capsys.readouterr()
    assert search(["export", str(study), "--format", "official", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mola-search: error: ") and "\n" not in err and not out.exists()
    assert search(["export", str(study), "--format", "official"]) == 2
    assert "pass --out" in capsys.readouterr().err
    folder = model_folder(tmp_path / "model")
    assert search(["export", str(study), "--format", "official", "--out", str(out), "--model", folder]) == 0
    assert {"train.sh", "evaluate.sh", "NOTES.md", "data"} <= {p.name for p in out.iterdir()}
    assert folder in (out / "train.sh").read_text() and MODEL != folder
