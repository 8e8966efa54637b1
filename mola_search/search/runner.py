"""A whole study, start to finish: resolve -> seeds -> search -> finalists -> outputs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from mola_search.allocation import AllocationSpec, run_length
from mola_search.errors import UserError
from mola_search.search.config import StudyConfig, pin_paths
from mola_search.search.executors import run_local, run_local_requests, run_ray, run_ray_requests
from mola_search.search.outputs import (Finalist, choose_best, read_json, write_best, write_finalists_csv,
                                        write_summary, write_trials_csv)
from mola_search.search.progress import Progress, RunProgress
from mola_search.search.seeds import Seed, all_seeds
from mola_search.search.space import Fidelity, SearchSpace, load_space
from mola_search.search.study import ALLOCATION, ORIGIN, RANK, TOP_K, StudyDriver
from mola_search.search.synthetic import is_synthetic
from mola_search.search.trial import TrialRequest, task_data


def resolve_space(config: StudyConfig) -> SearchSpace:
    space = load_space(config.space)
    if config.fidelity:
        fid = Fidelity.from_dict({**space.fidelity.to_dict(), **config.fidelity})
        space = replace(space, fidelity=fid)
    return space


def inspect_model(config: StudyConfig, space: SearchSpace) -> tuple[int, int, list[Seed]]:
    """Depth, budget and seeds; the model is loaded once here (also converting/caching it for the workers)."""
    from mola_search.models import cache_dir, decoder_layers, load_base_model

    model, _ = load_base_model(config.model, dtype="fp32" if "alphalora" in config.seed_names else config.dtype)
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
    return num_layers, budget, [s for s in seeds if s.name in config.seed_names]


def check_task_data(config: StudyConfig) -> None:
    """Load the task once in the driver: missing data is one error now, not a failure in every trial."""
    if not is_synthetic(config.objective):
        task_data(config.task, config.data_dir)


def run_study(config: StudyConfig, folder: Path, *, resume: bool = False) -> dict[str, Any]:
    start = time.time()
    folder = folder.resolve()  # finalists write their run folders from Ray trials' own working directories
    config = pin_paths(config)
    space = resolve_space(config)
    check_task_data(config)
    folder.mkdir(parents=True, exist_ok=True)
    num_layers, budget, seeds = inspect_model(config, space)
    concurrency = config.max_concurrent or 1
    progress = Progress(config.trials, concurrency)
    driver = StudyDriver(config, folder, space, num_layers, budget, seeds, progress)
    if not resume:  # written once the storage exists: study.json marks a study others may open
        config.save(folder)
    progress.message(f"study {folder} | {config.task} on {config.model} ({num_layers} layers) | budget {budget} | "
                     f"space {space.name}/{space.encoding} | sampler {config.sampler} | {config.trials} trials "
                     f"({driver.remaining()} to run{', ' + str(driver.recovered) + ' interrupted re-queued' if driver.recovered else ''})"
                     f" | seeds: {', '.join(s.name for s in seeds)}")
    try:
        if config.executor == "local":
            run_local(driver, space.fidelity)
        else:
            run_ray(driver, space.fidelity, folder)
    finally:
        write_trials_csv(driver.study, folder)

    finalists = run_finalists(config, driver, space.fidelity, folder, progress)
    best = choose_best(finalists) if finalists else None
    if best is not None:
        write_best(best, folder, config.to_dict(), chosen_by=f"mean test accuracy over {config.finalist_seeds} seeds")
    elif _best_trial_spec(driver) is not None:  # no finalists requested: best validation trial
        number, origin, spec, value = _best_trial_spec(driver)
        best = Finalist(f"t{number:03d}", number, origin, spec, [value], [])
        write_best(best, folder, config.to_dict(), chosen_by="validation score of one search trial")
    write_finalists_csv(finalists, folder)
    wall = time.time() - start
    write_summary(folder, config.to_dict(), driver.study, finalists, best, wall)
    progress.message(f"done in {wall / 60:.1f} min: {folder / 'summary.md'}"
                     + (f" | best {run_length(best.spec.experts)} ({best.origin})" if best else ""))
    return {"folder": str(folder), "best": best, "finalists": finalists}


def _best_trial_spec(driver: StudyDriver):
    done = driver.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    t = max(done, key=lambda t: t.value)
    a = t.user_attrs
    return t.number, a.get(ORIGIN, ""), AllocationSpec(tuple(a[ALLOCATION]), tuple(a[TOP_K]), tuple(a[RANK]),
                                                       a.get(ORIGIN, "")), t.value


def finalist_candidates(driver: StudyDriver) -> list[tuple[int, str, AllocationSpec]]:
    """All seeds that trained, plus the top-N searched allocations by validation score (distinct allocations)."""
    trials = [t for t in driver.study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "duplicate_of" not in t.user_attrs]
    chosen: dict[tuple, tuple[int, str, AllocationSpec]] = {}
    for t in trials:
        if str(t.user_attrs.get(ORIGIN, "")).startswith("seed:"):
            _add(chosen, t)
    searched = sorted((t for t in trials if t.state == TrialState.COMPLETE
                       and not str(t.user_attrs.get(ORIGIN, "")).startswith("seed:")), key=lambda t: -t.value)
    added = 0
    for t in searched:
        if added >= driver.config.finalist_top_n:
            break
        if _add(chosen, t):
            added += 1
    return list(chosen.values())


def _add(chosen: dict, t) -> bool:
    a = t.user_attrs
    key = (tuple(a[ALLOCATION]), tuple(a[TOP_K]), tuple(a[RANK]))
    if key in chosen:
        return False
    chosen[key] = (t.number, a.get(ORIGIN, ""), AllocationSpec(*key, a.get(ORIGIN, "")))
    return True


def run_finalists(config: StudyConfig, driver: StudyDriver, fidelity: Fidelity, folder: Path,
                  progress: Progress) -> list[Finalist]:
    if config.finalist_seeds == 0:
        return []
    candidates = finalist_candidates(driver)
    requests, labels = [], {}
    for number, origin, spec in candidates:
        label = f"t{number:03d}-{origin.replace(':', '_')}"
        labels[number] = (label, origin, spec)
        for seed in range(config.finalist_seeds):
            out = folder / "finalists" / label / f"seed{seed}"
            if read_json(out / "metrics.json") is None:  # finished runs are kept: finalists resume too
                requests.append(TrialRequest(number, spec.experts, spec.top_k, spec.rank, origin, train_seed=seed,
                                             min_experts=driver.space.min_experts,
                                             max_experts=driver.space.max_experts, final=True, out=str(out)))
    if requests:
        progress.message(f"finalists: {len(candidates)} allocations x {config.finalist_seeds} seeds "
                         f"({len(requests)} runs to do) on the held-out test split")
        runs = RunProgress(len(requests), progress.stream)

        def on_done(r: TrialRequest, score: float | None, failure: str | None) -> None:
            runs.run_done(labels[r.number][0], r.train_seed, score, failure)

        if config.executor == "local":
            run_local_requests(config, fidelity, requests, driver.num_layers, on_done)
        else:
            run_ray_requests(config, fidelity, requests, folder, driver.num_layers, on_done)
    finalists = []
    for number, (label, origin, spec) in labels.items():
        val, test = [], []
        for seed in range(config.finalist_seeds):
            m = read_json(folder / "finalists" / label / f"seed{seed}" / "metrics.json")
            if m and m.get("test", {}).get("accuracy") is not None:
                val.append(float(m["validation"]["accuracy"]))
                test.append(float(m["test"]["accuracy"]))
        finalists.append(Finalist(label, number, origin, spec, val, test))
        if test:
            progress.message(f"  {label:<32} {run_length(spec.experts):<22} test {finalists[-1].test_mean:.4f} "
                             f"± {finalists[-1].test_std:.4f} (n={len(test)})")
    return [f for f in finalists if f.test]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
