"""`mola-train`: one-line errors with exit 2, the dry run, and a full tiny run whose adapter reloads."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import DATA_DIR, needs_data
from mola_search.cli import train as cli
from mola_search.cli.common import run_main
from mola_search.models import load_base_model, tiny_llama
from mola_search.mola import MoLAModel

TINY = ["--model", "tiny-llama", "--task", "mrpc", "--data-dir", DATA_DIR]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, argv: list[str]) -> tuple[int, str, list[str]]:
    code = run_main("mola-train", cli.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_one_line_error(code: int, err_lines: list[str], *fragments: str) -> None:
    assert code == 2, err_lines
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("mola-train: error: "), err_lines
    assert "Traceback" not in err_lines[0]
    for fragment in fragments:
        assert fragment in err_lines[0], err_lines[0]


@pytest.fixture
def files(tmp_path):
    """Bad input files: configs and allocation specs."""
    (tmp_path / "bad.yaml").write_text("task: mrpc\nlr: [0.1, \n")
    (tmp_path / "unknown.yaml").write_text("task: mrpc\nlearning_rate: 0.1\n")
    (tmp_path / "unknown_train.yaml").write_text("train:\n  warmup: 3\n")
    (tmp_path / "list.yaml").write_text("- task\n- mrpc\n")
    (tmp_path / "bad.json").write_text('{"task": "mrpc",}')
    (tmp_path / "bad_types.yaml").write_text("batch_size: eight\n")
    (tmp_path / "train_scalar.yaml").write_text("train: 5\n")
    (tmp_path / "depth2.json").write_text(json.dumps({"schema_version": 1, "experts": [2, 2], "top_k": 1, "rank": 8}))
    (tmp_path / "garbled.json").write_text("{experts: [1, 2")
    (tmp_path / "empty").mkdir()
    return tmp_path


# --- bad input: one line on stderr, exit 2 -----------------------------------------------------

BAD_INPUTS = {
    "budget below L*min": (["--budget", "3"], ["budget 3", "in [4, 32]"]),  # a shape: the spaces' 1..8 bounds
    "budget below L*min (min 2)": (["--budget", "7", "--min-experts", "2"], ["budget 7", "in [8, 32]"]),
    "budget above L*max": (["--budget", "40", "--max-experts", "8"], ["budget 40", "[4, 32]"]),
    "unknown shape": (["--shape", "pyramid"], ["pyramid"]),
    "unknown task": (["--task", "nosuch"], ["unknown task 'nosuch'"]),
    "missing model folder": (["--model", "/nonexistent/model-folder"], ["/nonexistent/model-folder"]),
    "malformed allocation": (["--allocation", "2,x,4,4"], ["2,x,4,4"]),
    "zero count in allocation": (["--allocation", "2,0,4,4"], ["2,0,4,4"]),
    "wrong-depth comma list": (["--allocation", "2,4,6"], ["3 counts", "4 layers"]),
    "wrong-depth digits": (["--shape", "24682"], ["24682"]),
    "wrong-depth spec file": (["--allocation", "{tmp}/depth2.json"], ["2 layers", "4"]),
    "garbled spec file": (["--allocation", "{tmp}/garbled.json"], ["not valid JSON"]),
    "missing spec file": (["--allocation", "{tmp}/nope.json"], ["does not exist"]),
    "no matching targets": (["--targets", "c_attn"], ["c_attn", "q_proj"]),
    "top-k above experts": (["--shape", "1234", "--top-k", "3"], ["top_k 3", "1 expert"]),
    "budget beside explicit counts": (["--shape", "2468", "--budget", "12"], ["--budget 12 does not apply", "2468",
                                                                              "20 experts"]),
    "shape and allocation": (["--shape", "triangle", "--allocation", "2468"], ["not both"]),
    "malformed YAML config": (["--config", "{tmp}/bad.yaml"], ["not valid YAML"]),
    "malformed JSON config": (["--config", "{tmp}/bad.json"], ["not valid JSON"]),
    "config not a mapping": (["--config", "{tmp}/list.yaml"], ["mapping"]),
    "missing config": (["--config", "{tmp}/none.yaml"], ["does not exist"]),
    "unknown config key": (["--config", "{tmp}/unknown.yaml"], ["learning_rate"]),
    "unknown train key": (["--config", "{tmp}/unknown_train.yaml"], ["warmup"]),
    "wrongly typed config value": (["--config", "{tmp}/bad_types.yaml"], ["batch_size", "eight"]),
    "config train not a mapping": (["--config", "{tmp}/train_scalar.yaml"], ["train"]),
    "zero batch size": (["--batch-size", "0"], ["--batch-size 0"]),
    "negative max steps": (["--max-steps", "-1"], ["--max-steps -1", "0 only evaluates"]),
    "negative train subsample": (["--max-train-examples", "-1"], ["--max-train-examples is -1"]),
    "dropout out of range": (["--lora-dropout", "1.5"], ["lora_dropout"]),
}


@needs_data
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(name, files, capsys):
    extra, fragments = BAD_INPUTS[name]
    argv = TINY + [a.replace("{tmp}", str(files)) for a in extra] + ["--dry-run", "--out", str(files / "run")]
    code, out, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, *fragments)
    assert not (files / "run").exists()


@needs_data
def test_init_from_a_folder_of_an_unknown_kind_is_one_line_exit_2(files, capsys):
    """The kind record decides how a folder loads; a kind no class is registered for is refused in one line."""
    folder = files / "odd-adapter"
    folder.mkdir()
    (folder / "mola_method.json").write_text(json.dumps({"kind": "adapterx"}))
    code, _, err = run_cli(capsys, TINY + ["--max-train-examples", "4", "--max-eval-examples", "1", "--max-steps", "0",
                                           "--init-from", str(folder), "--no-progress", "--threads", "1"])
    assert_one_line_error(code, err, f"--init-from {folder} holds a 'adapterx' adapter",
                          "known kinds: mola, lora, prompt-tuning, llama-adapter, full")


def test_missing_data_files_is_one_line_exit_2(files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # else the loader falls back to the Hub (and retries)
    code, _, err = run_cli(capsys, ["--model", "tiny-llama", "--task", "mrpc", "--data-dir", str(files / "empty"),
                                    "--dry-run"])
    assert_one_line_error(code, err, "mrpc", "train.jsonl")


@pytest.mark.slow
@needs_data
def test_console_entry_exits_2_with_one_line(files):
    """Through the real `python -m` entry point: the exit status and stderr a shell sees."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLA_DATA_DIR": DATA_DIR}
    proc = subprocess.run([sys.executable, "-m", "mola_search.cli.train", "--model", "no-such-org/no-such-model",
                           "--task", "mrpc", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("mola-train: error: unknown model 'no-such-org/no-such-model'"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
@needs_data
def test_console_entry_budget_error(files):
    env = {**os.environ, "MOLA_DATA_DIR": DATA_DIR}
    proc = subprocess.run([sys.executable, "-m", "mola_search.cli.train", *TINY, "--budget", "100",
                           "--max-experts", "8", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("mola-train: error: budget 100 is infeasible")


@needs_data
def test_diverging_run_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, TINY + ["--max-train-examples", "8", "--max-eval-examples", "2", "--max-steps", "3",
                                           "--batch-size", "4", "--lr", "inf", "--no-progress", "--threads", "1",
                                           "--out", str(tmp_path / "run")])
    assert_one_line_error(code, err, "training diverged", "--lr")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "many"], "argument --budget: invalid int value: 'many'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argparse_errors_are_one_line_exit_2(capsys, argv, needle):
    """Bad flags get one line naming the flag and pointing at --help, not a usage dump."""
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, needle, "mola-train --help")


# --- config files and flags ---------------------------------------------------------------------


def test_flags_override_config_and_yaml_floats_are_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: rte\nlr: 3e-4\nseed: 5\nbudget: 30\ntarget_modules: q_proj, v_proj\n"
                    "train:\n  batch_size: 8\n")
    config = cli.config_from_args(cli.build_parser().parse_args(["--config", str(path), "--seed", "7",
                                                                 "--out", str(tmp_path / "o")]))
    assert (config.task, config.budget, config.train.seed) == ("rte", 30, 7)
    assert config.train.lr == 3e-4 and config.train.batch_size == 8  # YAML 1.1 reads 3e-4 as a string
    assert config.target_modules == ("q_proj", "v_proj")
    defaults = cli.config_from_args(cli.build_parser().parse_args([]))
    assert defaults.train.lr == 3e-4 and defaults.budget is None  # None: 5 x layers, resolved later
    assert not defaults.train.activation_checkpointing
    assert cli.config_from_args(cli.build_parser().parse_args(["--activation-checkpointing"])).train.activation_checkpointing
    from mola_search.cli import search

    study = search.study_config_from_args(search.build_parser().parse_args(["--activation-checkpointing"]))
    assert study.train["activation_checkpointing"] is True
    assert defaults.out.startswith("runs/mrpc-inverted_triangle-")


# --- the dry run ---------------------------------------------------------------------------------


def _expected_trainable(experts: list[int], rank: int) -> int:
    """Per expert: A (r x d_in) and B (d_out x r) plus one router row (d_in), for every adapted linear."""
    base = tiny_llama(num_layers=len(experts))
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            j = int(name.split(".layers.")[1].split(".")[0])
            total += experts[j] * (rank * (module.in_features + module.out_features) + module.in_features)
    return total


def _field(out: str, key: str) -> str:
    match = re.search(rf"^{key}:\s+(.*)$", out, re.M)
    assert match, out
    return match.group(1)


@needs_data
def test_dry_run_prints_the_resolved_run_and_trains_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, TINY + ["--max-train-examples", "16", "--max-eval-examples", "8",
                                             "--out", str(out_dir), "--dry-run"])
    assert code == 0, err
    assert not out_dir.exists()
    allocation = [int(x) for x in _field(out, "allocation").split()[0].split(",")]
    assert allocation == [2, 4, 6, 8]  # inverted triangle, the default shape
    assert sum(allocation) == 20 and "(budget 20;" in _field(out, "allocation")  # default budget 5 x layers
    assert "scaled within 1..8 per layer" in _field(out, "allocation")
    assert _field(out, "top_k") == "2,2,2,2"
    assert _field(out, "rank") == "8,8,8,8"
    params = _field(out, "trainable params")
    count, percent, base = re.fullmatch(r"([\d,]+) \(([\d.]+)% of base ([\d,]+)\)", params).groups()
    count, base = int(count.replace(",", "")), int(base.replace(",", ""))
    assert count == _expected_trainable(allocation, 8)
    assert float(percent) == pytest.approx(100 * count / base, abs=1e-3)
    assert _field(out, "splits") == "train 16, validation 8, test 8"


@needs_data
def test_dry_run_with_budget_and_explicit_allocation(tmp_path, capsys):
    code, out, _ = run_cli(capsys, TINY + ["--budget", "12", "--shape", "triangle", "--top-k", "1", "--rank", "4",
                                           "--dry-run", "--out", str(tmp_path / "r")])
    assert code == 0
    allocation = [int(x) for x in _field(out, "allocation").split()[0].split(",")]
    assert sum(allocation) == 12 and allocation == sorted(allocation, reverse=True)
    assert _field(out, "top_k") == "1,1,1,1" and _field(out, "rank") == "4,4,4,4"
    code, out, _ = run_cli(capsys, TINY + ["--allocation", "1,3,3,1", "--top-k", "1", "--dry-run", "--out", str(tmp_path / "r")])
    assert code == 0 and _field(out, "allocation").startswith("1,3,3,1  (budget 8)")


@needs_data
def test_default_top_k_is_capped_by_a_layers_expert_count(tmp_path, capsys):
    """A shape at a small budget gives some layers 1 expert: the default top-k (2) is capped there, as in the
    search, instead of failing on a value the user never set."""
    code, out, err = run_cli(capsys, TINY + ["--shape", "inverted_triangle", "--budget", "6", "--dry-run",
                                             "--out", str(tmp_path / "r")])
    assert code == 0, err
    experts = [int(x) for x in _field(out, "allocation").split()[0].split(",")]
    assert 1 in experts and _field(out, "top_k") == ",".join(str(min(2, e)) for e in experts)


# --- a full tiny run -----------------------------------------------------------------------------


@needs_data
def test_full_tiny_run_writes_the_run_folder_and_the_adapter_reloads(tmp_path, capsys, monkeypatch):
    outcomes = []
    real_execute = cli.execute
    monkeypatch.setattr(cli, "execute", lambda *a, **k: outcomes.append(real_execute(*a, **k)) or outcomes[-1])
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, TINY + ["--max-train-examples", "16", "--max-eval-examples", "8",
                                             "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-2",
                                             "--out", str(out_dir), "--no-progress", "--threads", "1"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["out"] == str(out_dir)

    assert (out_dir / "allocation.json").is_file() and (out_dir / "adapter").is_dir()
    assert json.loads((out_dir / "adapter" / "mola_method.json").read_text())["kind"] == "mola"  # the kind record
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert "method_info" not in metrics  # MoLA's setup is its allocation; only the baselines add method_info
    for split in ("validation", "test"):
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0 and metrics[split]["n"] == 8
        assert summary[split]["accuracy"] == metrics[split]["accuracy"]
    assert metrics["allocation"] == [2, 4, 6, 8]
    assert json.loads((out_dir / "allocation.json").read_text())["experts"] == metrics["allocation"]
    assert metrics["trainable_params"] == _expected_trainable([2, 4, 6, 8], 8)
    assert metrics["train_steps"] == 2 and metrics["split_sizes"] == {"train": 16, "validation": 8, "test": 8}
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss_curve"])
    assert metrics["config"]["train"]["max_steps"] == 2 and metrics["config"]["train"]["lr"] == 1e-2

    # The adapter on a fresh base gives the trained model's logits.
    trained = outcomes[0].model.eval()
    fresh, tokenizer = load_base_model("tiny-llama", dtype=metrics["config"]["dtype"])
    reloaded = MoLAModel.from_pretrained(fresh, out_dir / "adapter").eval()
    ids = torch.tensor([tokenizer("Sentence 1: the cat sat.\nAnswer:")["input_ids"]])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
        plain = tiny_llama(num_layers=4, vocab_size=len(tokenizer)).to(a.dtype)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, plain)  # the adapter changed something, so the comparison means something

    # --init-from with --max-steps 0 only evaluates the saved adapter: the trained run's scores, example by
    # example; without --init-from, --max-steps 0 scores the untouched base (B = 0), which differs.
    scores = {}
    for name, extra in (("reloaded", ["--init-from", str(out_dir / "adapter")]), ("base", [])):
        code, _, err = run_cli(capsys, TINY + ["--max-train-examples", "16", "--max-eval-examples", "8",
                                               "--max-steps", "0", "--out", str(tmp_path / name), "--no-progress",
                                               "--threads", "1", *extra])
        assert code == 0, err
        evaluated = json.loads((tmp_path / name / "metrics.json").read_text())
        assert evaluated["train_steps"] == 0 and evaluated["train_loss_curve"] == []
        scores[name] = evaluated["validation"]["per_example"]
    trained_scores = metrics["validation"]["per_example"]
    assert scores["reloaded"]["ids"] == trained_scores["ids"]
    assert scores["reloaded"]["gold_logprob"] == pytest.approx(trained_scores["gold_logprob"], abs=1e-5)
    assert scores["base"]["gold_logprob"] != pytest.approx(trained_scores["gold_logprob"], abs=1e-5)


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.integration
@needs_data
def test_real_smollm2_short_mrpc_run(tmp_path, capsys):
    """The embedded SmolLM2-135M on 16 MRPC examples for 2 steps: completes with finite metrics.

    Also: an error found after the real weights are loaded is still one line (no loading bar before it).
    """
    code, _, err = run_cli(capsys, ["--task", "mrpc", "--data-dir", DATA_DIR, "--budget", "29", "--dry-run"])
    assert_one_line_error(code, err, "budget 29", "30 layers")

    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, ["--task", "mrpc", "--data-dir", DATA_DIR, "--max-train-examples", "16",
                                      "--max-eval-examples", "16", "--max-steps", "2", "--batch-size", "8",
                                      "--out", str(out_dir), "--no-progress", "--threads", "1"])
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["num_layers"] == 30 and sum(metrics["allocation"]) == 150  # default budget 5 x 30
    assert metrics["train_steps"] == 2
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss_curve"])
    for split in ("validation", "test"):
        assert metrics[split]["n"] == 16 and 0.0 <= metrics[split]["accuracy"] <= 1.0
    assert metrics["tokens_per_second"] > 0
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
