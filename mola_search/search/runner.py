"""A whole study, start to finish: resolve -> pilot (noise floor) -> seeds -> search -> finalists -> outputs.

The pilot trains a small allocation x seed design at trial fidelity and measures how much of
the score variance the allocation explains with the seed as a blocking factor (noise.json);
search trials then all train with the study seed (common random numbers); finalists are
retrained with seeds no trial used, the best is chosen on their validation scores and its
test score is reported once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from mola_search.allocation import AllocationSpec, run_length
from mola_search.errors import UserError
from mola_search.search.config import PILOT_SHAPES, StudyConfig, pin_paths
from mola_search.search.executors import check_resources, ray_concurrency, run_local, run_local_requests, run_ray, run_ray_requests
from mola_search.search.oneshot import (TOP_PREFIX, Trust, check_seeds, kendall_tau, rank_agreement, summary_lines,
                                        write_trust)
from mola_search.search.objective import import_objective, is_python_objective, objective_name, ship_by_value
from mola_search.search.noise import NoiseFloor, estimate_noise, read_noise, write_noise
from mola_search.search.folder import (DUPLICATE_OF, FIDELITY, ORIGIN, PEAK_RSS, PILOT, PILOT_DONE, RUN_METRICS,
                                       TRAIN_SEED,
                                       best_search_trial, finalist_label, finalist_run_dir,
                                       pilot_outcome_path, read_json, trial_seed, trial_spec)
from mola_search.search.outputs import (Finalist, choose_best, read_outcome, write_best,
                                        write_finalists_csv, write_outcome, write_run_metrics, write_summary,
                                        write_trials_csv)
from mola_search.search.progress import Progress, RunProgress
from mola_search.search.seeds import Seed, all_seeds, paper_seeds
from mola_search.search.supernet import ranked_allocations
from mola_search.search.space import Fidelity, SearchSpace, load_space
from mola_search.search.study import StudyDriver
from mola_search.search.synthetic import is_synthetic
from mola_search.search.trial import TrialOutcome, TrialRequest, task_data


def resolve_space(config: StudyConfig) -> SearchSpace:
    space = load_space(config.space)
    if config.fidelity:
        fid = Fidelity.from_dict({**space.fidelity.to_dict(), **config.fidelity})
        space = replace(space, fidelity=fid)
    return space


def inspect_model(config: StudyConfig, space: SearchSpace) -> tuple[int, int, list[Seed], float]:
    """Depth, budget, seeds and an estimate of one trial's peak memory (MB); the model is loaded once here
    (also converting/caching it for the workers)."""
    from mola_search.models import cache_dir, decoder_layers, load_base_model

    model, _ = load_base_model(config.model, dtype="fp32" if "alphalora" in config.seed_names else config.dtype,
                               device="cpu")  # the driver only reads depth and weight spectra: GPUs stay free
    num_layers = len(decoder_layers(model))
    budget = config.budget if config.budget is not None else 5 * num_layers
    space.check_budget(num_layers, budget)
    want_alpha = "alphalora" in config.seed_names
    seeds = all_seeds(model if want_alpha else None, num_layers, budget, space.min_experts, space.max_experts,
                      top_k=space.top_k, rank=space.rank,
                      alpha_cache=cache_dir() / "alphas" / f"{_slug(config.model)}.json" if want_alpha else None)
    unknown = sorted(set(config.seed_names) - {s.name for s in seeds})
    if unknown:
        raise UserError(f"unknown seed names {unknown}: choose from {[s.name for s in seeds]}")
    # Before any trial has run: 1.2 GB (interpreter, torch, tokenizer, data) + 8x the base weights in the trial's
    # dtype (weights, activations kept for backward, adapter state). Measured on SmolLM2-135M (0.27 GB in bf16),
    # cpu-quick settings: 3.1 GB. Once trials finish, their measured peaks replace it (runner._concurrency).
    weight_bytes = sum(p.numel() for p in model.parameters()) * (2 if config.dtype in ("auto", "bf16", "fp16") else 4)
    estimate_mb = 1200 + 8 * weight_bytes / 2**20
    return num_layers, budget, [s for s in seeds if s.name in config.seed_names], estimate_mb


def check_task_data(config: StudyConfig) -> None:
    """Load the task once in the driver: missing data is one error now, not a failure in every trial.
    With a synthetic objective nothing is loaded, but the task must still be one that exists; a user
    objective owns its data (config.task only names it)."""
    if is_python_objective(config.objective):
        return
    if not is_synthetic(config.objective):
        task_data(config.task, config.data_dir)
    else:
        from mola_search.tasks import TASKS

        if config.task.lower() not in TASKS and not config.task.startswith(("custom:", "instruct:")):
            raise UserError(f"unknown task {config.task!r}; valid: {', '.join(TASKS)}, custom:<task.yaml>, "
                            "instruct:<path>")


def check_storage(config: StudyConfig) -> None:
    """An --storage URL SQLAlchemy cannot use is one line now, not a traceback after the folder exists."""
    if not config.storage:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        create_engine(config.storage).dispose()  # parses the URL and loads the dialect; connects to nothing
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"`storage` {config.storage!r} is not a usable database URL ({first}); use e.g. "
                        "sqlite:////abs/path/study.db or postgresql://user@host/db") from None


def run_study(config: StudyConfig, folder: Path, *, resume: bool = False,
              summarize: Callable[[Path], str] | None = None,
              objective: Callable[..., Any] | None = None) -> dict[str, Any]:
    """pilot (noise floor, fidelity) -> seeds -> search -> finalists on fresh seeds -> best chosen on validation.

    `objective(trial)` replaces the built-in MoLA fine-tune with your own scoring (search.objective
    says what it gets and returns); the study records its name, and a `python:<module>:<name>`
    config.objective is imported when none is passed (so `--resume` finds it again).
    `summarize(folder)` may return the Markdown of summary.md (the CLI passes the report's
    `study_summary`: paired CIs and the layer headline); without it, or if it fails, summary.md
    holds the noise floor and the finalists.
    """
    start = time.time()
    folder = Path(folder).resolve()  # finalists write their run folders from Ray trials' own working directories
    config = pin_paths(config)
    if objective is not None:
        config = replace(config, objective=objective_name(objective))
    elif is_python_objective(config.objective):
        objective = import_objective(config.objective)
    if objective is not None and config.executor == "ray":
        ship_by_value(objective)
    if config.strategy == "one-shot" and config.scheduler != "none" and not resume:
        config = replace(config, scheduler="none")  # a pruned check has no score to compare with its one-shot one
    space = resolve_space(config)
    check_task_data(config)
    check_storage(config)
    check_resources(config)
    num_layers, budget, seeds, trial_mb = inspect_model(config, space)  # an infeasible budget is refused here
    folder.mkdir(parents=True, exist_ok=True)  # only once every check passed: bad input leaves no folder
    concurrency = config.max_concurrent or 1
    progress = Progress(config.trials, concurrency)
    driver = StudyDriver(config, folder, space, num_layers, budget, None, progress, objective=objective,
                         trial_mb=trial_mb, live_csv=True)
    if not resume:  # written once the storage exists: study.json marks a study others may open
        config.save(folder)
    progress.message(f"study {folder} | {config.task} on {config.model} ({num_layers} layers) | budget {budget} | "
                     f"space {space.name}/{space.encoding} | sampler {config.sampler} | pruner {config.scheduler} | "
                     f"metric {config.metric} | "
                     + (f"one-shot: {config.oneshot_trials} allocations scored on a supernet, then standalone checks"
                        if config.strategy == "one-shot" else
                        f"{config.trials} trials ({driver.remaining()} to run"
                        f"{', ' + str(driver.recovered) + ' interrupted re-queued' if driver.recovered else ''})")
                     + f" | seeds: {', '.join(s.name for s in seeds)}")
    fidelity = run_pilot(config, driver, space, folder, progress, start)
    oneshot = None
    if config.strategy == "one-shot":  # the supernet ranks; the standalone trials check it, finalists confirm
        oneshot = run_oneshot(config, driver, space, fidelity, folder, progress, seeds)
        driver.enqueue_seeds(oneshot.checks)
        driver.target = len(driver.trained_trials()) + len(driver.study.get_trials(
            deepcopy=False, states=(TrialState.WAITING,)))
        progress.total = driver.target
    else:
        driver.enqueue_seeds(seeds)
    progress.resume_from(driver.trained_trials())
    try:
        if driver.remaining() > 0:
            what = "standalone checks of the one-shot ranking" if oneshot else "trials"
            progress.message(f"search: {driver.remaining()} {what} at {describe_fidelity(fidelity)}")
        if config.executor == "local":
            run_local(driver, fidelity)
        elif driver.remaining() > 0:  # a resumed study past its search starts no Ray phase for it
            run_ray(driver, fidelity, folder, _concurrency(driver, progress, "search"))
    finally:
        write_trials_csv(driver.study, folder)

    finalists = run_finalists(replace(config, finalist_top_n=0) if oneshot else config, driver, fidelity, folder,
                              progress, origins=oneshot.finalist_origins() if oneshot else ())
    if oneshot is not None:
        trust = oneshot.measure(driver, finalists)
        write_trust(folder, trust)
        progress.message(trust.line())
    scored = [f for f in finalists if f.validation]
    best = choose_best(scored) if scored else None
    if best is not None:
        write_best(best, folder, config.to_dict(),
                   chosen_by=f"mean validation {config.metric} over {len(best.validation)} finalist seeds "
                             f"({', '.join(map(str, best.seeds))}); test reported once")
    elif (trial := best_search_trial(driver.study, config.seed)) is not None:  # no finalists: best validation trial
        origin = str(trial.user_attrs.get(ORIGIN, ""))
        best = Finalist(f"t{trial.number:03d}", trial.number, origin, trial_spec(trial), [trial.value], [],
                        seeds=[config.seed])
        write_best(best, folder, config.to_dict(), chosen_by=f"validation {config.metric} of one search trial")
    write_finalists_csv(finalists, folder)
    wall = time.time() - start
    analysis = None
    if summarize is not None:
        try:
            analysis = summarize(folder)
        except Exception as exc:  # noqa: BLE001 - the study is done; a failing analysis must not hide it
            progress.message(f"summary.md keeps the plain summary: the analysis failed ({type(exc).__name__}: {exc})")
    write_summary(folder, config.to_dict(), driver.study, finalists, best, wall, noise=read_noise(folder),
                  analysis=analysis, sections=summary_lines(trust) if oneshot is not None else ())
    progress.message(f"done in {wall / 60:.1f} min: {folder / 'summary.md'}"
                     + (f" | best {run_length(best.spec.experts)} ({best.origin}, chosen on validation)" if best else ""))
    return {"folder": str(folder), "best": best, "finalists": finalists}


# --- the pilot: noise floor and trial fidelity ------------------------------------------------


def describe_fidelity(fidelity: Fidelity) -> str:
    steps = f"{fidelity.max_steps} steps" if fidelity.max_steps else f"{fidelity.epochs:g} epoch(s)"
    train = fidelity.max_train_examples if fidelity.max_train_examples is not None else "all"
    evals = fidelity.max_eval_examples if fidelity.max_eval_examples is not None else "all"
    return f"{train} train examples x {steps}, {evals} validation examples"


def doubled(fidelity: Fidelity, train_size: int | None) -> Fidelity:
    """Twice the training of one trial: more examples while the split has them, else more epochs/steps."""
    if fidelity.max_steps:
        more = fidelity.max_train_examples
        if more is not None and train_size is not None:
            more = min(2 * more, train_size)
        return replace(fidelity, max_steps=2 * fidelity.max_steps, max_train_examples=more)
    n = fidelity.max_train_examples
    if n is not None and (train_size is None or n < train_size):
        return replace(fidelity, max_train_examples=2 * n if train_size is None else min(2 * n, train_size))
    return replace(fidelity, epochs=2 * fidelity.epochs)


def pilot_specs(driver: StudyDriver) -> dict[str, AllocationSpec]:
    space = driver.space
    shapes = {s.name: s.spec for s in paper_seeds(driver.num_layers, driver.budget, space.min_experts,
                                                   space.max_experts, top_k=space.top_k, rank=space.rank)}
    return {name: shapes[name] for name in PILOT_SHAPES}


def run_pilot(config: StudyConfig, driver: StudyDriver, space: SearchSpace, folder: Path, progress: Progress,
              started: float) -> Fidelity:
    """Train the noise-floor design, estimate how much of the score variance the allocation explains
    (seed-blocked), write noise.json and return the trial fidelity the search will use.

    With `auto_fidelity` the design is retrained at doubled fidelity until the allocation share
    reaches `noise_threshold`, the data run out, `max_doublings` is reached, or the next round
    would push the study past `time_budget`. Every finished run is kept in pilot/ (a resumed study
    re-runs none), and the chosen round's runs become trials of the study.
    """
    fidelity = space.fidelity
    if not config.pilot:
        return fidelity
    if driver.study.user_attrs.get(PILOT_DONE):
        chosen = driver.study.user_attrs.get(FIDELITY)
        return Fidelity.from_dict(chosen) if chosen else fidelity
    specs = pilot_specs(driver)
    seeds = config.pilot_train_seeds()
    train_size = (None if is_synthetic(config.objective) or driver.objective is not None
                  else len(task_data(config.task, config.data_dir).splits["train"]))
    rounds: list[NoiseFloor] = []
    outcomes: dict[tuple[str, int], TrialOutcome] = {}
    for round_index in range(config.max_doublings + 1):
        outcomes = _pilot_round(config, driver, fidelity, specs, seeds, folder, progress, round_index)
        table = {name: {seed: o.score for (n, seed), o in outcomes.items() if n == name and _usable(o)}
                 for name in specs}
        floor = estimate_noise(table, metric=config.metric, fidelity=fidelity.to_dict())
        rounds.append(floor)
        write_noise(folder, floor, rounds)
        progress.message(f"{floor.line()} [{describe_fidelity(fidelity)}]")
        if not config.auto_fidelity:
            break
        if floor.allocation_share == floor.allocation_share and floor.allocation_share >= config.noise_threshold:
            progress.message(f"auto-fidelity: allocation share {floor.allocation_share:.0%} >= "
                             f"{config.noise_threshold:.0%}: searching at this fidelity")
            break
        if round_index == config.max_doublings:
            progress.message(f"auto-fidelity: stopped after {config.max_doublings} doublings")
            break
        nxt = doubled(fidelity, train_size)
        if config.time_budget is not None:
            per_run = statistics.fmean([o.wall_time_s for o in outcomes.values()] or [0.0])
            runs_left = len(specs) * len(seeds) + driver.remaining() + _finalist_runs(config)
            predicted = time.time() - started + 2 * per_run * runs_left / progress.concurrency
            if predicted > 60 * config.time_budget:
                progress.message(f"auto-fidelity: doubling would take the study to about {predicted / 60:.0f} min, "
                                 f"past --time-budget {config.time_budget:g} min: keeping this fidelity")
                break
        progress.message(f"auto-fidelity: allocation share below {config.noise_threshold:.0%}: doubling to "
                         f"{describe_fidelity(nxt)}")
        fidelity = nxt
    _record_pilot(driver, specs, outcomes, fidelity)
    driver.study.set_user_attr(FIDELITY, fidelity.to_dict())
    driver.study.set_user_attr(PILOT_DONE, True)
    return fidelity


def _finalist_runs(config: StudyConfig) -> int:
    shapes = len(config.finalist_shapes) if config.finalist_shapes is not None else len(config.seed_names)
    return (shapes + config.finalist_top_n) * config.finalist_seeds


def _usable(outcome: TrialOutcome) -> bool:
    return outcome.failure is None and not outcome.pruned and outcome.score is not None and outcome.score == outcome.score


def _pilot_round(config: StudyConfig, driver: StudyDriver, fidelity: Fidelity, specs: dict[str, AllocationSpec],
                 seeds: list[int], folder: Path, progress: Progress, round_index: int
                 ) -> dict[tuple[str, int], TrialOutcome]:
    outcomes: dict[tuple[str, int], TrialOutcome] = {}
    requests, keys = [], {}
    for name, spec in specs.items():
        for seed in seeds:
            kept = read_outcome(pilot_outcome_path(folder, round_index, name, seed), fidelity)
            if kept is not None:
                outcomes[(name, seed)] = kept
                continue
            number = len(requests)
            keys[number] = (name, seed)
            requests.append(TrialRequest(number, spec.experts, spec.top_k, spec.rank, f"seed:{name}", train_seed=seed,
                                         min_experts=driver.space.min_experts, max_experts=driver.space.max_experts))
    if requests:
        progress.message(f"pilot (noise floor): {len(specs)} allocations x {len(seeds)} seeds at "
                         f"{describe_fidelity(fidelity)} ({len(requests)} runs to do)")
        runs = RunProgress(len(requests), progress.stream, what="pilot")

        def on_done(r: TrialRequest, outcome: TrialOutcome) -> None:
            name, seed = keys[r.number]
            outcomes[(name, seed)] = outcome
            write_outcome(pilot_outcome_path(folder, round_index, name, seed), outcome, fidelity)
            runs.run_done(name, seed, outcome.score, outcome.failure, what=config.metric)

        if config.executor == "local":
            run_local_requests(config, fidelity, requests, driver.num_layers, on_done, objective=driver.objective)
        else:
            run_ray_requests(config, fidelity, requests, folder, driver.num_layers, on_done, name=f"pilot{round_index}",
                             concurrency=_concurrency(driver, progress, "pilot", [o.peak_rss_mb for o in outcomes.values()]),
                             objective=driver.objective)
    return outcomes


def _record_pilot(driver: StudyDriver, specs: dict[str, AllocationSpec], outcomes: dict[tuple[str, int], TrialOutcome],
                  fidelity: Fidelity) -> None:
    """The chosen round's runs become trials (they count towards --trials; the sampler learns from them)."""
    done = {(t.user_attrs.get(ORIGIN), t.user_attrs.get(TRAIN_SEED)) for t in driver.study.get_trials(deepcopy=False)
            if t.user_attrs.get(PILOT)}
    for (name, seed), outcome in sorted(outcomes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if (f"seed:{name}", seed) not in done:
            driver.record(specs[name], f"seed:{name}", seed, outcome, **{PILOT: True})


# --- the one-shot strategy ------------------------------------------------------------------


@dataclass
class OneShotPhase:
    """What the one-shot phase hands the rest of the study: the allocations to train standalone (the
    one-shot top-N first, then the cheap signals, the seeds and the spread checks) and what `measure`
    needs to compare the two rankings afterwards."""

    study: Any                      # the "<name>-oneshot" Optuna study
    checks: list[Seed]
    trust: Trust
    signal_weights: dict[str, list[float]]

    def finalist_origins(self) -> tuple[str, ...]:
        """The one-shot top-N: the searched finalists (chosen by the one-shot ranking, not by the standalone
        checks' validation scores); the configured shapes join them as in a standalone study."""
        return tuple(s.label for s in self.checks if s.label.startswith(TOP_PREFIX))

    def measure(self, driver: StudyDriver, finalists: Sequence[Finalist]) -> Trust:
        """Kendall tau of one-shot vs standalone validation scores: over every allocation trained with the
        study seed at trial fidelity (pilot, checks), and over the finalists at theirs."""
        def key(spec: AllocationSpec) -> tuple:
            return tuple(spec.experts), tuple(spec.top_k), tuple(spec.rank)

        ranked = ranked_allocations(self.study)
        oneshot = {key(spec): score for spec, score in reversed(ranked)}
        seed = driver.config.seed
        pairs = []
        for t in driver.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            spec = trial_spec(t)
            if DUPLICATE_OF in t.user_attrs or trial_seed(t, seed) != seed or key(spec) not in oneshot:
                continue
            pairs.append({"experts": list(spec.experts), "origin": str(t.user_attrs.get(ORIGIN, "")),
                          "oneshot": oneshot[key(spec)], "standalone": float(t.value)})
        trust = self.trust
        trust.pairs = pairs
        trust.trial_fidelity = kendall_tau([p["oneshot"] for p in pairs], [p["standalone"] for p in pairs],
                                           seed=seed)
        done = [f for f in finalists if f.validation and key(f.spec) in oneshot]
        trust.finalists = kendall_tau([oneshot[key(f.spec)] for f in done], [f.val_mean for f in done], seed=seed)
        best_oneshot = ranked[0][0].experts if ranked else None
        scored = [f for f in finalists if f.validation]
        best = choose_best(scored).spec.experts if scored else None
        for name, weights in self.signal_weights.items():
            info = trust.signals.setdefault(name, {})
            info["rho_oneshot_best"] = rank_agreement(weights, best_oneshot) if best_oneshot else float("nan")
            info["rho_best"] = rank_agreement(weights, best) if best else float("nan")
        return trust


def run_oneshot(config: StudyConfig, driver: StudyDriver, space: SearchSpace, fidelity: Fidelity, folder: Path,
                progress: Progress, seeds: Sequence[Seed]) -> OneShotPhase:
    """Train (or load) the supernet, turn the cheap signals into seeds, score `oneshot_trials` allocations
    by masking and choose the standalone checks. The supernet is dropped before any standalone trial."""
    import gc

    from mola_search.search import supernet as one

    net = one.train_supernet(config, space, fidelity, driver.num_layers, driver.budget, folder, progress)
    signal_list, signal_info = one.signal_seeds(net, space, driver.num_layers, driver.budget)
    pilot = pilot_specs(driver) if config.pilot else {}
    first = [Seed(name, spec) for name, spec in pilot.items()] + list(seeds) + signal_list
    study = one.score_allocations(config, space, net, driver.num_layers, driver.budget, first, folder, progress)
    log, examples = net.log, len(net.prepared.splits["validation"])
    del net
    gc.collect()
    trained = {(s.experts, s.top_k, s.rank) for s in pilot.values()}
    picked = check_seeds(one.ranked_allocations(study), config.finalist_top_n, config.oneshot_checks,
                         skip=[*pilot.values(), *(s.spec for s in seeds), *(s.spec for s in signal_list)])
    tops = [s for s in picked if s.label.startswith(TOP_PREFIX)]
    checks = []
    for s in [*tops, *signal_list, *seeds, *(s for s in picked if s not in tops)]:
        k = (s.spec.experts, s.spec.top_k, s.spec.rank)
        if k not in trained:
            trained.add(k)
            checks.append(s)
    trust = Trust(metric=config.metric, signals=signal_info,
                  supernet={k: log.get(k) for k in ("max_experts", "factor", "trial_steps", "steps", "train_examples",
                                                    "wall_time_s")},
                  scoring={"scored": len(one.ranked_allocations(study)), "examples": examples,
                           "seconds_per_allocation": study.user_attrs.get("seconds_per_allocation")})
    write_trust(folder, trust)
    if driver.study.user_attrs.get("seeds_enqueued"):  # resumed: the checks queued before are the ones trained
        progress.message("one-shot: the standalone checks were chosen before this resume; training those")
    else:
        progress.message(f"one-shot: {len(checks)} allocations to train standalone as checks "
                         f"({', '.join(s.label for s in checks)})")
    return OneShotPhase(study, checks, trust, {k: v["weights"] for k, v in signal_info.items()})


# --- finalists -------------------------------------------------------------------------------


def finalist_candidates(driver: StudyDriver, config: StudyConfig | None = None,
                        origins: Sequence[str] = ()) -> list[tuple[int, str, AllocationSpec]]:
    """Seeds that trained (those in `finalist_shapes` when set), the trials whose origin is in `origins`
    (a one-shot study's top-N), plus the top-N searched allocations by validation score (distinct
    allocations). Only study-seed trials count: they are the ones compared under common random numbers.
    `config` defaults to the driver's."""
    config = config or driver.config
    trials = [t for t in driver.study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and DUPLICATE_OF not in t.user_attrs
              and trial_seed(t, config.seed) == config.seed]
    chosen: dict[tuple, tuple[int, str, AllocationSpec]] = {}
    for t in trials:
        origin = str(t.user_attrs.get(ORIGIN, ""))
        if origin.startswith("seed:") and (config.finalist_shapes is None or origin[5:] in config.finalist_shapes):
            _add(chosen, t)
        elif origin in origins:
            _add(chosen, t)
    searched = sorted((t for t in trials if t.state == TrialState.COMPLETE
                       and not str(t.user_attrs.get(ORIGIN, "")).startswith("seed:")), key=lambda t: -t.value)
    added = 0
    for t in searched:
        if added >= config.finalist_top_n:
            break
        if _add(chosen, t):
            added += 1
    return list(chosen.values())


def _add(chosen: dict, t) -> bool:
    spec = replace(trial_spec(t), source=str(t.user_attrs.get(ORIGIN, "")))
    key = (spec.experts, spec.top_k, spec.rank)
    if key in chosen:
        return False
    chosen[key] = (t.number, spec.source, spec)
    return True


def run_finalists(config: StudyConfig, driver: StudyDriver, fidelity: Fidelity, folder: Path,
                  progress: Progress, origins: Sequence[str] = ()) -> list[Finalist]:
    """Retrain the candidates with fresh seeds (never one a search or pilot trial used), scoring validation
    and test. Each run's metrics come back with its outcome and are written here, on the driver."""
    if config.finalist_seeds == 0:
        return []
    candidates = finalist_candidates(driver, config, origins)
    seeds = config.finalist_train_seeds()
    requests, labels, failures = [], {}, {}
    for number, origin, spec in candidates:
        label = finalist_label(number, origin)
        labels[number] = (label, origin, spec)
        for seed in seeds:
            out = finalist_run_dir(folder, label, seed)
            if read_json(out / RUN_METRICS) is None:  # finished runs are kept: finalists resume too
                requests.append(TrialRequest(number, spec.experts, spec.top_k, spec.rank, origin, train_seed=seed,
                                             min_experts=driver.space.min_experts,
                                             max_experts=driver.space.max_experts, final=True, out=str(out)))
    if requests:
        progress.message(f"finalists: {len(candidates)} allocations x {len(seeds)} fresh seeds ({', '.join(map(str, seeds))};"
                         f" {len(requests)} runs to do), scored on validation and the held-out test split")
        runs = RunProgress(len(requests), progress.stream)

        def on_done(r: TrialRequest, outcome: TrialOutcome) -> None:
            if outcome.failure is None and outcome.metrics:
                write_run_metrics(Path(r.out), outcome.metrics)
            else:
                failures[(r.number, r.train_seed)] = outcome.failure or "the run produced no metrics"
            runs.run_done(labels[r.number][0], r.train_seed, outcome.test_score, outcome.failure,
                          what=f"test {config.metric}")

        if config.executor == "local":
            run_local_requests(config, fidelity, requests, driver.num_layers, on_done, objective=driver.objective)
        else:
            run_ray_requests(config, fidelity, requests, folder, driver.num_layers, on_done, name="finalists",
                             concurrency=_concurrency(driver, progress, "finalists"),
                             objective=driver.objective)
    finalists = []
    for number, (label, origin, spec) in labels.items():
        fin = Finalist(label, number, origin, spec, [], [])
        for seed in seeds:
            m = read_json(finalist_run_dir(folder, label, seed) / RUN_METRICS)
            val, test = (m or {}).get("validation") or {}, (m or {}).get("test") or {}
            if val.get(config.metric) is not None and test.get(config.metric) is not None:
                fin.seeds.append(seed)
                fin.validation.append(float(val[config.metric]))
                fin.test.append(float(test[config.metric]))
                fin.test_accuracy.append(float(test.get("accuracy") or float("nan")))
            else:
                fin.failures.append(f"seed {seed}: {failures.get((number, seed), 'no metrics.json')}")
        finalists.append(fin)
        if fin.validation:
            progress.message(f"  {label:<32} {run_length(spec.experts):<22} validation {fin.val_mean:.4f} "
                             f"± {fin.val_std:.4f} (n={len(fin.validation)})")
        else:
            progress.message(f"  {label:<32} FAILED: {'; '.join(fin.failures)}")
    return finalists


def _concurrency(driver: StudyDriver, progress: Progress, phase: str, more_mb: Sequence[float] = ()) -> int:
    """Trials at once for the next Ray phase: --max-concurrent, or what the cluster's CPUs, GPUs and memory hold
    at the largest peak memory this study's trials reached (+15%), or the model-size estimate before any ran."""
    measured = [float(t.user_attrs[PEAK_RSS]) for t in driver.study.get_trials(deepcopy=False)
                if t.user_attrs.get(PEAK_RSS)] + [m for m in more_mb if m]
    trial_mb = 1.15 * max(measured) if measured else driver.trial_mb_estimate
    n, line = ray_concurrency(driver.config, trial_mb, measured=bool(measured))
    progress.message(f"{phase}: {line}")
    progress.concurrency = n  # the search's ETA and --time-budget's forecast divide by it
    return n


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
