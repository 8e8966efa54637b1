"""The pilot: how much of the score variance does the allocation explain at this fidelity (the noise floor)?

Before the search, the paper shapes in `PILOT_SHAPES` are trained with `pilot_seeds` training seeds each at
trial fidelity. `stats.noise.estimate_noise` splits the spread of their scores into an allocation part, a seed
part and the rest (noise.json). With `auto_fidelity` the design is retrained at doubled fidelity until the
allocation share reaches `noise_threshold`, the data run out, `max_doublings` is reached, or the next round
would push the study past `time_budget`. Every finished run is kept in pilot/ (a resumed study re-runs none),
and the chosen round's runs become trials of the study (they count towards `trials`; the sampler learns
from them).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

from mola_search.allocation import AllocationSpec
from mola_search.search.config import PILOT_SHAPES
from mola_search.search.context import StudyContext
from mola_search.search.progress import RunProgress
from mola_search.search.seeds import paper_seeds
from mola_search.search.study import Origin
from mola_search.search.study.records import FIDELITY, ORIGIN, PILOT, PILOT_DONE, TRAIN_SEED
from mola_search.stats.noise import NoiseFloor, estimate_noise
from mola_search.trial import Fidelity, TrialOutcome, TrialRequest

Outcomes = dict[tuple[str, int], TrialOutcome]


def run_pilot(study: StudyContext) -> Fidelity:
    """Train the noise-floor design (unless the study has no pilot, or a resumed one finished it), write
    noise.json, record the chosen round's runs as trials and return the trial fidelity the search uses."""
    config, attrs = study.config, study.driver.study.user_attrs
    fidelity = study.space.fidelity
    if not config.pilot:
        return fidelity
    if attrs.get(PILOT_DONE):
        return Fidelity.from_dict(attrs[FIDELITY]) if attrs.get(FIDELITY) else fidelity
    specs = pilot_specs(study)
    rounds: list[NoiseFloor] = []
    for round_index in range(config.max_doublings + 1):
        outcomes = _round(study, fidelity, specs, round_index)
        floor = estimate_noise({name: {seed: o.score for (n, seed), o in outcomes.items() if n == name and o.usable}
                                for name in specs}, metric=config.metric, fidelity=fidelity.to_dict())
        rounds.append(floor)
        study.folder.write_noise(floor, rounds)
        study.message(f"{floor.line()} [{fidelity.describe()}]")
        nxt = _next_fidelity(study, floor, fidelity, outcomes, round_index, len(specs))
        if nxt is None:
            break
        fidelity = nxt
    _record(study, specs, outcomes)
    study.driver.study.set_user_attr(FIDELITY, fidelity.to_dict())
    study.driver.study.set_user_attr(PILOT_DONE, True)
    return fidelity


def pilot_specs(study: StudyContext) -> dict[str, AllocationSpec]:
    space = study.space
    shapes = {s.name: s.spec for s in paper_seeds(study.num_layers, study.budget, space.min_experts,
                                                   space.max_experts, top_k=space.top_k, rank=space.rank)}
    return {name: shapes[name] for name in PILOT_SHAPES}


def _next_fidelity(study: StudyContext, floor: NoiseFloor, fidelity: Fidelity, outcomes: Outcomes,
                   round_index: int, shapes: int) -> Fidelity | None:
    """Auto-fidelity's next round, or None when this round's fidelity is the one to search at."""
    config = study.config
    if not config.auto_fidelity:
        return None
    if floor.allocation_share == floor.allocation_share and floor.allocation_share >= config.noise_threshold:
        study.message(f"auto-fidelity: allocation share {floor.allocation_share:.0%} >= "
                      f"{config.noise_threshold:.0%}: searching at this fidelity")
        return None
    if round_index == config.max_doublings:
        study.message(f"auto-fidelity: stopped after {config.max_doublings} doublings")
        return None
    nxt = fidelity.doubled(study.train_size())
    if config.time_budget is not None:
        per_run = statistics.fmean([o.wall_time_s for o in outcomes.values()] or [0.0])
        runs_left = shapes * config.pilot_seeds + study.driver.remaining() + config.final_runs()
        predicted = time.time() - study.started + 2 * per_run * runs_left / study.progress.concurrency
        if predicted > 60 * config.time_budget:
            study.message(f"auto-fidelity: doubling would take the study to about {predicted / 60:.0f} min, "
                          f"past --time-budget {config.time_budget:g} min: keeping this fidelity")
            return None
    study.message(f"auto-fidelity: allocation share below {config.noise_threshold:.0%}: doubling to "
                  f"{nxt.describe()}")
    return nxt


def _round(study: StudyContext, fidelity: Fidelity, specs: dict[str, AllocationSpec], round_index: int) -> Outcomes:
    """One round of the design: every (shape, seed) run not kept from before is trained now."""
    outcomes: Outcomes = {}
    requests, keys = [], {}
    for name, spec in specs.items():
        for seed in study.config.pilot_train_seeds():
            kept = study.folder.read_pilot_outcome(round_index, name, seed, fidelity.to_dict())
            if kept is not None:
                outcomes[(name, seed)] = TrialOutcome.from_dict(kept)
                continue
            keys[len(requests)] = (name, seed)
            requests.append(TrialRequest(len(requests), spec.experts, spec.top_k, spec.rank, Origin.seed(name).text,
                                         train_seed=seed, min_experts=study.space.min_experts,
                                         max_experts=study.space.max_experts))
    if not requests:
        return outcomes
    study.message(f"pilot (noise floor): {len(specs)} allocations x {study.config.pilot_seeds} seeds at "
                  f"{fidelity.describe()} ({len(requests)} runs to do)")
    runs = RunProgress(len(requests), study.progress.stream, what="pilot")

    def on_done(r: TrialRequest, outcome: TrialOutcome) -> None:
        name, seed = keys[r.number]
        outcomes[(name, seed)] = outcome
        study.folder.write_pilot_outcome(round_index, name, seed, asdict(outcome), fidelity.to_dict())
        runs.run_done(name, seed, outcome.score, outcome.failure, what=study.config.metric)

    concurrency = study.concurrency("pilot", [o.peak_rss_mb for o in outcomes.values()])
    study.executor.run(requests, fidelity, on_done, name=f"pilot{round_index}", concurrency=concurrency)
    return outcomes


def _record(study: StudyContext, specs: dict[str, AllocationSpec], outcomes: Outcomes) -> None:
    """The chosen round's runs become trials (they count towards `trials`; the sampler learns from them)."""
    done = {(t.user_attrs.get(ORIGIN), t.user_attrs.get(TRAIN_SEED))
            for t in study.driver.study.get_trials(deepcopy=False) if t.user_attrs.get(PILOT)}
    for (name, seed), outcome in sorted(outcomes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        origin = Origin.seed(name).text
        if (origin, seed) not in done:
            study.driver.record(specs[name], origin, seed, outcome, **{PILOT: True})
