"""The study folder (`StudyFolder`): every path in it, and every read and write of it.

No other module names a file of the folder; each write is atomic (`mola_search._io`), each JSON file
strict (NaN is null). A study that is still being written can be read at any time: a missing file is
"not there yet", not an error, unless the method says otherwise::

    <study>/
      study.json                           StudyConfig (search.config)
      study.db                             Optuna storage (unless `storage` points elsewhere; study.records)
      noise.json                           the pilot's noise floor and auto-fidelity rounds (stats.noise)
      pilot/round<r>/<shape>-seed<s>.json  kept pilot outcomes (a resumed study re-runs none)
      finalists/<label>/seed<s>/           a finalist run: metrics.json, allocation.json, adapter/
      trials.csv, finalists.csv            (study.tables)
      racing.json                          the final stage's race and decision (study.decision)
      best_allocation.json                 the exported allocation (study.best), summary.md (study.summary)
      oneshot.json, oneshot.csv, supernet/ the one-shot strategy (strategies.oneshot)
      ray/                                 Ray Tune's own logs
      report/                              `mola-search report`
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mola_search._io import atomic_write_bytes, atomic_write_text, read_json, write_json
from mola_search.allocation import AllocationSpec, load_spec_with_metadata, save_spec
from mola_search.errors import UserError
from mola_search.search.study import tables
from mola_search.search.study.finalist import Finalist
from mola_search.stats.noise import NoiseFloor

STUDY_JSON = "study.json"
STUDY_DB = "study.db"
NOISE_JSON = "noise.json"
TRIALS_CSV = "trials.csv"
FINALISTS_CSV = "finalists.csv"
BEST_ALLOCATION = "best_allocation.json"
SUMMARY_MD = "summary.md"
ONESHOT_JSON = "oneshot.json"
ONESHOT_CSV = "oneshot.csv"
RACING_JSON = "racing.json"
PILOT_DIR = "pilot"
FINALISTS_DIR = "finalists"
SUPERNET_DIR = "supernet"
SUPERNET_LOG = "log.json"
RAY_DIR = "ray"
REPORT_DIR = "report"
RUN_METRICS = "metrics.json"        # in a run folder (finalists/<label>/seed<s>/)
RUN_ADAPTER = "adapter"             # likewise
ADAPTER_CONFIG = "adapter_config.json"

_LABEL = re.compile(r"^t(\d+)-(.*)$")
_SEED_DIR = re.compile(r"^seed(-?\d+)$")


class StudyFolder:
    """A study folder on disk. `root` need not exist yet (`create` makes it once every check passed)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StudyFolder({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name

    def resolved(self) -> "StudyFolder":
        """The same folder with an absolute path (Ray trials run in working directories of their own)."""
        return StudyFolder(self.root.resolve())

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # --- study.json -----------------------------------------------------------------------------------
    def is_study(self) -> bool:
        return (self.root / STUDY_JSON).is_file()

    def read_config(self) -> dict[str, Any]:
        """study.json as a dict; a folder without one, or with a broken one, is a one-line UserError."""
        import json

        path = self.root / STUDY_JSON
        if not path.is_file():
            raise UserError(f"{self.root} is not a mola-search study folder ({STUDY_JSON} is missing); "
                            "pass the folder a previous `mola-search` run wrote, e.g. runs/<study>")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} holds a {type(raw).__name__}: expected the JSON object of a study's settings")
        return raw

    def write_config(self, config: dict[str, Any]) -> Path:
        return write_json(self.root / STUDY_JSON, config)

    # --- Optuna storage -------------------------------------------------------------------------------
    def storage_url(self, configured: str | None = None) -> str:
        """`configured` when the study names a storage, else the sqlite file in the folder."""
        return configured or f"sqlite:///{(self.root / STUDY_DB).resolve()}"

    def has_storage(self) -> bool:
        return (self.root / STUDY_DB).is_file()

    def open_optuna(self, storage: str | None, study_name: str | None) -> Any:
        """The folder's Optuna study, for readers (report, export); a missing or unreadable one is a UserError."""
        import optuna

        if storage is None and not self.has_storage():
            raise UserError(f"{self.root} has {STUDY_JSON} but no {STUDY_DB}: the study never started "
                            f"(start it with `mola-search --resume {self.root}`)")
        url = self.storage_url(storage)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = study_name or self.name
        try:
            return optuna.load_study(study_name=name, storage=url)
        except KeyError:
            raise UserError(f"{self.root}: the storage has no Optuna study named '{name}'") from None
        except Exception as exc:  # noqa: BLE001 - an unreadable storage is bad input, not a bug
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"{self.root}: cannot open the Optuna storage {url} ({type(exc).__name__}: "
                            f"{first})") from None

    # --- noise.json -----------------------------------------------------------------------------------
    def write_noise(self, floor: NoiseFloor, rounds: Sequence[NoiseFloor] = ()) -> Path:
        """The chosen estimate at top level plus ``"rounds"``: the auto-fidelity history in order, the chosen
        one last (appended when it is not already the last round)."""
        history = list(rounds)
        if not history or history[-1] != floor:
            history.append(floor)
        return write_json(self.root / NOISE_JSON, {**floor.to_dict(), "rounds": [r.to_dict() for r in history]})

    def has_noise(self) -> bool:
        return (self.root / NOISE_JSON).is_file()

    def read_noise(self) -> NoiseFloor | None:
        """The chosen estimate; None when no pilot ran. A broken file is a UserError that says what to do."""
        raw = self._noise_json()
        if raw is None:
            return None
        return self._noise_from(raw)

    def read_noise_rounds(self) -> list[NoiseFloor]:
        """Every auto-fidelity round, the last one chosen; [] when there is no file."""
        raw = self._noise_json()
        if raw is None:
            return []
        rounds = raw.get("rounds", [raw])
        if not isinstance(rounds, list):
            raise UserError(f"{self.root / NOISE_JSON}: 'rounds' is a {type(rounds).__name__}, expected a list "
                            f"of noise estimates")
        return [self._noise_from(r) for r in rounds]

    def _noise_from(self, raw: Any) -> NoiseFloor:
        try:
            return NoiseFloor.from_dict(raw)
        except UserError as exc:
            raise UserError(f"{self.root / NOISE_JSON}: {exc}") from None

    def _noise_json(self) -> dict[str, Any] | None:
        import json

        path = self.root / NOISE_JSON
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not readable JSON ({exc}): delete it to re-run the pilot, or restore "
                            "it") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} holds a {type(raw).__name__}: expected a JSON object written by write_noise")
        return raw

    # --- pilot outcomes -------------------------------------------------------------------------------
    def pilot_outcome_path(self, round_index: int, shape: str, seed: int) -> Path:
        return self.root / PILOT_DIR / f"round{round_index}" / f"{shape}-seed{seed}.json"

    def write_pilot_outcome(self, round_index: int, shape: str, seed: int, outcome: dict[str, Any],
                            fidelity: dict[str, Any]) -> Path:
        """One pilot run's outcome (a `TrialOutcome` as a dict), kept so a resumed study never runs it again."""
        return write_json(self.pilot_outcome_path(round_index, shape, seed), {"fidelity": fidelity, "outcome": outcome},
                          indent=1)

    def read_pilot_outcome(self, round_index: int, shape: str, seed: int,
                           fidelity: dict[str, Any]) -> dict[str, Any] | None:
        """The kept outcome if it was trained at `fidelity`, else None."""
        raw = read_json(self.pilot_outcome_path(round_index, shape, seed))
        if not raw or raw.get("fidelity") != fidelity:
            return None
        return raw.get("outcome")

    def pilot_outcomes(self) -> list[dict[str, Any]]:
        """Every kept pilot outcome (all rounds), for throughput accounting."""
        root = self.root / PILOT_DIR
        found = [read_json(p) for p in sorted(root.glob("round*/*.json"))] if root.is_dir() else []
        return [raw["outcome"] for raw in found if raw and isinstance(raw.get("outcome"), dict)]

    # --- finalist runs --------------------------------------------------------------------------------
    def finalist_run_dir(self, label: str, seed: int) -> Path:
        return self.root / FINALISTS_DIR / label / f"seed{seed}"

    def finalist_dir(self, label: str) -> Path:
        return self.root / FINALISTS_DIR / label

    def run_metrics(self, run_dir: Path) -> dict[str, Any] | None:
        """A finished run's metrics.json, or None when the run has not finished."""
        return read_json(Path(run_dir) / RUN_METRICS)

    def write_run_metrics(self, run_dir: Path, metrics: dict[str, Any]) -> Path:
        """A finished run's metrics.json, written on the driver from the outcome the run sent back (a worker
        that shares this disk wrote it already; that file is kept)."""
        path = Path(run_dir) / RUN_METRICS
        if not path.is_file():
            write_json(path, metrics)
        return path

    def write_run_file(self, relative: str, data: bytes) -> int:
        """A file a finalist run on another node sent back; `relative` may not leave the folder."""
        root = self.root.resolve()
        path = (root / relative).resolve()
        if root not in path.parents:
            raise ValueError(f"{relative} is outside the study folder")
        atomic_write_bytes(path, data)
        return len(data)

    def finalist_runs(self) -> list[tuple[str, list[tuple[int, Path, dict[str, Any]]]]]:
        """Every finished finalist run: [(label, [(train seed, run folder, metrics)])], labels and seeds sorted."""
        root = self.root / FINALISTS_DIR
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

    @staticmethod
    def parse_finalist_label(label: str) -> tuple[int, str] | None:
        """(trial number, origin text) of a finalist label, or None for a folder that is not one."""
        from mola_search.search.study.origin import Origin

        m = _LABEL.match(label)
        return (int(m.group(1)), Origin.from_label(m.group(2)).text) if m else None

    @staticmethod
    def run_adapter(run_dir: Path) -> Path:
        return Path(run_dir) / RUN_ADAPTER

    @staticmethod
    def is_adapter(folder: Path) -> bool:
        return (Path(folder) / ADAPTER_CONFIG).is_file()

    # --- tables ---------------------------------------------------------------------------------------
    def write_trials_csv(self, study: Any) -> Path:
        return atomic_write_text(self.root / TRIALS_CSV, tables.trials_csv(study))

    def write_finalists_csv(self, finalists: Sequence[Finalist]) -> Path:
        return atomic_write_text(self.root / FINALISTS_CSV, tables.finalists_csv(finalists))

    @property
    def trials_csv(self) -> Path:
        return self.root / TRIALS_CSV

    # --- best_allocation.json and summary.md ------------------------------------------------------------
    def write_best(self, spec: AllocationSpec, record: dict[str, Any]) -> Path:
        return save_spec(spec, self.root / BEST_ALLOCATION, **record)

    def read_best(self) -> dict[str, Any] | None:
        return read_json(self.root / BEST_ALLOCATION)

    def read_best_spec(self) -> tuple[AllocationSpec, dict[str, Any]] | None:
        path = self.root / BEST_ALLOCATION
        return load_spec_with_metadata(path) if path.is_file() else None

    def write_summary(self, markdown: str) -> Path:
        return atomic_write_text(self.root / SUMMARY_MD, markdown)

    def has_summary(self) -> bool:
        return (self.root / SUMMARY_MD).is_file()

    @property
    def summary_md(self) -> Path:
        return self.root / SUMMARY_MD

    # --- the decision ---------------------------------------------------------------------------------
    def write_racing(self, record: dict[str, Any]) -> Path:
        return write_json(self.root / RACING_JSON, record)

    def read_racing(self) -> dict[str, Any] | None:
        return read_json(self.root / RACING_JSON)

    # --- one-shot -------------------------------------------------------------------------------------
    def write_oneshot(self, record: dict[str, Any]) -> Path:
        return write_json(self.root / ONESHOT_JSON, record)

    def read_oneshot(self) -> dict[str, Any] | None:
        return read_json(self.root / ONESHOT_JSON)

    def write_oneshot_csv(self, study: Any) -> Path:
        return atomic_write_text(self.root / ONESHOT_CSV, tables.oneshot_csv(study))

    @property
    def supernet_dir(self) -> Path:
        return self.root / SUPERNET_DIR

    @property
    def supernet_adapter(self) -> Path:
        return self.root / SUPERNET_DIR / RUN_ADAPTER

    def read_supernet_log(self) -> dict[str, Any] | None:
        return read_json(self.root / SUPERNET_DIR / SUPERNET_LOG)

    def write_supernet_log(self, log: dict[str, Any]) -> Path:
        return write_json(self.root / SUPERNET_DIR / SUPERNET_LOG, log, indent=1)

    # --- other tools' folders -------------------------------------------------------------------------
    @property
    def ray_dir(self) -> Path:
        return (self.root / RAY_DIR).resolve()

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    def adapters(self) -> Iterator[Path]:
        """Every trained adapter folder of the study's finalist runs."""
        for _, runs in self.finalist_runs():
            for _, run_dir, _ in runs:
                if self.is_adapter(self.run_adapter(run_dir)):
                    yield self.run_adapter(run_dir)
