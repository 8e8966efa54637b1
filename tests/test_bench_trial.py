"""benchmarks/bench_trial.py runs a real trial end to end (here on a tiny model and a generated task)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
