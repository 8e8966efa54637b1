"""One-shot allocation search: masked sub-networks, supernet sampling, Kendall tau, the cheap signals,
and a whole `--strategy one-shot` study on a tiny model."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import DATA_DIR, needs_data
from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError
from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.models import tiny_llama


def _supernet(max_experts: int = 4, num_layers: int = 4, seed: int = 3) -> tuple[MoLAModel, torch.nn.Module]:
    base = tiny_llama(num_layers=num_layers)
    pristine = copy.deepcopy(base)
    spec = AllocationSpec.build([max_experts] * num_layers, 2, 4)
    return MoLAModel(base, MoLAConfig.from_spec(spec, lora_dropout=0.0, init_seed=seed)), pristine


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # some padding, so the token mask is exercised
    return {"input_ids": ids, "attention_mask": mask}


def test_masked_supernet_equals_a_standalone_model_with_the_same_first_experts() -> None:
    supernet, pristine = _supernet()
    with torch.no_grad():  # trained-looking weights: every expert contributes
        gen = torch.Generator().manual_seed(1)
        for layer in supernet.mola_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
            layer.router.add_(torch.randn(layer.router.shape, generator=gen))
    sub = AllocationSpec.build([2, 4, 1, 3], [2, 2, 1, 1], 4)
    standalone = MoLAModel(pristine, MoLAConfig.from_spec(sub, lora_dropout=0.0, init_seed=3))
    # Common random numbers: the standalone model's initial A and router ARE the supernet's first experts'.
    for name, layer in standalone.mola_layers.items():
        big = supernet.mola_layers[name]
        n = layer.num_experts
        assert torch.equal(layer.lora_A.detach(), big.lora_A[:n].detach()), name
    with torch.no_grad():
        for name, layer in standalone.mola_layers.items():
            big, n = supernet.mola_layers[name], layer.num_experts
            layer.lora_B.copy_(big.lora_B[:, :n])
            layer.router.copy_(big.router[:n])
    supernet.eval(), standalone.eval()
    batch = _inputs()
    with supernet.allocation(sub):
        masked = supernet(**batch).logits
    alone = standalone(**batch).logits
    assert torch.equal(masked, alone)
    full = supernet(**batch).logits  # every expert again after the block
    assert not torch.allclose(full, alone)


def test_training_a_sub_network_moves_only_its_experts_and_balances_over_them() -> None:
    supernet, _ = _supernet()
    with torch.no_grad():
        for layer in supernet.mola_layers.values():
            layer.lora_B.normal_(std=0.1)
    sub = AllocationSpec.build([1, 2, 3, 4], [1, 2, 2, 2], 4)
    supernet.train()
    supernet.use_allocation(sub)
    out = supernet(**_inputs())
    (out.logits.float().pow(2).mean() + supernet.auxiliary_loss()).backward()
    for layer in supernet.mola_layers.values():
        n = sub.experts[layer.layer_index]
        assert layer.lora_A.grad[n:].abs().sum() == 0 and layer.router.grad[n:].abs().sum() == 0
        assert layer.lora_B.grad[:, n:].abs().sum() == 0
        assert layer.lora_A.grad[:n].abs().sum() > 0
    sizes = {t.layer: t.selected.numel() for t in supernet.state.balance_terms}
    assert sizes == {j: sub.experts[j] for j in range(4)}


def test_sub_networks_outside_the_supernet_are_refused() -> None:
    supernet, _ = _supernet(max_experts=3)
    with pytest.raises(UserError, match="layer 1 5 experts"):
        supernet.use_allocation(AllocationSpec.build([3, 5, 1, 1], 1, 4))
    with pytest.raises(UserError, match="rank"):
        supernet.use_allocation(AllocationSpec.build([3, 3, 1, 1], 1, 8))


# ------------------------------------------------------------------------------------------ sampling


def test_sandwich_steps_train_the_extremes_and_draws_at_the_budget() -> None:
    from mola_search.search.space import load_space
    from mola_search.search.strategies.oneshot.supernet import Sandwich

    space = load_space("blocks")
    sandwich = Sandwich(space, num_layers=8, budget=30, seed=0)
    drawn = set()
    for step in range(60):
        spec = sandwich.for_step(step)
        if step % 4 == 0:
            assert spec.experts == (8,) * 8 and spec.top_k == (2,) * 8
        elif step % 4 == 1:
            assert spec.experts == (1,) * 8 and spec.top_k == (1,) * 8
        else:
            assert sum(spec.experts) == 30 and all(1 <= e <= 8 for e in spec.experts)
            assert all(k == min(2, e) for k, e in zip(spec.top_k, spec.experts))
            drawn.add(spec.experts)
    assert len(drawn) > 5  # drawn, not one fixed allocation
    one, two = Sandwich(space, 8, 30, seed=0), Sandwich(space, 8, 30, seed=0)
    assert [one.for_step(s).experts for s in range(12)] == [two.for_step(s).experts for s in range(12)]


def test_a_space_without_max_experts_cannot_have_a_supernet() -> None:
    from mola_search.search.space import make_space
    from mola_search.search.strategies.oneshot.supernet import Sandwich

    with pytest.raises(UserError, match="max_experts"):
        Sandwich(make_space("blocks", max_experts=None), 8, 30, 0)


# ------------------------------------------------------------------------------------------ trust


def test_kendall_tau_on_hand_made_rankings() -> None:
    from mola_search.stats.rank import kendall_tau

    assert kendall_tau([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])["tau"] == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])["tau"] == pytest.approx(-1.0)
    # one swapped neighbour pair among 4 items: 5 concordant, 1 discordant pair -> (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])["tau"] == pytest.approx(4 / 6)
    perfect = kendall_tau(list(range(8)), [2 * x for x in range(8)])
    assert perfect["low"] == pytest.approx(1.0) and perfect["high"] == pytest.approx(1.0) and perfect["n"] == 8
    few = kendall_tau([1, 2, 3], [1, 2, 3])
    assert few["tau"] == pytest.approx(1.0) and math.isnan(few["low"])
    noisy = kendall_tau([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])  # tau 0.6 but only 6 allocations
    assert noisy["tau"] == pytest.approx(0.6) and noisy["low"] < 0.6 < noisy["high"]
    assert kendall_tau([1, float("nan"), 3, 4], [1, 2, 3, 4])["n"] == 3


def test_the_verdict_follows_the_interval() -> None:
    from mola_search.search.strategies.oneshot.trust import Trust

    agree = Trust(trial_fidelity={"tau": 0.7, "low": 0.3, "high": 0.9, "n": 12})
    assert agree.trustworthy and agree.recommendation == "one-shot" and "usable" in agree.line()
    unsure = Trust(trial_fidelity={"tau": 0.3, "low": -0.1, "high": 0.6, "n": 12})
    assert unsure.trustworthy is False and unsure.recommendation == "standalone"
    assert "not trustworthy" in unsure.line() and "--strategy standalone" in unsure.line()
    few = Trust(trial_fidelity={"tau": 1.0, "low": math.nan, "high": math.nan, "n": 3})
    assert few.trustworthy is False and "need 4" in few.line()
    assert Trust().trustworthy is None


def test_trust_round_trips_through_oneshot_json(tmp_path: Path) -> None:
    from mola_search.search.strategies.oneshot.trust import Trust
    from mola_search.search.study import StudyFolder

    trust = Trust(trial_fidelity={"tau": 0.2, "low": math.nan, "high": math.nan, "n": 3},
                  pairs=[{"experts": [2, 3], "origin": "oneshot:top1", "oneshot": -0.5, "standalone": -0.6}])
    StudyFolder(tmp_path).write_oneshot(trust.to_dict())
    raw = json.loads((tmp_path / "oneshot.json").read_text())
    assert raw["trial_fidelity"]["low"] is None and raw["recommendation"] == "standalone"
    back = Trust.from_dict(StudyFolder(tmp_path).read_oneshot())
    assert back.pairs == trust.pairs and math.isnan(back.trial_fidelity["low"]) and back.line() == trust.line()


def test_checks_are_the_top_then_evenly_spread_ranks_without_trained_ones() -> None:
    from mola_search.search.strategies.oneshot.trust import check_seeds

    specs = [AllocationSpec.build([e, 10 - e], 1, 4) for e in range(1, 10)]
    ranked = [(s, -i / 10) for i, s in enumerate(specs)] + [(specs[0], -5.0)]  # a duplicate, scored lower
    picked = check_seeds(ranked, top_n=2, spread=3, skip=[specs[5]])
    # the rest after the top 2 and the skipped rank 6: ranks 3, 4, 5, 7, 8, 9; three evenly spaced: first,
    # middle (position round(2.5) = 2), last
    assert [s.origin for s in picked] == ["oneshot:top1", "oneshot:top2", "oneshot:rank3", "oneshot:rank5",
                                          "oneshot:rank9"]
    assert [s.spec for s in picked] == [specs[0], specs[1], specs[2], specs[4], specs[8]]
    assert all(s.spec != specs[5] for s in picked)


# ------------------------------------------------------------------------------------------ signals


def test_signals_become_allocations_at_the_budget() -> None:
    from mola_search.search.strategies.oneshot.signals import router_usage, signal_spec

    stats = [{"layer": 0, "share": [0.25, 0.25, 0.25, 0.25]}, {"layer": 0, "share": [0.5, 0.5, 0.0, 0.0]},
             {"layer": 1, "share": [1.0, 0.0, 0.0, 0.0]}, {"layer": 2, "share": [0.0, 0.0, 0.0, 0.0]}]
    usage = router_usage(stats, 3)
    assert usage == pytest.approx([3.0, 1.0, 0.0])  # exp(entropy): 4 and 2 effective experts -> mean 3
    spec = signal_spec("router_usage", [3.0, 1.0, 0.0], budget=12, min_experts=1, max_experts=8, top_k=2, rank=8)
    assert sum(spec.experts) == 12 and spec.experts[0] > spec.experts[1] >= spec.experts[2] >= 1
    assert spec.top_k == tuple(min(2, e) for e in spec.experts)


@pytest.mark.slow
def test_saliency_is_the_base_models_and_leaves_the_model_as_it_was(tokenizer) -> None:
    from mola_search.search.strategies.oneshot.signals import redundancy, saliency
    from mola_search.tasks import Example

    supernet, _ = _supernet()
    with torch.no_grad():
        for layer in supernet.mola_layers.values():
            layer.lora_B.normal_(std=1.0)  # a trained adapter: saliency must not see it
    examples = [Example(prompt=f"Is {i} even? Answer:", choices=(" yes", " no"), label=i % 2) for i in range(8)]
    before = {n: p.requires_grad for n, p in supernet.named_parameters()}
    scores = saliency(supernet, tokenizer, examples, cutoff_len=32, batches=2, batch_size=4)
    assert len(scores) == 4 and all(s > 0 for s in scores)
    assert {n: p.requires_grad for n, p in supernet.named_parameters()} == before
    assert all(p.grad is None for p in supernet.parameters())
    with torch.no_grad():
        for layer in supernet.mola_layers.values():
            layer.lora_B.zero_()
    assert saliency(supernet, tokenizer, examples, cutoff_len=32, batches=2, batch_size=4) == pytest.approx(scores)
    spread = redundancy(supernet, 4)  # B = 0: every expert's update is 0, so no layer has diverse experts
    assert spread == pytest.approx([0.0] * 4)


# ------------------------------------------------------------------------------------------ a whole study

STUDY = ["--task", "mrpc", "--model", "tiny-llama-L4", "--data-dir", DATA_DIR, "--executor", "local",
         "--strategy", "one-shot", "--oneshot-trials", "16", "--oneshot-checks", "3", "--oneshot-eval-examples", "16",
         "--max-train-examples", "16", "--max-eval-examples", "16", "--batch-size", "8", "--micro-batch-size", "8",
         "--pilot-seeds", "2", "--finalists", "1", "--finalist-seeds", "2", "--finalist-train-examples", "16",
         "--finalist-eval-examples", "16"]


@pytest.mark.slow
@needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_one_shot_study_scores_checks_finalises_and_resumes_without_redoing_anything(tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    from mola_search.cli.common import run_main
    from mola_search.cli.search import main
    from mola_search.search.strategies.oneshot.trust import Trust
    from mola_search.search.study import StudyFolder

    def read_trust(folder):
        return Trust.from_dict(StudyFolder(folder).read_oneshot())

    folder = tmp_path / "study"
    assert run_main("mola-search", main, [*STUDY, "--out", str(folder)]) == 0
    for name in ("supernet/adapter/adapter_model.safetensors", "supernet/log.json", "oneshot.csv", "oneshot.json",
                 "trials.csv", "finalists.csv", "best_allocation.json", "summary.md"):
        assert (folder / name).is_file(), name
    log = json.loads((folder / "supernet" / "log.json").read_text())
    assert log["steps"] == 4 * log["trial_steps"] and len(log["sampled"]) == log["steps"]
    storage = f"sqlite:///{folder / 'study.db'}"
    name = json.loads((folder / "study.json").read_text())["study_name"]
    oneshot = optuna.load_study(study_name=f"{name}-oneshot", storage=storage)
    scored = [t for t in oneshot.get_trials(states=(TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs]
    assert len(scored) == 16
    origins = [t.user_attrs["origin"] for t in oneshot.trials[:9]]  # seeds first: pilot shapes, paper, signals
    assert origins[:3] == ["seed:triangle", "seed:inverted_triangle", "seed:rectangle"]
    assert {"seed:router_usage", "seed:redundancy", "seed:saliency"} <= {t.user_attrs["origin"] for t in oneshot.trials}
    main_study = optuna.load_study(study_name=name, storage=storage)
    trials = main_study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)  # a one-shot study prunes no check
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert sum(1 for t in trained if t.user_attrs.get("pilot")) == 6  # 3 shapes x 2 seeds
    trust = read_trust(folder)
    study_seed = [t for t in trained if t.user_attrs.get("train_seed", 0) == 0]
    assert trust.trial_fidelity["n"] == len(study_seed) == len(trust.pairs) >= 8
    # The one-shot favourite is trained standalone and retrained as a finalist: as `oneshot:top1`, or as the
    # pilot shape it coincides with (the pilot trained it already; the pilot shapes are finalists anyway).
    best_oneshot = max(scored, key=lambda t: t.value)
    top1 = next(p for p in trust.pairs if p["experts"] == best_oneshot.user_attrs["allocation"])
    assert top1["oneshot"] == best_oneshot.value
    pilot_shapes = {tuple(t.user_attrs["allocation"]) for t in trained if t.user_attrs.get("pilot")}
    if tuple(top1["experts"]) in pilot_shapes:
        assert top1["origin"].startswith("seed:")
    else:
        assert top1["origin"] == "oneshot:top1"
    finalists = list(csv.DictReader((folder / "finalists.csv").open()))
    row = next(f for f in finalists if [int(e) for e in f["allocation"].split(",")] == top1["experts"])
    assert row["origin"] == top1["origin"] and row["state"] == "COMPLETE"
    summary = (folder / "summary.md").read_text()
    assert "One-shot search" in summary and "Kendall tau" in summary

    before = (len(oneshot.trials), len(main_study.trials), (folder / "supernet" / "log.json").stat().st_mtime)
    assert run_main("mola-search", main, ["--resume", str(folder)]) == 0
    oneshot = optuna.load_study(study_name=f"{name}-oneshot", storage=storage)
    main_study = optuna.load_study(study_name=name, storage=storage)
    assert (len(oneshot.trials), len(main_study.trials),
            (folder / "supernet" / "log.json").stat().st_mtime) == before


def test_one_shot_needs_the_mola_objective(tmp_path: Path, capsys) -> None:
    from mola_search.cli.common import run_main
    from mola_search.cli.search import main

    rc = run_main("mola-search", main, ["--task", "mrpc", "--model", "tiny-llama-L4", "--objective", "synthetic",
                                        "--strategy", "one-shot", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--strategy one-shot" in err and "--objective mola" in err, err
    assert not (tmp_path / "s").exists()
    rc = run_main("mola-search", main, ["--strategy", "two-shot", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "use one of standalone, one-shot" in err, err


def test_a_converged_sampler_does_not_stop_the_one_shot_scoring(tmp_path: Path, monkeypatch) -> None:
    """A sampler that proposes one point forever: each repeat is answered from the cache and the next proposal
    is drawn at random, so the scoring still reaches `oneshot_trials` distinct allocations."""
    import contextlib
    import types

    import optuna

    from mola_search.search.config import StudyConfig
    from mola_search.search.progress import Progress
    from mola_search.search.space import load_space
    from mola_search.search.strategies.oneshot import scoring, supernet as one
    from mola_search.search.study import StudyFolder
    from mola_search.train import run

    class Stuck(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return 0.5

    monkeypatch.setattr(scoring, "make_sampler", lambda name, seed: Stuck())
    current: dict[str, AllocationSpec] = {}

    @contextlib.contextmanager
    def allocation(spec):
        current["spec"] = spec
        yield

    model = types.SimpleNamespace(allocation=allocation)
    monkeypatch.setattr(run, "evaluate", lambda m, p, split: {"gold_logprob": -sum(
        (e - 4) ** 2 for e in current["spec"].experts) / 100.0, "accuracy": 0.5})
    net = one.Supernet(model, types.SimpleNamespace(splits={"validation": [None] * 8}), {})
    config = StudyConfig(task="mrpc", model="tiny-llama-L8", strategy="one-shot", oneshot_trials=12, pilot=False)
    progress = Progress(1)
    handle = types.SimpleNamespace(config=config, folder=StudyFolder(tmp_path), space=load_space("blocks"),
                                   num_layers=8, budget=30, message=progress.message)
    study = scoring.score_allocations(handle, net, [])
    distinct = scoring.ranked_allocations(study)
    assert len(distinct) == 12
    origins = [t.user_attrs["origin"] for t in study.trials if "duplicate_of" not in t.user_attrs]
    assert origins[0] == "tpe" and origins.count("random") == 11  # the stuck point once, then random draws
