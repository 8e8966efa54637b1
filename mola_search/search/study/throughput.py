"""A study's throughput: what each phase ran, how long, on what, and its peak memory, so the next study can be
sized from this one. Everything is read from what the study recorded: the trials' wall time and peak memory
(Optuna user attributes), the pilot's kept outcomes, the race's runs (racing.json) and the one-shot record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from mola_search.search.study.records import DUPLICATE_OF, PEAK_RSS, PILOT, WALL_TIME


@dataclass
class PhaseUse:
    phase: str
    runs: int
    run_hours: float           # the runs' wall time, summed
    peak_mb: float             # the largest peak resident memory of one run (0: not recorded)


def phase_use(study: Any, folder: Any, oneshot: dict[str, Any] | None = None,
              racing: dict[str, Any] | None = None) -> list[PhaseUse]:
    """Pilot, search, one-shot scoring (in the driver) and the race, from what the study recorded."""
    pilot = folder.pilot_outcomes()
    out = [PhaseUse("pilot", len(pilot), sum(o.get("wall_time_s") or 0.0 for o in pilot) / 3600,
                    max((o.get("peak_rss_mb") or 0.0 for o in pilot), default=0.0))] if pilot else []
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
              and DUPLICATE_OF not in t.user_attrs and not t.user_attrs.get(PILOT)]
    if trials:
        out.append(PhaseUse("search", len(trials), sum(float(t.user_attrs.get(WALL_TIME) or 0.0) for t in trials) / 3600,
                            max(float(t.user_attrs.get(PEAK_RSS) or 0.0) for t in trials)))
    scoring = (oneshot or {}).get("scoring") or {}
    if scoring.get("scored"):
        seconds = (scoring.get("seconds_per_allocation") or 0.0) * scoring["scored"]
        seconds += ((oneshot or {}).get("supernet") or {}).get("wall_time_s") or 0.0
        out.append(PhaseUse("one-shot supernet + scoring (driver)", 1, seconds / 3600, scoring.get("peak_rss_mb") or 0.0))
    entries = (racing or {}).get("contenders") or []
    walls = [float(v) for e in entries for v in (e.get("wall_s") or {}).values() if v is not None]
    peaks = [float(v) for e in entries for v in (e.get("peak_mb") or {}).values() if v is not None]
    if entries:
        runs = (racing or {}).get("runs") or len(walls)
        out.append(PhaseUse((racing or {}).get("stage", "racing") if (racing or {}).get("stage") != "racing" else "race",
                            runs, sum(walls) / 3600, max(peaks, default=0.0)))
    return out


def throughput_lines(uses: list[PhaseUse], *, wall_time_s: float | None, cpus_per_trial: float,
                     gpus_per_trial: float) -> list[str]:
    """The throughput table in Markdown: runs, CPU and GPU hours, peak memory per phase, runs per hour."""
    if not uses:
        return []
    lines = ["| phase | runs | run hours | CPU hours | GPU hours | peak memory of a run |", "|---|---:|---:|---:|---:|---:|"]
    for u in uses:
        driver = u.phase.endswith("(driver)")
        cpus, gpus = (1.0, 0.0) if driver else (cpus_per_trial, gpus_per_trial)
        lines.append(f"| {u.phase} | {u.runs} | {u.run_hours:.2f} | {u.run_hours * cpus:.2f} | {u.run_hours * gpus:.2f} | "
                     + (f"{u.peak_mb / 1024:.2f} GB" if u.peak_mb else "–") + " |")
    runs = sum(u.runs for u in uses if not u.phase.endswith("(driver)"))
    if wall_time_s:
        lines.append(f"\n{runs} runs in {wall_time_s / 3600:.2f} h of wall time: {runs / (wall_time_s / 3600):.1f} runs "
                     f"per hour ({cpus_per_trial:g} CPU + {gpus_per_trial:g} GPU per run).")
    return lines
