"""Memory stays flat in the work done: more training steps and more scored examples, at new batch widths,
do not make a run hold more memory (issue 22; docs/performance.md, Memory over a whole run).

On a CPU, torch runs bf16 matmuls through oneDNN, which by default keeps what it builds for every new input
shape (its primitive cache and ideep's cache of matmul set-ups) for the rest of the process: a run whose
batches come in many widths (training batches, and above all the scored splits) grows by tens of MB per new
width. The child process below trains the tiny model a few steps and scores a few examples, then does 4x
that work again at batch widths it has not seen, and reports its heap in use (glibc's mallinfo2: what is
allocated and not freed, which page reuse and heap trimming do not blur) and its RSS after each part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, json, random, sys
from pathlib import Path

import mola_search  # first, as every entry point of the package does (console scripts, Ray workers)
import torch

from mola_search.models import load_base_model
from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.tasks import Example
from mola_search.train.evaluate import evaluate_accuracy
from mola_search.train.trainer import TrainConfig, train

torch.set_num_threads(1)


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2


def measure():
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    info = libc.mallinfo2()
    return {"heap_mb": (info.uordblks + info.hblkhd) / 2**20, "rss_mb": rss / 1024}


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma".split()


def examples(n, low, high, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        out.append(Example("Sentence: " + " ".join(words) + "\nAnswer:", (" no", " yes"), int("alpha" in words)))
    return out


base, tok = load_base_model("tiny-llama-L2", dtype="bf16")  # bf16: the CPU path that goes through oneDNN
model = MoLAModel(base, MoLAConfig(experts=(2, 3), top_k=(1, 2), rank=(4, 4)))
cfg = dict(batch_size=8, micro_batch_size=8, cutoff_len=512, lr=1e-3, seed=0)
# part 1: N steps and N batches scored, prompts of 2-150 words (~8 widths: a bounded cache is full after it),
# and one cut at the cutoff, so part 1 has the widest batch's activations already;
# part 2: 4N of each, 2-300 words (~30 widths, most of them new)
train(model, tok, examples(31, 2, 150, 0) + examples(1, 400, 400, 4), TrainConfig(max_steps=4, **cfg),
      progress=False)
evaluate_accuracy(model, tok, examples(32, 2, 150, 1), batch_size=8, cutoff_len=512)
first = measure()
train(model, tok, examples(128, 2, 300, 2), TrainConfig(max_steps=16, **cfg), progress=False)
evaluate_accuracy(model, tok, examples(128, 2, 300, 3), batch_size=8, cutoff_len=512)
print(json.dumps({"after_n": first, "after_4n": measure()}))
"""


@pytest.mark.slow
def test_memory_is_flat_in_the_work_done():
    """After 4 steps and 32 scored examples, 16 more steps and 128 more examples, mostly at new widths, hold at
    most 25 MB more heap in use and 100 MB more RSS. Measured at the commit that bounded the oneDNN caches
    (mola_search/__init__.py): +1 MB heap and +47 MB RSS (of 555 MB); with torch's default caches (the code
    before it) +370 MB heap and +546 MB RSS."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    n, n4 = measured["after_n"], measured["after_4n"]
    assert n4["heap_mb"] - n["heap_mb"] <= 25, measured
    assert n4["rss_mb"] - n["rss_mb"] <= 100, measured
