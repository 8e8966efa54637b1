"""The one-shot supernet: one over-provisioned MoLA trained once, allocations scored as its sub-networks.

Call order (the `OneShot` strategy, after the pilot): `train_supernet` -> `signal_seeds` ->
`scoring.score_allocations` -> (the study trains `trust.check_seeds` standalone) -> `trust.Trust`.

* Every adapted module gets the space's `max_experts` experts. An allocation is the sub-network that
  uses the first N_l experts of every module in layer l (the router's softmax over those N_l logits,
  then top-k): `MoLAModel.use_allocation`, which computes exactly what a standalone model with those
  weights computes (tests/test_oneshot.py). Expert e starts from the generator keyed by (study seed,
  layer, module, e), so the supernet's experts start where every study-seed trial's experts start.
* Training: `supernet_factor` x the optimizer steps of one trial, on that many times the trial's
  training examples where the split has them. Each optimizer step trains one sub-network (`Sandwich`):
  steps 0, 4, 8, .. the largest (every module at max_experts, so every expert is trained), steps 1, 5, ..
  the smallest (min_experts everywhere), the others an allocation drawn uniformly from the search space
  at the budget. The balance loss is taken over the active experts only. Why 4x: a sub-network is
  trained on a quarter to a half of the steps a standalone trial gets, while its experts also serve
  every other sub-network; 4x gives each budget-respecting sub-network about half a trial's steps of
  its own and costs 4 trials, against the hundreds of trials the scores stand in for.
* Scoring: one validation pass per allocation with the mask, no training, in an Optuna study of its
  own ("<study name>-oneshot", same storage, sampler, space and seeds first), so an interrupted
  scoring resumes without scoring anything twice.

Everything here runs in the driver process, on `--device` (the supernet is one model; scoring is
hundreds of short forward passes that would not pay for a Ray task each).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mola_search.allocation import AllocationSpec, run_length
from mola_search.errors import UserError
from mola_search.search.progress import duration
from mola_search.search.seeds import Seed
from mola_search.search.space import SearchSpace, per_layer_top_k
from mola_search.search.study import Origin

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext


class Sandwich:
    """The sub-network each supernet optimizer step trains (the sandwich rule plus uniform draws)."""

    def __init__(self, space: SearchSpace, num_layers: int, budget: int, seed: int) -> None:
        if space.max_experts is None:
            raise UserError("the one-shot strategy needs `max_experts` in the search space (the supernet's "
                            "experts per module): set it in the space YAML")
        if space.search_rank:
            raise UserError("the one-shot strategy shares one rank across sub-networks: turn `search_rank` off "
                            "in the search space")
        self.space, self.num_layers, self.budget = space, num_layers, budget
        self.rng = random.Random(seed)

    def largest(self) -> AllocationSpec:
        return self._uniform(self.space.max_experts)

    def smallest(self) -> AllocationSpec:
        return self._uniform(self.space.min_experts)

    def draw(self) -> AllocationSpec:
        """A point of the space drawn uniformly, decoded to its allocation at the budget."""
        params: dict[str, Any] = {name: self.rng.random() for name in self.space.weight_names(self.num_layers)}
        if self.space.search_top_k:
            params["top_k"] = self.rng.choice(self.space.top_k_choices)
        return self.space.decode(params, self.num_layers, self.budget)

    def for_step(self, step: int) -> AllocationSpec:
        """Step 0, 4, 8, ..: the largest; 1, 5, ..: the smallest; the rest: drawn."""
        return (self.largest, self.smallest, self.draw, self.draw)[step % 4]()

    def _uniform(self, experts: int) -> AllocationSpec:
        counts = [experts] * self.num_layers
        return AllocationSpec.build(counts, per_layer_top_k(counts, self.space.top_k), self.space.rank)


@dataclass
class Supernet:
    model: Any            # MoLAModel with max_experts everywhere
    prepared: Any         # train.run.Prepared: tokenizer, splits (validation = the one-shot scoring set)
    log: dict[str, Any]   # what supernet/log.json holds


def train_supernet(study: "StudyContext", fidelity: Any) -> Supernet:
    """Train (or, when supernet/ holds a finished one, load) the supernet; saliency of the base is
    measured before training (the adapters add nothing then) and kept in the log."""
    from mola_search.mola import MoLAModel
    from mola_search.train.run import prepare

    plan = _plan(study, fidelity)
    prepared = prepare(plan["run"], data=plan["data"], spec=plan["sandwich"].largest())
    folder = study.folder
    log = folder.read_supernet_log()
    if log and log.get("complete") and folder.supernet_adapter.is_dir():
        study.message(f"supernet: loaded from {folder.supernet_dir} ({log['steps']} steps, trained before)")
        return Supernet(MoLAModel.from_pretrained(prepared.base_model, folder.supernet_adapter), prepared, log)
    study.message(f"supernet: {study.space.max_experts} experts per module, {plan['steps']} optimizer steps "
                  f"({study.config.supernet_factor:g} x a trial's {plan['trial_steps']}) on {plan['examples']} "
                  "training examples; each step trains one sub-network (largest, smallest, then two drawn from "
                  "the space)")
    model, log = _train(study, plan, prepared)
    model.save_pretrained(folder.supernet_adapter, task=prepared.data.name, role="one-shot supernet")
    folder.write_supernet_log(log)
    return Supernet(model, prepared, log)


def _plan(study: "StudyContext", fidelity: Any) -> dict[str, Any]:
    """How long the supernet trains: `supernet_factor` x one trial's optimizer steps, on as many times the
    trial's training examples as the split has."""
    from mola_search.train.run import RunConfig
    from mola_search.train.trainer import TrainConfig
    from mola_search.trial.mola import task_data

    config = study.config
    data = task_data(config.task, config.data_dir)
    train_size = len(data.splits["train"])
    per_trial = min(fidelity.max_train_examples or train_size, train_size)
    trial_cfg = TrainConfig(**{**config.train, "seed": config.seed, "epochs": fidelity.epochs,
                               **({"max_steps": fidelity.max_steps} if fidelity.max_steps else {})})
    trial_steps = trial_cfg.steps_for(per_trial)
    steps = max(1, math.ceil(config.supernet_factor * trial_steps))
    examples = min(train_size, math.ceil(config.supernet_factor * per_trial))
    train_cfg = TrainConfig(**{**config.train, "seed": config.seed, "max_steps": steps})
    run = RunConfig(task=config.task, model=config.model, dtype=config.dtype, device=config.device,
                    data_dir=config.data_dir, train=train_cfg, balance_loss=config.balance_loss,
                    aux_loss_coef=config.aux_loss_coef, max_train_examples=examples,
                    max_eval_examples=config.oneshot_eval_examples, eval_splits=())
    return {"data": data, "run": run, "steps": steps, "trial_steps": trial_steps, "examples": examples,
            "sandwich": Sandwich(study.space, study.num_layers, study.budget, config.seed)}


def _train(study: "StudyContext", plan: dict[str, Any], prepared: Any) -> tuple[Any, dict[str, Any]]:
    """The supernet's training loop: one sub-network per optimizer step (`Sandwich`); returns the model and
    the log of what each step trained and its loss."""
    from mola_search.search.strategies.oneshot import signals
    from mola_search.train.run import execute

    sandwich, steps, train_cfg = plan["sandwich"], plan["steps"], plan["run"].train
    log: dict[str, Any] = {"max_experts": study.space.max_experts, "factor": study.config.supernet_factor,
                           "trial_steps": plan["trial_steps"], "steps": steps, "train_examples": plan["examples"],
                           "seed": study.config.seed, "sampled": []}
    state: dict[str, Any] = {"model": None}
    start = time.perf_counter()
    every = max(1, steps // 10)

    def on_model(model) -> None:
        state["model"] = model
        log["saliency"] = signals.saliency(model, prepared.tokenizer, prepared.splits["train"],
                                           cutoff_len=train_cfg.cutoff_len, batch_size=train_cfg.micro_batch_size)
        first = sandwich.for_step(0)
        log["sampled"].append([0, run_length(first.experts)])
        model.use_allocation(first)

    def after_step(event) -> bool:
        log["sampled"][-1].append(round(event.loss, 5))
        if event.step < steps:
            nxt = sandwich.for_step(event.step)
            log["sampled"].append([event.step, run_length(nxt.experts)])
            state["model"].use_allocation(nxt)
        if event.step % every == 0 or event.step == steps:
            eta = event.elapsed / event.step * (steps - event.step)
            study.message(f"  [supernet {event.step}/{steps}] loss {event.loss:.4f}  ETA {duration(eta)}")
        return False

    result = execute(prepared, callbacks=[after_step], progress=False, save=False, on_model=on_model)
    result.model.use_allocation(None)
    log.update(wall_time_s=time.perf_counter() - start, complete=True,
               train_loss_curve=result.metrics.get("train_loss_curve"))
    return result.model, log


def signal_seeds(supernet: Supernet, space: SearchSpace, num_layers: int, budget: int) -> tuple[list[Seed], dict[str, Any]]:
    """The cheap signals of the supernet (router usage, redundancy) and of the base (saliency, measured
    before training), each as a seed allocation at the budget, and their per-layer weights."""
    from mola_search.search.strategies.oneshot import signals
    from mola_search.train.run import evaluate

    model = supernet.model
    model.use_allocation(None)
    with model.collecting_router_stats():
        evaluate(model, supernet.prepared, "validation")
    weights = {"router_usage": signals.router_usage(model.router_stats(), num_layers),
               "redundancy": signals.redundancy(model, num_layers),
               "saliency": list(supernet.log.get("saliency") or [0.0] * num_layers)}
    seeds, info = [], {}
    for name in signals.SIGNALS:
        spec = signals.signal_spec(name, weights[name], budget, space.min_experts, space.max_experts,
                                   space.top_k, space.rank)
        seeds.append(Seed(name, spec))
        info[name] = {"weights": weights[name], "experts": list(spec.experts)}
    return seeds, info
