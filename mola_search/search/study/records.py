"""What a study stores in its Optuna storage: the trial and study user attributes, and how to read them.

Trial user attributes carry what a trial trained; only trials with the study's training seed are compared
with each other (common random numbers), so "the best trial" is always the best of those, never a pilot
run that happened to draw a lucky seed.
"""

from __future__ import annotations

from typing import Any

from mola_search.allocation import AllocationSpec
from mola_search.search.study.origin import Origin

# --- trial user attributes --------------------------------------------------------------
ORIGIN = "origin"            # Origin text: "seed:<name>" for an enqueued seed shape, else the sampler name
ALLOCATION = "allocation"    # the trained allocation (experts per layer)
TOP_K, RANK = "top_k", "rank"
FORCED = "forced_allocation"  # on enqueued seeds: train exactly this, whatever the encoding decodes
DUPLICATE_OF = "duplicate_of"
FAILURE = "failure"
TRAIN_SEED = "train_seed"    # the training seed (the study seed for search trials)
PILOT = "pilot"              # True on the noise-floor design's runs
RUNG_SCORES = "rung_scores"  # the metric's mean at each rung (intermediate values may be per example)
METRICS = "metrics"          # accuracy / gold_logprob / margin / f1 / mcc of the last rung
WALL_TIME = "wall_time_s"
NODE = "node"
PEAK_RSS = "peak_rss_mb"     # the trial process's peak resident memory (sizes the default concurrency)
PEAK_GPU = "peak_gpu_mb"     # the trial's peak CUDA memory allocated (GPU trials only)
SEED_EXACT = "seed_exact_in_encoding"
RETRY_OF = "retry_of"

# --- study user attributes --------------------------------------------------------------
PILOT_DONE = "pilot_done"    # the pilot finished; FIDELITY is the fidelity it chose
FIDELITY = "fidelity"
NUM_LAYERS, BUDGET = "num_layers", "budget"
SEEDS_ENQUEUED = "seeds_enqueued"
SECONDS_PER_ALLOCATION = "seconds_per_allocation"   # one-shot scoring
STUDY_WALL = "study_wall_time_s"  # wall time of the sessions that wrote the outputs, summed (resume, decide)


def trial_seed(trial: Any, study_seed: int) -> int:
    """The seed a trial trained with (trials from before seeds were recorded trained with the study seed)."""
    return int(trial.user_attrs.get(TRAIN_SEED, study_seed))


def trial_origin(trial: Any) -> Origin:
    return Origin(str(trial.user_attrs.get(ORIGIN, "")))


def trial_spec(trial: Any) -> AllocationSpec:
    a = trial.user_attrs
    return AllocationSpec(tuple(a[ALLOCATION]), tuple(a[TOP_K]), tuple(a[RANK]), a.get(ORIGIN, "search"))


def spec_attrs(spec: AllocationSpec) -> dict[str, list[int]]:
    """The user attributes that record what `spec` trains."""
    return {ALLOCATION: list(spec.experts), TOP_K: list(spec.top_k), RANK: list(spec.rank)}


def forced(spec: AllocationSpec) -> dict[str, list[int]]:
    """The FORCED attribute of an allocation to train exactly as given."""
    return {"experts": list(spec.experts), "top_k": list(spec.top_k), "rank": list(spec.rank)}


def forced_spec(trial: Any) -> AllocationSpec | None:
    f = trial.user_attrs.get(FORCED)
    return AllocationSpec(tuple(f["experts"]), tuple(f["top_k"]), tuple(f["rank"])) if f else None


def spec_key(spec: AllocationSpec) -> tuple:
    """Allocations are the same when experts, top-k and rank agree in every layer (the source does not count)."""
    return tuple(spec.experts), tuple(spec.top_k), tuple(spec.rank)


def best_search_trial(study: Any, study_seed: int):
    """The COMPLETE trial with the best value among those trained with the study seed, or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if trial_seed(t, study_seed) == study_seed and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None
