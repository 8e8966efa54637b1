"""The study folder's layout and the Optuna records in it: the one place that names them.

The runner writes a study folder, `mola-search export` and the report read it; all three go
through this module, so a key or a path can change in one place and a reader never guesses::

    <study>/
      study.json                       StudyConfig (search.config)
      study.db                         Optuna storage (unless --storage points elsewhere)
      noise.json                       the pilot's noise floor (search.noise)
      pilot/round<r>/<shape>-seed<s>.json   kept pilot outcomes (search.outputs)
      finalists/<label>/seed<s>/       a finalist run folder: metrics.json, allocation.json, adapter/
      trials.csv, finalists.csv, best_allocation.json, summary.md   (search.outputs)

Trial user attributes (the `*` keys below) carry what a trial trained; only trials with the
study's training seed are compared with each other (common random numbers), so "the best
trial" is always the best of those, never a pilot run that happened to draw a lucky seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mola_search.allocation import AllocationSpec
from mola_search.errors import UserError

# --- files and folders ------------------------------------------------------------------
STUDY_DB = "study.db"
NOISE_JSON = "noise.json"
TRIALS_CSV = "trials.csv"
FINALISTS_CSV = "finalists.csv"
BEST_ALLOCATION = "best_allocation.json"
SUMMARY_MD = "summary.md"
PILOT_DIR = "pilot"
FINALISTS_DIR = "finalists"
RUN_METRICS = "metrics.json"
_LABEL = re.compile(r"^t(\d+)-(.*)$")
_SEED_DIR = re.compile(r"^seed(-?\d+)$")

# --- trial user attributes --------------------------------------------------------------
ORIGIN = "origin"            # "seed:<name>" for an enqueued seed shape, else the sampler name
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

# --- study user attributes --------------------------------------------------------------
PILOT_DONE = "pilot_done"    # the pilot finished; FIDELITY is the fidelity it chose
FIDELITY = "fidelity"
NUM_LAYERS, BUDGET = "num_layers", "budget"


def default_storage(folder: Path) -> str:
    return f"sqlite:///{(Path(folder) / STUDY_DB).resolve()}"


def open_study(folder: Path, config: Any):
    """The Optuna study of `folder` (whose StudyConfig is `config`); a missing or unreadable one is a UserError."""
    import optuna

    storage = config.storage or default_storage(folder)
    if config.storage is None and not (Path(folder) / STUDY_DB).is_file():
        raise UserError(f"{folder} has study.json but no {STUDY_DB}: the study never started "
                        f"(start it with `mola-search --resume {folder}`)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = config.study_name or Path(folder).name
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"{folder}: the storage has no Optuna study named '{name}'") from None
    except Exception as exc:  # noqa: BLE001 - an unreadable storage is bad input, not a bug
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{folder}: cannot open the Optuna storage {storage} ({type(exc).__name__}: {first})") from None


# --- trials -----------------------------------------------------------------------------
def trial_seed(trial: Any, study_seed: int) -> int:
    """The seed a trial trained with (trials from before seeds were recorded trained with the study seed)."""
    return int(trial.user_attrs.get(TRAIN_SEED, study_seed))


def trial_spec(trial: Any) -> AllocationSpec:
    a = trial.user_attrs
    return AllocationSpec(tuple(a[ALLOCATION]), tuple(a[TOP_K]), tuple(a[RANK]), a.get(ORIGIN, "search"))


def best_search_trial(study: Any, study_seed: int):
    """The COMPLETE trial with the best value among those trained with the study seed, or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if trial_seed(t, study_seed) == study_seed and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


# --- finalists --------------------------------------------------------------------------
def finalist_label(number: int, origin: str) -> str:
    """`t007-seed_inverted_triangle`: the trial it came from and how that trial was proposed."""
    return f"t{number:03d}-{origin.replace(':', '_')}"


def parse_finalist_label(label: str) -> tuple[int, str] | None:
    """(trial number, origin) of a finalist label, or None for a folder that is not one."""
    m = _LABEL.match(label)
    if m is None:
        return None
    origin = m.group(2)
    for prefix in ("seed", "oneshot"):  # the origins with a colon that finalists have
        if origin.startswith(prefix + "_"):
            origin = f"{prefix}:{origin[len(prefix) + 1:]}"
    return int(m.group(1)), origin


def finalist_run_dir(folder: Path, label: str, seed: int) -> Path:
    return Path(folder) / FINALISTS_DIR / label / f"seed{seed}"


def pilot_outcome_path(folder: Path, round_index: int, shape: str, seed: int) -> Path:
    return Path(folder) / PILOT_DIR / f"round{round_index}" / f"{shape}-seed{seed}.json"


def finalist_runs(folder: Path) -> list[tuple[str, list[tuple[int, Path, dict[str, Any]]]]]:
    """Every finished finalist run: [(label, [(train seed, run folder, metrics)])], labels and seeds sorted."""
    root = Path(folder) / FINALISTS_DIR
    if not root.is_dir():
        return []
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _LABEL.match(p.name)):
        runs = []
        for run in sub.iterdir():
            m = _SEED_DIR.match(run.name)
            metrics = read_json(run / RUN_METRICS) if m and run.is_dir() else None
            if metrics is None:
                continue
            seed = metrics.get("train_seed")
            seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else int(m.group(1))
            runs.append((seed, run, metrics))
        out.append((sub.name, sorted(runs, key=lambda r: r[0])))
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
