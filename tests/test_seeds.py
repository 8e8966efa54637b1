"""Seeded baselines: the paper shapes and the training-free AlphaLoRA allocation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.models import tiny_llama
from mola_search.search.seeds import alphalora
from mola_search.search.seeds.alphalora import (
    alphalora_allocation,
    cached_layer_alphas,
    hill_alpha,
    layer_alphas,
)
from mola_search.search.seeds import SEED_SHAPES, Seed, all_seeds, paper_seeds
from mola_search.search.space import SearchSpace

PAPER_32 = {  # MoLA paper, 32 layers, 160 experts
    "triangle": [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8,
    "inverted_triangle": [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8,
    "hourglass": [8] * 8 + [2] * 8 + [2] * 8 + [8] * 8,
    "rectangle": [5] * 32,
    "diamond": [2] * 8 + [8] * 8 + [8] * 8 + [2] * 8,
}


@pytest.fixture(scope="module", autouse=True)
def single_thread_torch() -> Iterator[None]:
    """Tiny SVDs are dominated by thread start-up: on a busy 2-core box 2 threads are ~1000x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama(num_layers=3, hidden_size=32, vocab_size=128)


# ------------------------------------------------------------------------------------------ paper seeds


def test_paper_seeds_reproduce_the_paper_at_32_layers() -> None:
    seeds = paper_seeds(32, 160)
    assert [seed.name for seed in seeds] == list(SEED_SHAPES) == list(PAPER_32)
    for seed in seeds:
        assert list(seed.spec.experts) == PAPER_32[seed.name]
        assert seed.spec.source == f"seed:{seed.name}"
        assert seed.spec.top_k == (2,) * 32 and seed.spec.rank == (8,) * 32


@pytest.mark.parametrize(("num_layers", "budget", "low", "high"),
                         [(30, 150, 1, 8), (30, 30, 1, 8), (30, 240, 1, 8), (7, 20, 2, None), (24, 100, 3, 5)])
def test_paper_seeds_respect_budget_and_bounds(num_layers: int, budget: int, low: int, high: int | None) -> None:
    for seed in paper_seeds(num_layers, budget, low, high, top_k=3, rank=4):
        assert seed.spec.budget == budget and seed.spec.num_layers == num_layers
        assert min(seed.spec.experts) >= low and (high is None or max(seed.spec.experts) <= high)
        assert all(k == min(3, n) for k, n in zip(seed.spec.top_k, seed.spec.experts))
        assert seed.spec.rank == (4,) * num_layers


def test_paper_seeds_keep_their_shape_under_bounds() -> None:
    seeds = {seed.name: list(seed.spec.experts) for seed in paper_seeds(30, 150, 1, 8)}
    assert seeds["triangle"] == sorted(seeds["triangle"], reverse=True)
    assert seeds["inverted_triangle"] == sorted(seeds["inverted_triangle"])
    assert seeds["rectangle"] == [5] * 30


def test_paper_seeds_refuse_an_infeasible_budget() -> None:
    with pytest.raises(UserError, match="infeasible"):
        paper_seeds(30, 300, 1, 8)


def test_paper_seeds_are_exact_points_of_the_default_space() -> None:
    space = SearchSpace.builtin("blocks")
    for seed in paper_seeds(30, 150, space.min_experts, space.max_experts, space.top_k, space.rank):
        params, exact = space.encode(seed.spec)
        assert exact, seed.name
        assert space.decode(params, 30, 150).experts == seed.spec.experts


def test_all_seeds_without_a_model_are_the_paper_seeds() -> None:
    assert all_seeds(None, 12, 48, 1, 8) == paper_seeds(12, 48, 1, 8)


def test_all_seeds_with_a_model_add_alphalora(tmp_path) -> None:
    model = tiny_llama(num_layers=4, hidden_size=32, vocab_size=128)  # the paper shapes need >= 4 layers
    seeds = all_seeds(model, 4, 16, 1, 8, alphalora_beta=2.5, alpha_cache=tmp_path / "alphas.json")
    assert [seed.name for seed in seeds] == [*SEED_SHAPES, "alphalora"]
    last = seeds[-1]
    assert isinstance(last, Seed) and last.spec.source == "seed:alphalora"
    expected = alphalora_allocation(layer_alphas(model), 16, 2.5, 1, 8)
    assert list(last.spec.experts) == expected and last.spec.budget == 16
    assert (tmp_path / "alphas.json").is_file()
    with pytest.raises(UserError, match="4 decoder layers but the search is for 5"):
        all_seeds(model, 5, 20)


# ------------------------------------------------------------------------------------------ hill_alpha


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_hill_alpha_recovers_a_pareto_exponent(alpha: float) -> None:
    # numpy's pareto(a) is Lomax; +1 gives density ∝ x^-(a+1) on x >= 1, i.e. exponent alpha = a + 1.
    samples = np.random.default_rng(0).pareto(alpha - 1.0, 2000) + 1.0
    fitted, xmin = hill_alpha(samples)
    assert abs(fitted - alpha) <= 0.15
    assert 1.0 <= xmin < 2.0


def test_hill_alpha_finds_where_the_tail_starts() -> None:
    """A bulk below 1 plus a power-law tail above it: the KS choice of xmin must skip the bulk."""
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.uniform(0.05, 1.0, 1000), rng.pareto(2.0, 2000) + 1.0])
    fitted, xmin = hill_alpha(values)
    assert abs(fitted - 3.0) <= 0.15
    assert 0.9 <= xmin <= 3.0  # past the bulk, and the tail keeps most of the power-law points
    naive = 1.0 + values.size / np.sum(np.log(values / values.min()))  # Hill over everything
    assert abs(naive - 3.0) > 1.0


def test_hill_alpha_ignores_zeros_and_refuses_degenerate_spectra() -> None:
    samples = np.random.default_rng(2).pareto(1.5, 500) + 1.0
    assert hill_alpha(np.concatenate([samples, np.zeros(50)])) == hill_alpha(samples)
    with pytest.raises(UserError, match="cannot fit a power law"):
        hill_alpha([3.0, 3.0, 3.0])
    with pytest.raises(UserError, match="cannot fit a power law"):
        hill_alpha([0.0, 1.0])


# ------------------------------------------------------------------------------------------ allocation


def test_alphalora_allocation_sums_to_budget_and_favours_larger_alpha() -> None:
    alphas = [2.1, 3.4, 2.8, 5.0, 4.2, 2.5]
    counts = alphalora_allocation(alphas, 30)
    assert sum(counts) == 30 and min(counts) >= 1
    order = sorted(range(6), key=lambda j: alphas[j])
    assert [counts[j] for j in order] == sorted(counts)
    assert counts[3] > counts[0]
    bounded = alphalora_allocation(alphas, 30, beta=4.0, min_count=2, max_count=8)
    assert sum(bounded) == 30 and min(bounded) >= 2 and max(bounded) <= 8


def test_alphalora_beta_controls_the_spread() -> None:
    alphas = [2.0, 3.0, 4.0, 5.0]
    assert alphalora_allocation(alphas, 20, beta=0.0) == [5, 5, 5, 5]
    flat, sharp = alphalora_allocation(alphas, 40, beta=1.0), alphalora_allocation(alphas, 40, beta=4.0)
    assert sharp[-1] - sharp[0] > flat[-1] - flat[0]
    assert alphalora_allocation([3.0, 3.0, 3.0], 12, beta=100.0) == [4, 4, 4]  # no overflow


@pytest.mark.parametrize(("alphas", "beta", "message"), [
    ([2.0, float("nan")], 2.5, "alpha of layer 1"),
    ([2.0, -1.0], 2.5, "alpha of layer 1"),
    ([], 2.5, "no alphas"),
    ([2.0, 3.0], -1.0, "beta is -1.0"),
])
def test_alphalora_allocation_refuses_bad_input(alphas: list[float], beta: float, message: str) -> None:
    with pytest.raises(UserError, match=message):
        alphalora_allocation(alphas, 10, beta)


# ------------------------------------------------------------------------------------------ model spectra


def test_layer_alphas_of_a_tiny_llama(tiny_model: torch.nn.Module) -> None:
    alphas = layer_alphas(tiny_model)
    assert len(alphas) == 3
    assert all(math.isfinite(a) and a > 1.0 for a in alphas)
    assert len(set(alphas)) == 3  # layers have different random weights, hence different spectra
    only_q = layer_alphas(tiny_model, target_modules=("q_proj",))
    assert only_q != alphas
    with pytest.raises(UserError, match="has no linear module named c_attn"):
        layer_alphas(tiny_model, target_modules=("c_attn",))


def test_layer_alphas_see_through_adapter_wrappers(tiny_model: torch.nn.Module) -> None:
    class Wrapped(torch.nn.Module):  # the shape of MoLALinear / PEFT: the frozen linear is base_layer
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base_layer = base

    model = tiny_llama(num_layers=3, hidden_size=32, vocab_size=128)
    attention = model.model.layers[1].self_attn
    attention.q_proj = Wrapped(attention.q_proj)
    assert layer_alphas(model) == layer_alphas(tiny_model)


def test_cached_layer_alphas_reuses_and_invalidates(tmp_path, monkeypatch) -> None:
    model = tiny_llama(num_layers=3, hidden_size=32, vocab_size=128)
    cache = tmp_path / "cache" / "alphas.json"
    first = cached_layer_alphas(model, cache)
    assert cache.is_file() and first == layer_alphas(model)

    def fail(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(alphalora, "layer_alphas", fail)
    assert cached_layer_alphas(model, cache) == first
    monkeypatch.undo()

    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0).add_(0.5)
    changed = cached_layer_alphas(model, cache)
    assert changed == layer_alphas(model) and changed[0] != first[0]
    cache.write_text("{not json")
    assert cached_layer_alphas(model, cache) == changed  # a broken cache is recomputed, not fatal


def test_seed_specs_are_valid_allocation_specs() -> None:
    for seed in paper_seeds(8, 10, 1, 8, top_k=2):
        assert AllocationSpec.from_dict(seed.spec.to_dict()) == seed.spec
