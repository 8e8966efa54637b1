"""scripts/gpu_check.sh, the GPU acceptance script, run end to end in its `--cpu` mode so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs a script (which runs pytest); its --cpu mode runs a study on Ray, so in a private network namespace.
pytestmark = [pytest.mark.slow, pytest.mark.netns]


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("MOLA_SEARCH_FAULTS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| check (cpu) |"):]
    assert "device tests | " in table and " passed" in table
    assert table.count("| step, ") == 2 and "loop_over_mola=" in table and table.count("FLOPs x floor: floor 1.000") == 2
    assert table.count("COMPLETE") == 2
    big = json.loads((tmp_path / "bench_big.json").read_text())
    assert big["layers"] == 8 and sum(big["allocation"]) == 40 and big["allocation"][0] < big["allocation"][-1]


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script runs its GPU mode here")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env={**os.environ, "OUT": str(tmp_path),
                          "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--cpu" in proc.stderr
