"""The one-shot supernet: one over-provisioned MoLA trained once, allocations scored as its sub-networks.

Call order (runner, `strategy="one-shot"`, after the pilot): `train_supernet` -> `signal_seeds` ->
`score_allocations` -> (the runner trains `oneshot.check_seeds` standalone) -> `oneshot.Trust`.

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

import csv
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mola_search.allocation import AllocationSpec, run_length
from mola_search.errors import UserError
from mola_search.search.config import StudyConfig
from mola_search.search.folder import (ALLOCATION, DUPLICATE_OF, FAILURE, FORCED, METRICS, ORIGIN, RANK, TOP_K,
                                       default_storage, trial_spec)
from mola_search.search.oneshot import ONESHOT_CSV, SUPERNET_DIR
from mola_search.search.progress import Progress, duration
from mola_search.search.seeds import Seed
from mola_search.search.space import Fidelity, SearchSpace, per_layer_top_k

SUPERNET_LOG = "log.json"
ADAPTER_DIR = "adapter"
MAX_DUPLICATES_IN_A_ROW = 25
MAX_FAILURES_IN_A_ROW = 3


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


def supernet_dir(folder: Path) -> Path:
    return Path(folder) / SUPERNET_DIR


def train_supernet(config: StudyConfig, space: SearchSpace, fidelity: Fidelity, num_layers: int, budget: int,
                   folder: Path, progress: Progress) -> Supernet:
    """Train (or, when supernet/ holds a finished one, load) the supernet; saliency of the base is
    measured before training (the adapters add nothing then) and kept in the log."""
    from mola_search.mola import MoLAModel
    from mola_search.search import signals
    from mola_search.search.trial import task_data
    from mola_search.train.run import RunConfig, execute, prepare
    from mola_search.train.trainer import TrainConfig

    sandwich = Sandwich(space, num_layers, budget, config.seed)
    out = supernet_dir(folder)
    data = task_data(config.task, config.data_dir)
    train_size = len(data.splits["train"])
    per_trial = min(fidelity.max_train_examples or train_size, train_size)
    trial_cfg = TrainConfig(**{**config.train, "seed": config.seed, "epochs": fidelity.epochs,
                               **({"max_steps": fidelity.max_steps} if fidelity.max_steps else {})})
    trial_steps = trial_cfg.steps_for(per_trial)
    steps = max(1, math.ceil(config.supernet_factor * trial_steps))
    examples = min(train_size, math.ceil(config.supernet_factor * per_trial))
    train_cfg = TrainConfig(**{**config.train, "seed": config.seed, "max_steps": steps})
    run_cfg = RunConfig(task=config.task, model=config.model, dtype=config.dtype, device=config.device,
                        data_dir=config.data_dir, train=train_cfg, max_train_examples=examples,
                        max_eval_examples=config.oneshot_eval_examples, eval_splits=())
    spec = sandwich.largest()
    prepared = prepare(run_cfg, data=data, spec=spec)
    log = _read_json(out / SUPERNET_LOG)
    if log and log.get("complete") and (out / ADAPTER_DIR).is_dir():
        progress.message(f"supernet: loaded from {out} ({log['steps']} steps, trained before)")
        model = MoLAModel.from_pretrained(prepared.base_model, out / ADAPTER_DIR)
        return Supernet(model, prepared, log)

    progress.message(f"supernet: {space.max_experts} experts per module, {steps} optimizer steps "
                     f"({config.supernet_factor:g} x a trial's {trial_steps}) on {examples} training examples; "
                     "each step trains one sub-network (largest, smallest, then two drawn from the space)")
    log = {"max_experts": space.max_experts, "factor": config.supernet_factor, "trial_steps": trial_steps,
           "steps": steps, "train_examples": examples, "seed": config.seed, "sampled": []}
    state: dict[str, Any] = {"model": None}
    start = time.perf_counter()

    def on_model(model) -> None:
        state["model"] = model
        log["saliency"] = signals.saliency(model, prepared.tokenizer, prepared.splits["train"],
                                           cutoff_len=train_cfg.cutoff_len, batch_size=train_cfg.micro_batch_size)
        first = sandwich.for_step(0)
        log["sampled"].append([0, run_length(first.experts)])
        model.use_allocation(first)

    every = max(1, steps // 10)

    def after_step(event) -> bool:
        log["sampled"][-1].append(round(event.loss, 5))
        if event.step < steps:
            nxt = sandwich.for_step(event.step)
            log["sampled"].append([event.step, run_length(nxt.experts)])
            state["model"].use_allocation(nxt)
        if event.step % every == 0 or event.step == steps:
            eta = event.elapsed / event.step * (steps - event.step)
            progress.message(f"  [supernet {event.step}/{steps}] loss {event.loss:.4f}  ETA {duration(eta)}")
        return False

    result = execute(prepared, callbacks=[after_step], progress=False, save=False, on_model=on_model)
    model = result.model
    model.use_allocation(None)
    log.update(wall_time_s=time.perf_counter() - start, complete=True,
               train_loss_curve=result.metrics.get("train_loss_curve"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / ADAPTER_DIR, task=prepared.data.name, role="one-shot supernet")
    (out / SUPERNET_LOG).write_text(json.dumps(log, indent=1) + "\n")
    return Supernet(model, prepared, log)


def signal_seeds(supernet: Supernet, space: SearchSpace, num_layers: int, budget: int) -> tuple[list[Seed], dict[str, Any]]:
    """The cheap signals of the supernet (router usage, redundancy) and of the base (saliency, measured
    before training), each as a seed allocation at the budget, and their per-layer weights."""
    from mola_search.search import signals
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


def _key(spec: AllocationSpec) -> tuple:
    return tuple(spec.experts), tuple(spec.top_k), tuple(spec.rank)


def oneshot_study_name(config: StudyConfig, folder: Path) -> str:
    return f"{config.study_name or Path(folder).name}-oneshot"


def score_allocations(config: StudyConfig, space: SearchSpace, supernet: Supernet, num_layers: int, budget: int,
                      seeds: Sequence[Seed], folder: Path, progress: Progress):
    """Score `config.oneshot_trials` distinct allocations as masked sub-networks (seeds first, then the
    sampler); returns the one-shot Optuna study. Finished scores are kept: a resumed study scores only
    what is missing."""
    import optuna
    from optuna.trial import TrialState

    from mola_search.search.study import make_sampler
    from mola_search.search.trial import metric_of
    from mola_search.train.run import evaluate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=oneshot_study_name(config, folder),
                                storage=config.storage or default_storage(folder),
                                sampler=make_sampler(config.sampler, config.seed), direction="maximize",
                                load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed scoring: redo those
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    if not study.user_attrs.get("seeds_enqueued"):
        for seed in seeds:
            params, exact = space.encode(seed.spec)
            attrs: dict[str, Any] = {ORIGIN: seed.label}
            if not exact:
                attrs[FORCED] = {"experts": list(seed.spec.experts), "top_k": list(seed.spec.top_k),
                                 "rank": list(seed.spec.rank)}
            study.enqueue_trial(params, user_attrs=attrs)
        study.set_user_attr("seeds_enqueued", True)
    scored = {_key(trial_spec(t)): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if DUPLICATE_OF not in t.user_attrs}
    target = config.oneshot_trials
    if len(scored) < target:
        progress.message(f"one-shot scoring: {target - len(scored)} allocations to score "
                         f"({len(scored)} scored before), {len(supernet.prepared.splits['validation'])} "
                         f"validation examples each, by masking the supernet (no training)")
    model = supernet.model
    # A proposal already scored is answered from the cache, and the next one is drawn at random: a sampler that
    # has converged on a few allocations would otherwise stop the scoring far short of `oneshot_trials`.
    sampler, explore = study.sampler, optuna.samplers.RandomSampler(seed=config.seed)
    start, ran, duplicates, failures = time.perf_counter(), 0, 0, 0
    every = max(1, target // 20)
    best = max(scored.values(), key=lambda t: t.value) if scored else None
    while len(scored) < target:
        trial = study.ask()
        forced = trial.user_attrs.get(FORCED)
        spec = space.suggest(trial, num_layers, budget)
        if forced:
            spec = AllocationSpec(tuple(forced["experts"]), tuple(forced["top_k"]), tuple(forced["rank"]))
        origin = trial.user_attrs.get(ORIGIN) or ("random" if study.sampler is explore else config.sampler)
        for key, value in ((ORIGIN, origin), (ALLOCATION, list(spec.experts)), (TOP_K, list(spec.top_k)),
                           (RANK, list(spec.rank))):
            trial.set_user_attr(key, value)
        twin = scored.get(_key(spec))
        if twin is not None:
            trial.set_user_attr(DUPLICATE_OF, twin.number)
            study.tell(trial, twin.value)
            study.sampler = explore
            duplicates += 1
            if duplicates >= MAX_DUPLICATES_IN_A_ROW:
                progress.message(f"one-shot scoring: {duplicates} proposals in a row (random ones included) were "
                                 f"allocations already scored: stopping at {len(scored)} distinct allocations")
                break
            continue
        duplicates = 0
        study.sampler = sampler
        try:
            with model.allocation(spec):
                result = evaluate(model, supernet.prepared, "validation")
            score, _ = metric_of(result, config.metric)
            if not math.isfinite(score):
                raise FloatingPointError(f"one-shot {config.metric} is {score}")
        except Exception as exc:  # noqa: BLE001 - recorded; three in a row stop the scoring
            trial.set_user_attr(FAILURE, f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            if failures >= MAX_FAILURES_IN_A_ROW:
                progress.message(f"one-shot scoring stopped: {failures} failures in a row (last: {exc})")
                break
            continue
        failures = 0
        trial.set_user_attr(METRICS, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        study.tell(trial, score)
        frozen = study.trials[trial.number]
        scored[_key(spec)] = frozen
        if best is None or score > best.value:
            best = frozen
        ran += 1
        if ran % every == 0 or len(scored) == target or origin.startswith("seed:"):
            elapsed = time.perf_counter() - start
            eta = elapsed / ran * (target - len(scored))
            progress.message(f"  [one-shot {len(scored)}/{target}] {origin:<24} {run_length(spec.experts):<22} "
                             f"{score:.4f}  best {best.value:.4f} ({run_length(best.user_attrs[ALLOCATION])})  "
                             f"ETA {duration(eta)}")
    seconds = (time.perf_counter() - start) / ran if ran else None
    if seconds is not None:
        study.set_user_attr("seconds_per_allocation", seconds)
    write_oneshot_csv(study, folder)
    return study


def ranked_allocations(study) -> list[tuple[AllocationSpec, float]]:
    """Distinct scored allocations, best one-shot score first."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if DUPLICATE_OF not in t.user_attrs]
    return [(trial_spec(t), float(t.value)) for t in sorted(done, key=lambda t: -t.value)]


def write_oneshot_csv(study, folder: Path) -> Path:
    """oneshot.csv: every one-shot trial (number, origin, state, score, accuracy, allocation, duplicate_of)."""
    path = Path(folder) / ONESHOT_CSV
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "origin", "state", "score", "accuracy", "allocation", "top_k", "duplicate_of",
                         "failure"])
        for t in study.get_trials(deepcopy=False):
            a = t.user_attrs
            writer.writerow([t.number, a.get(ORIGIN, ""), t.state.name, "" if t.value is None else t.value,
                             (a.get(METRICS) or {}).get("accuracy", ""),
                             ",".join(map(str, a.get(ALLOCATION, []))), ",".join(map(str, a.get(TOP_K, []))),
                             a.get(DUPLICATE_OF, ""), a.get(FAILURE, "")])
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
