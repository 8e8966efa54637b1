"""benchmarks/bench_trial.py runs a real trial end to end (here on a tiny model and a generated task); bench_step.py
and bench_ops.py run on tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # runs the benchmark scripts


def test_bench_trial_splits_one_trial_into_its_phases(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    for split, n in (("train", 16), ("validation", 8), ("test", 8)):
        rows = [{"number": k, "label": int(k % 2 == 0)} for k in range(n)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "task.yaml").write_text(
        "name: parity\nfiles: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}\n"
        "template: \"Is {number} even?\\nAnswer:\"\nlabel_field: label\nlabel_words: [\" no\", \" yes\"]\n")
    out = tmp_path / "trial.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trial.py"), "--model", "tiny-llama-L4",
                           "--task", f"custom:{task / 'task.yaml'}", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    phases = result["phases_s"]
    assert set(phases) == {"load", "tokenise", "train", "score", "other"}
    assert phases["train"] > 0 and phases["score"] > 0 and abs(phases["other"]) < 0.5 * result["wall_s"]
    assert sum(phases.values()) == pytest.approx(result["wall_s"], rel=1e-6)
    assert len(result["scores"]) == 2 and result["peak_rss_mb"] > result["phase_peaks_mb"]["load"] * 0.99
    assert "score" in proc.stdout and "peak RSS of the trial process" in proc.stdout
    # The same trial with activation checkpointing: the very same scores (it trades compute for memory only).
    again = tmp_path / "checkpointed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trial.py"), "--model", "tiny-llama-L4",
                           "--task", f"custom:{task / 'task.yaml'}", "--activation-checkpointing", "--json", str(again)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(again.read_text())["scores"] == result["scores"]
    assert "activation checkpointing" in proc.stdout


def test_bench_step_times_every_variant_against_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--model", "tiny-llama",
                           "--batch", "2", "--seq", "16", "--repeats", "1", "--rounds", "1", "--threads", "1",
                           "--profile", "4", "--flops", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    _check_flops(result["flops"], tokens=2 * 16, experts=5, rank=8)
    variants = result["results"]
    assert set(variants) == {"floor", "peft-lora", "mola", "mola-ungrouped", "mola-no-dropout", "mola-checkpointed",
                             "mola-loop"}
    assert variants["floor"]["x_floor"] == 1.0 and variants["floor"]["trainable_params"] == 0
    assert all(v["step_s"] > 0 and len(v["steps"]) == 1 for v in variants.values())
    assert variants["mola-checkpointed"]["trainable_params"] == variants["mola"]["trainable_params"] > 0
    profile = result["profile"]  # MoLA's own operators, backward included, and none of them in the floor
    assert "_AdaptersBackward" in profile["mola_ms"] and "_AdaptersBackward" not in profile["floor_ms"]
    assert len(profile["top"]) == 4 and profile["extra_ms"] == pytest.approx(
        sum(profile["mola_ms"].values()) - sum(profile["floor_ms"].values()))
    extras = [row["extra_ms"] for row in profile["top"]]
    assert extras == sorted(extras, reverse=True)
    assert result["ratios"]["no_dropout_over_mola"] == pytest.approx(
        variants["mola-no-dropout"]["step_s"] / variants["mola"]["step_s"])
    assert result["ratios"]["checkpointed_over_mola"] == pytest.approx(
        variants["mola-checkpointed"]["step_s"] / variants["mola"]["step_s"])


def _check_flops(flops: dict[str, int], *, tokens: int, experts: int, rank: int) -> None:
    """MoLA's counted FLOPs over the floor's are its adapters', by hand: per adapted linear and token, the router
    (d_in x N) and the A's (d_in x N r) forward, input gradient and weight gradient, and the B's (N r x d_out)
    forward, gated-input gradient and weight gradient: 6 (N r (d_in + d_out) + N d_in). Layer 0's q/k/v input is
    the frozen embeddings' (no gradient), so MoLA skips its input gradient, base projections' included, where the
    floor (gradients down to the embeddings) computes it."""
    from mola_search.models import load_base_model

    config = load_base_model("tiny-llama")[0].config
    d, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    per_layer = sum(6 * (experts * rank * (i + o) + experts * i) for i, o in shapes)
    layer0_input_grad = 2 * d * (d + 2 * kv) + 3 * 2 * (experts * rank + experts) * d
    assert flops["mola"] - flops["floor"] == tokens * (config.num_hidden_layers * per_layer - layer0_input_grad)
    assert flops["floor"] < flops["peft-lora"] < flops["mola"]


def test_bench_ops_times_both_layouts_of_every_choice(tmp_path: Path) -> None:
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--tokens", "64", "--widths",
                           "32", "--repeats", "1", "--inner", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"weight gradient, d_in 32", "dropout, d_in 32", "A matmul vs base projection, d_in 32",
                            "gating", "routing softmax", "routing top-k"}
    for name, row in results.items():
        a, b = (v for key, v in row.items() if key != "ratio")
        assert a > 0 and b > 0 and row["ratio"] == pytest.approx(a / b), name
