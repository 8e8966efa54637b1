"""mola-bench on the tiny model: method specs, OP/BWT arithmetic, resumable tables, continual runs, CLI errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mola_search.bench import continual_scores, parse_methods, run_continual, run_table, task_domains
from mola_search.bench import table as table_mod
from mola_search.bench.continual import field_domains
from mola_search.cli.common import run_main
from mola_search.errors import UserError
from mola_search.tasks import Example, TaskData
from mola_search.train.run import RunConfig
from mola_search.train.trainer import TrainConfig


def write_task(folder, name, n=24):
    """A custom two-label task with n rows per split (no real data needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = [{"text": f"{name} example {i} {'great' if i % 2 else 'awful'}", "label": i % 2, "idx": i}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(
        f"name: {name}\nfiles: {{train: train.jsonl, validation: validation.jsonl, test: test.jsonl}}\n"
        "template: \"Text: {text}\\nPositive?\\nAnswer:\"\nlabel_field: label\nlabel_words: [' no', ' yes']\n")
    return f"custom:{folder / 'task.yaml'}"


def tiny_config(**kw) -> RunConfig:
    kw.setdefault("train", TrainConfig(max_steps=1, batch_size=8, micro_batch_size=8))
    return RunConfig(model="tiny-llama", dtype="fp32", max_train_examples=16, max_eval_examples=8, **kw)


# --- arithmetic and parsing ---------------------------------------------------------------------


def test_op_bwt_on_hand_made_matrix():
    R = [[0.80, None, None],
         [0.60, 0.70, None],
         [0.50, 0.65, 0.90]]
    scores = continual_scores(R)
    assert scores["OP"] == pytest.approx((0.50 + 0.65 + 0.90) / 3)           # 0.68333
    assert scores["BWT"] == pytest.approx(((0.50 - 0.80) + (0.65 - 0.70)) / 2)  # -0.175
    assert continual_scores([[0.5, None], [0.7, 0.6]])["BWT"] == pytest.approx(0.2)  # positive transfer


def test_method_specs():
    specs = parse_methods("lora,lora:match,mola:2,4,6,8,mola,prompt-tuning:5,llama-adapter,full")
    assert [s.label for s in specs] == ["lora", "lora:match", "mola:2,4,6,8", "mola:inverted_triangle",
                                        "prompt-tuning:5", "llama-adapter", "full"]
    assert specs[2].overrides == {"shape": "2,4,6,8"} and specs[4].overrides == {"num_virtual_tokens": 5}
    assert specs[1].apply(RunConfig(shape="rectangle")).shape == "rectangle"  # lora:match keeps --shape
    with pytest.raises(UserError, match="unknown method 'adapters'"):
        parse_methods("lora,adapters")
    with pytest.raises(UserError, match="lora takes"):
        parse_methods("lora:x")


# --- table ----------------------------------------------------------------------------------------


def test_table_resumes_and_skips_finished_cells(tmp_path, monkeypatch):
    task_a, task_b = write_task(tmp_path / "a", "ta"), write_task(tmp_path / "b", "tb")
    calls = []

    def fake_cell(config, data, progress=False):
        calls.append((config.task, config.method, config.train.seed))
        acc = 0.5 + 0.1 * (config.method == "lora") + 0.01 * config.train.seed
        metrics = {"validation": {"accuracy": acc}, "test": {"accuracy": acc, "majority_baseline": 0.5, "n": 8},
                   "trainable_params": 10, "trainable_percent": 0.1}
        from pathlib import Path
        Path(config.out).mkdir(parents=True)
        (Path(config.out) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(table_mod, "run_cell", fake_cell)
    monkeypatch.setattr(table_mod, "preflight", lambda config, specs: None)
    specs = parse_methods("lora,mola:rectangle")
    config = tiny_config()
    run_table(config, [task_a, task_b], specs, [0, 1], tmp_path / "out", log=lambda *_: None)
    assert len(calls) == 8
    run_table(config, [task_a, task_b], specs, [0, 1], tmp_path / "out", log=lambda *_: None)
    assert len(calls) == 8                      # everything finished: nothing reruns
    run_table(config, [task_a, task_b], specs, [0, 1, 2], tmp_path / "out", log=lambda *_: None)
    assert len(calls) == 12 and all(c[2] == 2 for c in calls[8:])  # only the new seed runs
    md = (tmp_path / "out" / "table.md").read_text()
    assert "**61.0 ± 1.0**" in md and "51.0 ± 1.0" in md  # lora best (bold); mean ± sample std over 3 seeds
    for name in ("table.csv", "cells.csv", "table.html", "table.png"):
        assert (tmp_path / "out" / name).is_file()
    with pytest.raises(UserError, match="other settings"):  # one --out holds one set of training settings
        run_table(replace(config, train=replace(config.train, lr=1e-3)), [task_a], specs, [0],
                  tmp_path / "out", log=lambda *_: None)


@pytest.mark.slow
def test_table_real_cells_on_tiny_model(tmp_path):
    task = write_task(tmp_path / "a", "ta")
    rows = run_table(tiny_config(), [task], parse_methods("prompt-tuning,mola:rectangle"), [0], tmp_path / "out",
                     log=lambda *_: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["trainable_params"] == 20 * 64
    cell = tmp_path / "out" / rows[1]["folder"].split("/out/")[1]
    assert (cell / "adapter" / "adapter_config.json").is_file() and (cell / "allocation.json").is_file()
    assert "| prompt-tuning | 0.039% (1.28K) |" in (tmp_path / "out" / "table.md").read_text()


# --- continual ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_continual_on_tiny_model(tmp_path):
    tasks = [write_task(tmp_path / "a", "ta"), write_task(tmp_path / "b", "tb")]
    config = tiny_config()
    domains = task_domains(tasks, config, min_examples=8)
    results = run_continual(config, domains, parse_methods("lora"), [0], tmp_path / "out", log=lambda *_: None)
    record = results[0]["record"]
    R = record["matrix"]
    assert R[0][1] is None and all(v is not None for v in (R[0][0], R[1][0], R[1][1]))
    assert record["OP"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert record["BWT"] == pytest.approx(R[1][0] - R[0][0])
    folder = tmp_path / "out" / "lora" / "seed0"
    for name in ("continual.json", "matrix.csv", "matrix.png", "adapter/mola_method.json"):
        assert (folder / name).is_file()
    assert (tmp_path / "out" / "summary.md").is_file() and (tmp_path / "out" / "matrices.png").is_file()
    reference = [line for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
                 if line.startswith("| majority class")]
    assert reference == ["| majority class (scored examples) | — | "
                         f"{100 * sum(record['majority']) / 2:.1f} | — | "
                         + " | ".join(f"{100 * m:.1f}" for m in record["majority"]) + " |"]
    again = run_continual(config, domains, parse_methods("lora"), [0], tmp_path / "out", log=lambda *_: None)
    assert again[0]["record"] == json.loads((folder / "continual.json").read_text())  # read back, not rerun


def _topic_task(counts):
    def rows(n_per):
        out = []
        for topic, n in n_per.items():
            out += [Example(f"q {topic} {i}", (" no", " yes"), i % 2, meta={"topic": topic}) for i in range(n)]
        return out
    return TaskData("topics", {"train": rows(counts), "validation": rows(counts), "test": rows(counts)}, (), "mem")


def test_field_domains(monkeypatch):
    import mola_search.tasks as tasks_mod

    monkeypatch.setattr(tasks_mod, "load_task", lambda *a, **k: _topic_task({"physics": 30, "biology": 25, "art": 5}))
    config = RunConfig()
    domains = field_domains("topics", "topic", config, values=["biology", "physics"])
    assert [d.name for d in domains] == ["biology", "physics"] and len(domains[1].train) == 30
    with pytest.raises(UserError, match="domain 'art' has only 5 training examples"):
        field_domains("topics", "topic", config)
    with pytest.raises(UserError, match="has no field 'grade'.*topic"):
        field_domains("topics", "grade", config)
    with pytest.raises(UserError, match="'chemistry' does not occur"):
        field_domains("topics", "topic", config, values=["chemistry", "physics"])


# --- command-line errors: one line, exit status 2 -----------------------------------------------


def _cli(main, prog, argv, capsys):
    code = run_main(prog, main, argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_errors(tmp_path, capsys):
    from mola_search.cli.bench import main as bench_main
    from mola_search.cli.train import main as train_main

    task = write_task(tmp_path / "a", "ta")
    code, err = _cli(bench_main, "mola-bench", ["table", "--tasks", task, "--methods", "lora,qlora"], capsys)
    assert code == 2 and err.startswith("mola-bench: error: unknown method 'qlora'") and "\n" not in err
    out = tmp_path / "never"
    code, err = _cli(bench_main, "mola-bench", ["table", "--tasks", "foo", "--methods", "lora", "--model", "tiny-llama",
                                                "--out", str(out)], capsys)
    assert code == 2 and "unknown task 'foo'" in err and "\n" not in err
    assert not out.exists()  # bad input leaves no output folder behind
    code, err = _cli(bench_main, "mola-bench", ["continual", "--task", task, "--split-field", "topic",
                                                "--methods", "lora", "--model", "tiny-llama"], capsys)
    assert code == 2 and "has no field 'topic'" in err and "\n" not in err
    code, err = _cli(train_main, "mola-train", ["--task", task, "--model", "tiny-llama", "--method", "lora-xl",
                                                "--dry-run"], capsys)
    assert code == 2 and "unknown method 'lora-xl'" in err and "\n" not in err
    # --init-from an adapter whose allocation does not fit the model (8 layers vs tiny-llama's 4)
    from mola_search.models import tiny_llama
    from mola_search.mola import MoLAConfig, MoLAModel
    from mola_search.train.run import resolve_spec

    spec = resolve_spec(RunConfig(), 8)
    MoLAModel(tiny_llama(8), MoLAConfig.from_spec(spec)).save_adapter(tmp_path / "deep" / "adapter")
    code, err = _cli(train_main, "mola-train", ["--task", task, "--model", "tiny-llama", "--max-steps", "1",
                                                "--max-train-examples", "8", "--max-eval-examples", "4",
                                                "--no-progress", "--out", str(tmp_path / "run"),
                                                "--init-from", str(tmp_path / "deep")], capsys)
    assert code == 2 and "for 8 layers but this model has 4" in err and "\n" not in err


@pytest.mark.slow
def test_two_stage_instruct_then_task(tmp_path):
    """Instruction-tune MoLA on an Alpaca-style JSONL, then fine-tune a task starting from those adapters."""
    import torch
    from safetensors.torch import load_file

    from mola_search.train.run import execute, prepare

    rows = [{"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}"}
            for i in range(30)]
    (tmp_path / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = execute(prepare(tiny_config(task=f"instruct:{tmp_path / 'inst.jsonl'}", out=str(tmp_path / "s1"))),
                    progress=False)
    assert first.metrics["validation"]["answer_nll"] > 0 and first.metrics["validation"]["accuracy"] is None
    task = write_task(tmp_path / "a", "ta")
    config = tiny_config(task=task, out=str(tmp_path / "s2"), train=TrainConfig(max_steps=1, lr=1e-12, batch_size=8))
    second = execute(prepare(config), progress=False, init_from=str(tmp_path / "s1"))
    saved = load_file(str(tmp_path / "s1" / "adapter" / "adapter_model.safetensors"))
    own = second.model.adapter_state_dict()
    assert set(saved) == set(own)
    for k in saved:  # started from stage 1 (one step at lr 1e-12 moves nothing measurable)
        torch.testing.assert_close(own[k], saved[k], atol=1e-8, rtol=0)
