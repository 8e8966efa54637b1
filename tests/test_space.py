"""Search spaces: YAML validation, feasibility by construction, suggest == decode, exact encodings."""

from __future__ import annotations

import random

import optuna
import pytest

from mola_search.allocation import AllocationSpec, block_sizes, round_to_budget, shape_allocation
from mola_search.errors import UserError
from mola_search.search.space import (
    DEFAULT_SPACE,
    ENCODINGS,
    Fidelity,
    SearchSpace,
    make_space,
    builtin_space_names,
    builtin_space_path,
    load_space,
    per_layer_top_k,
)

PAPER_SHAPES = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")


def _random_params(space: SearchSpace, num_layers: int, rng: random.Random) -> dict[str, object]:
    """A random point of the space, with the corners (all 0, all 1) over-represented."""
    style = rng.random()
    params: dict[str, object] = {}
    for name in space.weight_names(num_layers):
        params[name] = 0.0 if style < 0.1 else 1.0 if style < 0.2 else rng.choice([0.0, rng.random()])
    if space.search_top_k:
        params["top_k"] = rng.choice(space.top_k_choices)
    if space.search_rank:
        params["rank"] = rng.choice(space.rank_choices)
    return params


def _spaces() -> list[SearchSpace]:
    return [make_space("blocks"), make_space("blocks", blocks=3, max_experts=None),
            make_space("per_layer", min_experts=2, max_experts=6),
            make_space("profile", knots=5, search_top_k=True, search_rank=True)]


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("name", builtin_space_names())
def test_committed_yaml_equals_the_embedded_builtin(name: str) -> None:
    loaded = SearchSpace.load(builtin_space_path(name))
    assert loaded == SearchSpace.builtin(name)
    assert loaded.name == name and loaded.encoding == name


def test_builtins_cover_each_encoding_and_the_default_resolves() -> None:
    assert set(builtin_space_names()) == set(ENCODINGS)
    assert DEFAULT_SPACE == "blocks"
    assert load_space(None) == SearchSpace.builtin("blocks")
    assert load_space("profile").knots == 4
    assert load_space(builtin_space_path("per_layer")) == SearchSpace.builtin("per_layer")
    assert SearchSpace.builtin("blocks").blocks == 4


def test_unknown_builtin_is_a_user_error() -> None:
    with pytest.raises(UserError, match="blocks, per_layer, profile"):
        SearchSpace.builtin("pyramid")
    with pytest.raises(UserError, match="blocks, per_layer, profile"):
        builtin_space_path("pyramid")


def test_to_dict_round_trips() -> None:
    space = make_space("profile", knots=6, search_rank=True, rank_choices=(2, 4),
                        fidelity=Fidelity(max_train_examples=None, epochs=2, rungs=(0.5, 1.0)))
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_load_refuses_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        SearchSpace.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoding: blocks\nblocks: [4\n")
    with pytest.raises(UserError, match="not valid YAML") as caught:
        SearchSpace.load(bad)
    assert "\n" not in str(caught.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- blocks\n")
    with pytest.raises(UserError, match="must be a mapping"):
        SearchSpace.load(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match="must be a mapping"):
        SearchSpace.load(empty)


@pytest.mark.parametrize(("raw", "message"), [
    ({"encoding": "blocks", "blokcs": 4}, "unknown search space key.*blokcs.*accepted keys are encoding, blocks"),
    ({"encoding": "pyramid"}, "unknown encoding 'pyramid': use one of blocks, per_layer, profile"),
    ({"blocks": 4}, "'encoding' is missing"),
    ({"encoding": "blocks", "blocks": "4"}, "blocks is '4': use an integer >= 1"),
    ({"encoding": "blocks", "blocks": 0}, "blocks is 0"),
    ({"encoding": "profile", "knots": 1}, "knots is 1: use an integer >= 2"),
    ({"encoding": "blocks", "min_experts": 0}, "min_experts is 0"),
    ({"encoding": "blocks", "min_experts": 4, "max_experts": 3}, "max_experts is 3: use an integer >= 4"),
    ({"encoding": "blocks", "top_k": 9}, "top_k is 9: use an integer >= 1 and <= 8"),
    ({"encoding": "blocks", "search_top_k": "yes"}, "search_top_k is 'yes': use true or false"),
    ({"encoding": "blocks", "rank_choices": []}, "rank_choices"),
    ({"encoding": "blocks", "rank_choices": [4, 4]}, "repeats"),
    ({"encoding": "blocks", "search_top_k": True, "top_k_choices": [1, 9]}, "top_k_choices is 9"),
    ({"encoding": "blocks", "fidelity": {"epoch": 1}}, "unknown fidelity key.*epoch.*max_train_examples"),
    ({"encoding": "blocks", "fidelity": {"rungs": [0.5, 0.25, 1.0]}}, "increasing"),
    ({"encoding": "blocks", "fidelity": {"rungs": [0.25, 0.5]}}, "ending at 1.0"),
    ({"encoding": "blocks", "fidelity": {"epochs": 0}}, "fidelity.epochs is 0"),
    ({"encoding": "blocks", "fidelity": {"max_steps": 0}}, "fidelity.max_steps is 0"),
    ({"encoding": "blocks", "fidelity": 3}, "fidelity must be a mapping"),
])
def test_from_dict_names_the_problem_and_what_is_accepted(raw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        SearchSpace.from_dict(raw, name="mine")
    assert str(caught.value).startswith("search space 'mine': ")
    assert "\n" not in str(caught.value)


def test_from_dict_accepts_yaml_shapes() -> None:
    space = SearchSpace.from_dict({"encoding": "blocks", "max_experts": None, "top_k_choices": [1, 2],
                                   "fidelity": {"epochs": 2, "rungs": [1]}})
    assert space.max_experts is None and space.top_k_choices == (1, 2)
    assert space.fidelity == Fidelity(epochs=2.0, rungs=(1.0,))


# ------------------------------------------------------------------------------------------ budget


def test_check_budget_reports_the_feasible_range() -> None:
    space = make_space("blocks", min_experts=2, max_experts=8)
    space.check_budget(30, 60)
    space.check_budget(30, 240)
    for budget in (59, 241):
        with pytest.raises(UserError) as caught:
            space.check_budget(30, budget)
        assert str(caught.value) == (f"budget {budget} is infeasible for 30 layers with 2..8 experts per layer: "
                                     f"choose a budget in [60, 240]")
    with pytest.raises(UserError, match="choose a budget >= 30"):
        make_space("per_layer", max_experts=None).check_budget(30, 29)
    with pytest.raises(UserError, match="4 blocks but the model has 3 layers"):
        make_space("blocks").check_budget(3, 6)


# ------------------------------------------------------------------------------------------ parameters


def test_param_names_per_encoding() -> None:
    assert make_space("blocks").param_names(30) == ["w_block0", "w_block1", "w_block2", "w_block3"]
    assert make_space("profile", knots=3).param_names(30) == ["w_knot0", "w_knot1", "w_knot2"]
    per_layer = make_space("per_layer").param_names(12)
    assert per_layer[:2] == ["w_layer00", "w_layer01"] and len(per_layer) == 12
    assert sorted(per_layer) == per_layer  # zero padding: name order is depth order
    assert make_space("per_layer").param_names(120)[5] == "w_layer005"
    assert sorted(make_space("blocks", blocks=12).param_names(30)) == make_space("blocks", blocks=12).param_names(30)
    searched = make_space("blocks", search_top_k=True, search_rank=True)
    assert searched.param_names(30)[-2:] == ["top_k", "rank"]


@pytest.mark.parametrize("space", _spaces(), ids=lambda s: s.encoding)
def test_suggest_equals_decode_and_defines_every_parameter(space: SearchSpace) -> None:
    rng = random.Random(1)
    for _ in range(10):
        params = _random_params(space, 10, rng)
        trial = optuna.trial.FixedTrial(params)
        assert space.suggest(trial, 10, 40) == space.decode(params, 10, 40)
        assert sorted(trial.params) == sorted(space.param_names(10))


def test_suggest_in_a_real_study_records_decodable_params() -> None:
    space = make_space("blocks", search_top_k=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    specs = {}

    def objective(trial: optuna.Trial) -> float:
        specs[trial.number] = space.suggest(trial, 16, 64)
        return 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=5)
    for trial in study.trials:
        assert space.decode(trial.params, 16, 64) == specs[trial.number]


@pytest.mark.parametrize("space", _spaces(), ids=lambda s: s.encoding)
def test_every_point_is_feasible(space: SearchSpace) -> None:
    rng = random.Random(7)
    for num_layers, budget in ((5, 5 * space.min_experts), (10, 37), (30, 150), (32, 160)):
        if space.max_experts is not None and budget > num_layers * space.max_experts:
            continue
        for _ in range(20):
            spec = space.decode(_random_params(space, num_layers, rng), num_layers, budget)
            assert spec.budget == budget and spec.num_layers == num_layers
            assert min(spec.experts) >= space.min_experts
            assert space.max_experts is None or max(spec.experts) <= space.max_experts
            assert all(k <= n for k, n in zip(spec.top_k, spec.experts))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_all_zero_weights_are_an_even_split(encoding: str) -> None:
    space = make_space(encoding)
    params = {name: 0.0 for name in space.weight_names(10)}
    assert space.decode(params, 10, 50).experts == (5,) * 10
    assert sorted(space.decode(params, 10, 53).experts) == [5] * 7 + [6] * 3


def test_decode_refuses_parameters_of_another_space() -> None:
    with pytest.raises(UserError, match="lack 'w_block0'"):
        make_space("blocks").decode({"w_knot0": 1.0}, 8, 16)
    with pytest.raises(UserError, match="'w_block1' is 1.5"):
        make_space("blocks").decode({"w_block0": 1, "w_block1": 1.5, "w_block2": 0, "w_block3": 0}, 8, 16)
    with pytest.raises(UserError, match=r"searches top_k over \[1, 2, 3\]"):
        make_space("blocks", search_top_k=True).decode(
            {"w_block0": 1, "w_block1": 1, "w_block2": 0, "w_block3": 0, "top_k": 5}, 8, 16)


def test_searched_top_k_and_rank_are_applied_and_capped_per_layer() -> None:
    space = make_space("blocks", search_top_k=True, search_rank=True)
    params = {"w_block0": 0.0, "w_block1": 0.0, "w_block2": 0.0, "w_block3": 1.0, "top_k": 3, "rank": 16}
    spec = space.decode(params, 8, 16)
    assert spec.experts == (1, 1, 1, 1, 1, 1, 5, 5)
    assert spec.top_k == (1, 1, 1, 1, 1, 1, 3, 3)
    assert spec.rank == (16,) * 8
    assert per_layer_top_k([1, 2, 5], 2) == [1, 2, 2]


def test_layer_weights_expand_blocks_and_interpolate_knots() -> None:
    blocks = make_space("blocks").layer_weights({"w_block0": 0.1, "w_block1": 0.2, "w_block2": 0.3,
                                                  "w_block3": 0.4}, 30)
    assert block_sizes(30, 4) == [8, 8, 7, 7]
    assert blocks == [0.1] * 8 + [0.2] * 8 + [0.3] * 7 + [0.4] * 7
    profile = make_space("profile", knots=3).layer_weights({"w_knot0": 0.0, "w_knot1": 1.0, "w_knot2": 0.5}, 5)
    assert profile == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5])


# ------------------------------------------------------------------------------------------ encode


@pytest.mark.parametrize(("num_layers", "budget"), [(30, 150), (32, 160)])
@pytest.mark.parametrize("max_experts", [None, 8])
def test_blocks_encode_reproduces_the_paper_shapes_exactly(num_layers: int, budget: int,
                                                           max_experts: int | None) -> None:
    space = make_space("blocks", max_experts=max_experts, top_k=1)
    for shape in PAPER_SHAPES:
        experts = shape_allocation(shape, num_layers, budget, 1, max_experts)
        spec = AllocationSpec.build(experts, 1, 8)
        params, exact = space.encode(spec)
        assert exact, shape
        assert list(space.decode(params, num_layers, budget).experts) == experts
        assert all(0.0 <= value <= 1.0 for value in params.values())


def test_blocks_encode_of_the_paper_table_at_32_layers() -> None:
    space = make_space("blocks", top_k=2)
    triangle = AllocationSpec.build([8] * 8 + [6] * 8 + [4] * 8 + [2] * 8, 2, 8)
    params, exact = space.encode(triangle)
    assert exact and params == {"w_block0": 1.0, "w_block1": 0.75, "w_block2": 0.5, "w_block3": 0.25}


def test_blocks_encode_flags_a_non_blocky_allocation() -> None:
    space = make_space("blocks", top_k=1)
    spec = AllocationSpec.build([1, 5, 1, 5, 1, 5, 1, 5], 1, 8)
    params, exact = space.encode(spec)
    assert not exact
    assert space.decode(params, 8, 24).budget == 24


def test_per_layer_encode_reproduces_random_feasible_allocations() -> None:
    rng = random.Random(3)
    for _ in range(60):
        num_layers = rng.randint(1, 40)
        low = rng.randint(1, 3)
        high = rng.choice([None, low, low + 2, 8, 16])
        experts = [rng.randint(low, high or 20) for _ in range(num_layers)]
        space = make_space("per_layer", min_experts=low, max_experts=high, top_k=1)
        params, exact = space.encode(AllocationSpec.build(experts, 1, 8))
        assert exact
        assert list(space.decode(params, num_layers, sum(experts)).experts) == experts


def test_encode_recovers_searched_top_k_and_rank() -> None:
    space = make_space("per_layer", search_top_k=True, search_rank=True)
    experts = [1, 2, 3, 4]
    spec = AllocationSpec.build(experts, per_layer_top_k(experts, 3), 16)
    params, exact = space.encode(spec)
    assert exact and params["top_k"] == 3 and params["rank"] == 16
    _, exact = space.encode(AllocationSpec.build(experts, 1, 32))  # 32 is not a rank choice
    assert not exact
    _, exact = make_space("per_layer", top_k=2).encode(AllocationSpec.build(experts, 1, 8))
    assert not exact  # fixed top_k 2 cannot give top_k 1 on a 4-expert layer


def test_profile_encode_is_honest_about_exactness() -> None:
    space = make_space("profile", top_k=1)
    for shape in PAPER_SHAPES:
        spec = AllocationSpec.build(shape_allocation(shape, 30, 150, 1, 8), 1, 8)
        params, exact = space.encode(spec)
        decoded = space.decode(params, 30, 150)
        assert exact == (decoded.experts == spec.experts)
        assert sum(abs(a - b) for a, b in zip(decoded.experts, spec.experts)) <= 40  # a close fit
    rectangle = AllocationSpec.build([5] * 30, 1, 8)
    assert space.encode(rectangle)[1]
    ramp = AllocationSpec.build(round_to_budget([j + 1 for j in range(30)], 150, 1, 8), 1, 8)
    params, exact = space.encode(ramp)
    assert exact == (space.decode(params, 30, 150).experts == ramp.experts)
    assert sum(abs(a - b) for a, b in zip(space.decode(params, 30, 150).experts, ramp.experts)) <= 4


def test_encode_of_an_allocation_outside_the_bounds_is_not_exact() -> None:
    space = make_space("per_layer", max_experts=4)
    params, exact = space.encode(AllocationSpec.build([8, 8, 8, 8], 2, 8))
    assert not exact and set(params) == set(space.weight_names(4))
