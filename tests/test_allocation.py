"""Allocation arithmetic: exact budgets, the paper's shapes, digit notation, depth transfer, spec files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mola_search.allocation import (
    SCHEMA_VERSION,
    SHAPES,
    AllocationSpec,
    block_sizes,
    check_depth,
    load_spec,
    load_spec_with_metadata,
    parse_counts,
    parse_digits,
    resample_depth,
    resolve_allocation,
    round_to_budget,
    save_spec,
    shape_allocation,
    to_mola_flags,
)
from mola_search.errors import UserError

PAPER = {  # 32 layers, budget 160 (MoLA paper, Table 1 notation)
    "triangle": [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8,
    "inverted_triangle": [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8,
    "hourglass": [8] * 8 + [2] * 8 + [2] * 8 + [8] * 8,
    "rectangle": [5] * 32,
    "diamond": [2] * 8 + [8] * 8 + [8] * 8 + [2] * 8,
}


@contextmanager
def _one_line_error(match: str) -> Iterator[None]:
    """Expect a UserError matching `match` whose message is a single line (the CLIs print it as is)."""
    with pytest.raises(UserError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def _is_non_decreasing(values: list[int]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:]))


def _is_non_increasing(values: list[int]) -> bool:
    return _is_non_decreasing(values[::-1])


# --------------------------------------------------------------------------- round_to_budget


def _bound_grid():
    rng = random.Random(2402)
    for num_layers in (1, 3, 4, 7, 30, 32):
        for low in (0, 1, 2):
            for high in (None, low, low + 3, 8):
                most = None if high is None else high * num_layers
                budgets = {low * num_layers, low * num_layers + 1, 5 * num_layers}
                if most is not None:
                    budgets |= {most, most - 1}
                for budget in sorted(budgets):
                    if budget < low * num_layers or (most is not None and budget > most):
                        continue
                    weights = [rng.random() * rng.choice((0, 1, 1, 10)) for _ in range(num_layers)]
                    yield num_layers, budget, low, high, weights


@pytest.mark.parametrize("num_layers,budget,low,high,weights", list(_bound_grid()))
def test_round_to_budget_is_exact_and_within_bounds(num_layers, budget, low, high, weights):
    counts = round_to_budget(weights, budget, low, high)
    assert len(counts) == num_layers
    assert sum(counts) == budget
    assert all(isinstance(c, int) for c in counts)
    assert all(c >= low for c in counts)
    assert high is None or all(c <= high for c in counts)
    # A heavier layer never gets fewer experts than a lighter one (scalar bounds).
    for i in range(num_layers):
        for j in range(num_layers):
            if weights[i] > weights[j]:
                assert counts[i] >= counts[j]
    assert round_to_budget(weights, budget, low, high) == counts


def test_round_to_budget_is_within_one_of_the_proportional_share_when_unbounded():
    rng = random.Random(7)
    for _ in range(50):
        weights = [rng.random() for _ in range(rng.randint(1, 40))]
        budget = rng.randint(0, 300)
        counts = round_to_budget(weights, budget, 0)
        total = sum(weights)
        assert sum(counts) == budget
        assert all(abs(c - budget * w / total) < 1 for c, w in zip(counts, weights))


def test_round_to_budget_respects_per_layer_bounds():
    rng = random.Random(11)
    for _ in range(40):
        num_layers = rng.randint(1, 12)
        lows = [rng.randint(0, 3) for _ in range(num_layers)]
        highs = [low + rng.randint(0, 4) for low in lows]
        budget = rng.randint(sum(lows), sum(highs))
        weights = [rng.random() for _ in range(num_layers)]
        counts = round_to_budget(weights, budget, lows, highs)
        assert sum(counts) == budget
        assert all(lo <= c <= hi for c, lo, hi in zip(counts, lows, highs))


def test_round_to_budget_known_values():
    assert round_to_budget([1, 1, 2], 8) == [2, 2, 4]
    assert round_to_budget([0.1, 0.2, 0.7], 10) == [1, 2, 7]
    assert round_to_budget([0.1] * 10, 10) == [1] * 10  # no float drift
    assert round_to_budget([1, 1, 1], 4, 0) == [2, 1, 1]  # tie -> lower index
    assert round_to_budget([1, 1, 1], 4, 0, priority=[0, 0, 1]) == [1, 1, 2]
    assert round_to_budget([100, 1, 1], 12, 1, 8) == [8, 2, 2]  # clipped at max, rest shared


def test_round_to_budget_zero_weights_are_even():
    assert round_to_budget([0, 0, 0, 0], 10) == [3, 3, 2, 2]
    assert round_to_budget([0.0] * 5, 5, 1) == [1] * 5
    # Saturated positive layers: the remainder goes evenly to the zero-weight ones.
    assert round_to_budget([1, 0, 0], 10, 1, 4) == [4, 3, 3]


def test_round_to_budget_infeasible_message():
    with _one_line_error(r"^budget 20 is infeasible for 32 layers with 1\.\.8 experts per layer: "
                         r"choose a budget in \[32, 256\]$"):
        round_to_budget([1.0] * 32, 20, 1, 8)
    with _one_line_error(r"choose a budget in \[32, 256\]"):
        round_to_budget([1.0] * 32, 257, 1, 8)
    with _one_line_error(r"choose a budget >= 64"):
        round_to_budget([1.0] * 32, 10, 2)
    with _one_line_error(r"per-layer bounds: choose a budget in \[3, 6\]"):
        round_to_budget([1, 1], 7, [1, 2], [2, 4])


@pytest.mark.parametrize("weights,budget,kwargs,match", [
    ([], 3, {}, "zero layers"),
    ([1, -1], 3, {}, "weight 1 is -1"),
    ([1, float("nan")], 3, {}, "weight 1 is nan"),
    ([1, "2"], 3, {}, "weight 1 is '2'"),
    ([1, 1], 3.0, {}, "budget must be an integer"),
    ([1, 1], 3, {"min_count": [1]}, "min_count has 1 values for 2 layers"),
    ([1, 1], 3, {"min_count": 3, "max_count": 2}, "min_count 3 exceeds max_count 2"),
    ([1, 1], 3, {"min_count": -1}, "use a non-negative integer"),
    ([1, 1], 3, {"max_count": 1.5}, "max_count is 1.5"),
    ([1, 1], 3, {"max_count": [2, 2.5]}, "max_count for layer 1 is 2.5"),
])
def test_round_to_budget_rejects_bad_input(weights, budget, kwargs, match):
    with _one_line_error(match):
        round_to_budget(weights, budget, **kwargs)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_reproduce_the_paper_at_32_layers_budget_160(shape):
    assert shape_allocation(shape, 32, 160) == PAPER[shape]


def test_shapes_are_the_documented_five():
    assert SHAPES == ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")


def test_block_split_gives_the_first_blocks_the_extra_layers():
    assert block_sizes(30, 4) == [8, 8, 7, 7]
    assert block_sizes(33, 4) == [9, 8, 8, 8]
    assert block_sizes(32, 4) == [8, 8, 8, 8]


def test_shapes_at_30_layers_keep_their_profile():
    assert shape_allocation("rectangle", 30, 150) == [5] * 30
    for budget in (60, 100, 150, 151, 200):
        up = shape_allocation("inverted_triangle", 30, budget)
        down = shape_allocation("triangle", 30, budget)
        assert sum(up) == sum(down) == budget
        assert _is_non_decreasing(up), up
        assert _is_non_increasing(down), down


@pytest.mark.parametrize("num_layers", [4, 5, 9, 16, 22, 24, 28, 30, 32, 33, 40, 80])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_hit_any_feasible_budget(shape, num_layers):
    for budget in (num_layers, 3 * num_layers + 1, 5 * num_layers, 8 * num_layers - 1):
        counts = shape_allocation(shape, num_layers, budget, 1, 8)
        assert sum(counts) == budget and all(1 <= c <= 8 for c in counts)
        if shape == "hourglass":  # valley: down then up
            bottom = counts.index(min(counts))
            assert _is_non_increasing(counts[:bottom + 1]) and _is_non_decreasing(counts[bottom:])
        if shape == "diamond":  # peak: up then down
            top = counts.index(max(counts))
            assert _is_non_decreasing(counts[:top + 1]) and _is_non_increasing(counts[top:])


def test_shape_names_are_forgiving_about_case_and_dashes():
    assert shape_allocation("Inverted-Triangle", 32, 160) == PAPER["inverted_triangle"]


def test_unknown_shape_lists_the_valid_ones():
    with _one_line_error(r"unknown shape 'pyramid': use one of triangle, inverted_triangle, "
                         r"hourglass, rectangle, diamond"):
        shape_allocation("pyramid", 32, 160)


def test_shape_needs_a_layer_per_block():
    with _one_line_error("need an integer >= 4"):
        shape_allocation("triangle", 3, 12)


def test_shape_with_infeasible_budget():
    with _one_line_error(r"budget 20 is infeasible for 32 layers with 1\.\.8 experts per layer"):
        shape_allocation("triangle", 32, 20, 1, 8)


# --------------------------------------------------------------------------- notation


def test_parse_digits_matches_the_paper():
    assert parse_digits("2468", 32) == PAPER["inverted_triangle"]
    assert parse_digits("8228", 32) == PAPER["hourglass"]
    assert parse_digits("5", 3) == [5, 5, 5]
    assert parse_digits("2468", 30) == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7


@pytest.mark.parametrize("notation,num_layers,match", [
    ("", 32, "not a string of digits"),
    ("24a8", 32, "not a string of digits"),
    ("2408", 32, "has a 0"),
    ("2468", 3, "need an integer >= 4"),
])
def test_parse_digits_rejects_bad_notation(notation, num_layers, match):
    with _one_line_error(match):
        parse_digits(notation, num_layers)


def test_parse_counts_accepts_comma_lists_and_digits():
    assert parse_counts("2, 2,4,8", 4) == [2, 2, 4, 8]
    assert parse_counts("12,1,1", 3) == [12, 1, 1]
    assert parse_counts("2468", 32) == PAPER["inverted_triangle"]


@pytest.mark.parametrize("text,match", [
    ("2,2,4", "has 3 counts but the model has 4 layers"),
    ("2,0,4,4", "count 1 of '2,0,4,4' is '0'"),
    ("2,x,4,4", "count 1 of '2,x,4,4' is 'x'"),
    ("2,,4,4", "count 1"),
])
def test_parse_counts_rejects_bad_lists(text, match):
    with _one_line_error(match):
        parse_counts(text, 4)


# --------------------------------------------------------------------------- resample_depth


@pytest.mark.parametrize("shape", SHAPES)
def test_resample_to_the_same_depth_is_the_identity(shape):
    counts = PAPER[shape]
    assert resample_depth(counts, 32) == counts
    assert resample_depth(counts, 32, budget=160) == counts


def test_resample_identity_for_random_allocations():
    rng = random.Random(3)
    for _ in range(20):
        counts = [rng.randint(1, 8) for _ in range(rng.randint(1, 40))]
        assert resample_depth(counts, len(counts)) == counts


def test_resample_keeps_an_exact_budget_and_the_profile():
    counts = PAPER["inverted_triangle"]
    default = resample_depth(counts, 30)
    assert sum(default) == 150  # 160 * 30 / 32
    assert _is_non_decreasing(default)
    for budget in (30, 100, 150, 151, 240):
        moved = resample_depth(counts, 30, budget, 1, 8)
        assert len(moved) == 30 and sum(moved) == budget
        assert _is_non_decreasing(moved), moved
        assert all(1 <= c <= 8 for c in moved)
    assert _is_non_increasing(resample_depth(PAPER["triangle"], 22))
    assert resample_depth(PAPER["rectangle"], 24) == [5] * 24


def test_resample_up_and_down_in_depth():
    assert sum(resample_depth([2, 4, 6, 8], 32)) == 160
    assert resample_depth([2] * 8 + [8] * 8, 2) == [2, 8]


def test_resample_default_budget_rounds_half_up():
    assert sum(resample_depth([1, 2], 3)) == 5  # 3 * 3 / 2 = 4.5


# --------------------------------------------------------------------------- AllocationSpec


def _spec() -> AllocationSpec:
    return AllocationSpec.build(PAPER["inverted_triangle"], top_k=2, rank=8, source="inverted_triangle")


def test_build_broadcasts_and_exposes_depth_and_budget():
    spec = _spec()
    assert spec.num_layers == 32 and spec.budget == 160
    assert spec.top_k == (2,) * 32 and spec.rank == (8,) * 32
    assert isinstance(spec.experts, tuple)
    assert AllocationSpec([2, 2], [1, 2], [4, 8]) == AllocationSpec((2, 2), (1, 2), (4, 8))


@pytest.mark.parametrize("experts,top_k,rank,match", [
    ((2, 1, 2), 2, 8, r"^layer 1: top_k 2 is larger than its 1 expert\(s\); "
                      r"use top_k <= the layer's expert count$"),
    ((2, 2), (2,), 8, "top_k has 1 values but experts has 2"),
    ((2, 2), 2, (8, 8, 8), "rank has 3 values but experts has 2"),
    ((), 2, 8, "no layers"),
    ((2, 0), 1, 8, "experts for layer 1 is 0"),
    ((2, 2.0), 1, 8, "experts for layer 1 is 2.0"),
    ((2, 2), 0, 8, "top_k for layer 0 is 0"),
    ((2, 2), 2, (8, True), "rank for layer 1 is True"),
    ((2, 2), 2, "8", "rank must be a sequence"),
])
def test_spec_validation(experts, top_k, rank, match):
    with _one_line_error(match):
        AllocationSpec.build(experts, top_k, rank)


def test_spec_json_round_trip_with_metadata(tmp_path: Path):
    spec = _spec()
    path = save_spec(spec, tmp_path / "runs" / "best.json", score=0.81, model="SmolLM2-135M", task="sst2")
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["num_layers"] == 32 and data["budget"] == 160 and data["score"] == 0.81
    assert load_spec(path) == spec
    loaded, metadata = load_spec_with_metadata(path)
    assert loaded == spec
    assert metadata == {"score": 0.81, "model": "SmolLM2-135M", "task": "sst2"}
    assert AllocationSpec.from_dict(spec.to_dict()) == spec
    spec.to_json(tmp_path / "plain.json")
    assert AllocationSpec.load_spec(tmp_path / "plain.json") == spec
    assert not list(tmp_path.glob("**/*.tmp"))


def test_save_spec_refuses_clashing_or_unserialisable_metadata(tmp_path: Path):
    with _one_line_error("metadata key\\(s\\) budget would overwrite"):
        save_spec(_spec(), tmp_path / "a.json", budget=3)
    with _one_line_error("not JSON-serialisable"):
        save_spec(_spec(), tmp_path / "a.json", score=object())
    assert not (tmp_path / "a.json").exists()


def test_from_dict_accepts_scalar_top_k_and_rank_and_missing_source():
    spec = AllocationSpec.from_dict({"schema_version": 1, "experts": [2, 4], "top_k": 2, "rank": 4})
    assert spec == AllocationSpec((2, 4), (2, 2), (4, 4), "custom")


def _valid_dict() -> dict:
    return _spec().to_dict()


@pytest.mark.parametrize("change,match", [
    ({"schema_version": 2}, "schema_version 2, newer than the 1"),
    ({"schema_version": "1"}, "schema_version '1'"),
    ({"schema_version": 0}, "schema_version 0"),
    ({"experts": "2468"}, "'experts' must be a list"),
    ({"experts": [2, "4"]}, "experts for layer 1 is '4'"),
    ({"top_k": [2.5] * 32}, "top_k for layer 0 is 2.5"),
    ({"rank": None}, "'rank' must be a list"),
    ({"budget": 100}, "says budget 100 but its experts give 160"),
    ({"num_layers": 30}, "says num_layers 30 but its experts give 32"),
    ({"source": 3}, "source must be a string"),
])
def test_from_dict_rejects_bad_fields(change, match):
    with _one_line_error(match):
        AllocationSpec.from_dict({**_valid_dict(), **change})


@pytest.mark.parametrize("key", ["schema_version", "experts", "top_k", "rank"])
def test_from_dict_names_the_missing_key(key):
    data = _valid_dict()
    del data[key]
    with _one_line_error(f"missing {key}"):
        AllocationSpec.from_dict(data)


def test_load_spec_file_errors(tmp_path: Path):
    with _one_line_error("does not exist"):
        load_spec(tmp_path / "nope.json")
    with _one_line_error("is a directory"):
        load_spec(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with _one_line_error("is not valid JSON"):
        load_spec(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with _one_line_error("must be a JSON object, got list"):
        load_spec(tmp_path / "list.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with _one_line_error("not UTF-8"):
        load_spec(tmp_path / "binary.json")


def test_check_depth():
    check_depth(_spec(), 32)
    with _one_line_error(r"^allocation has 32 layers but the model has 30; resample it with .* "
                         r"or pass a spec for 30 layers$"):
        check_depth(_spec(), 30)


def test_mola_flags():
    spec = AllocationSpec.build([2, 2, 4, 8], top_k=[1, 2, 2, 2], rank=8)
    # --lora_target_modules is required in practice: without it the official script (fire 0.5.0) turns its
    # default target string into single characters once --number_experts arrives as a tuple
    expected = ("--number_experts 2,2,4,8 --top_k 1,2,2,2 --lora_r 8,8,8,8 "
                "--lora_target_modules q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj")
    assert to_mola_flags(spec) == expected
    assert spec.to_mola_flags() == expected
    assert to_mola_flags(_spec()).startswith("--number_experts " + ",".join(["2"] * 8 + ["4"] * 8))


# --------------------------------------------------------------------------- resolve_allocation


def test_resolve_shape_scales_to_the_budget():
    spec = resolve_allocation("inverted_triangle", 32, 160, top_k=2, rank=4)
    assert spec.experts == tuple(PAPER["inverted_triangle"]) and spec.rank == (4,) * 32
    assert spec.source == "inverted_triangle"
    assert resolve_allocation("rectangle", 30, 90).experts == (3,) * 30


def test_resolve_digits_and_comma_lists():
    assert resolve_allocation("8228", 32, 160).experts == tuple(PAPER["hourglass"])
    assert resolve_allocation("2,4,6,8", 4, 20).experts == (2, 4, 6, 8)
    with _one_line_error("layer 3 has 8 experts but 1..6 are allowed"):
        resolve_allocation("2,4,6,8", 4, 20, max_count=6)


def test_resolve_spec_file(tmp_path: Path):
    path = save_spec(AllocationSpec.build([2, 4, 6, 8], top_k=1, rank=16), tmp_path / "s.json")
    spec = resolve_allocation(str(path), 4, 999, top_k=2, rank=8)
    assert spec.experts == (2, 4, 6, 8) and spec.top_k == (1,) * 4 and spec.rank == (16,) * 4
    with _one_line_error("allocation has 4 layers but the model has 5"):
        resolve_allocation(str(path), 5, 20)
    with _one_line_error("does not exist"):
        resolve_allocation(str(tmp_path / "missing.json"), 4, 20)


def test_resolve_rejects_anything_else():
    with _one_line_error(r"cannot read allocation 'pyramid': use a shape \(triangle, "):
        resolve_allocation("pyramid", 32, 160)
    with _one_line_error("top_k 2 is larger than its 1 expert"):
        resolve_allocation("1,2", 2, 3)


# --------------------------------------------------------------------------- packaging


def test_allocation_does_not_import_torch():
    code = "import sys, mola_search.allocation; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr


def test_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    weights = np.array([0.1, 0.2, 0.7])
    assert round_to_budget(weights, np.int64(10), np.int64(1)) == [1, 2, 7]
    spec = AllocationSpec.build(np.array([2, 4]), top_k=np.int64(2), rank=8)
    assert spec.experts == (2, 4) and type(spec.experts[0]) is int and spec.top_k == (2, 2)
