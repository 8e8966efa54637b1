"""Shared fixtures and the marker rules (tests/README.md).

The model cache defaults to <repo>/.cache/mola-search (git-ignored) for tests.

Markers: `integration` and `netns` imply `slow`, so `pytest -m "not slow"` is the fast loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything reads it, and only if the caller has not chosen a cache already, so the
# embedded model is converted once per checkout rather than into the user's home cache.
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MOLA_CACHE_DIR", str(REPO / ".cache" / "mola-search"))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct in fp32, with its tokenizer (converted once, cached)."""
    from mola_search.models import load_base_model

    return load_base_model(None, dtype="fp32")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    """The SmolLM2 tokenizer (shared: do not change its settings in a test)."""
    return smollm2[1]


@pytest.fixture
def tiny_model():
    """A fresh 4-layer random LLaMA (fp32, frozen); cheap enough to build per test."""
    from mola_search.models import tiny_llama

    return tiny_llama(num_layers=4)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model ops are too small to split: one thread is faster, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ markers

IMPLY_SLOW = ("integration", "netns")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not slow"` must see the implied marks
def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
