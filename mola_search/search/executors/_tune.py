"""Ray Tune's side of the Ray executor: the searcher that asks the study's Optuna driver, the scheduler that
asks its pruner, the callback that hands independent runs' outcomes back, the callback that says what trials
wait for (`_wait`), and the function a worker runs.

Imported only when a study runs on Ray (it imports Ray Tune at module level).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from mola_search.search.executors._wait import ResourceWait, trial_counts
from mola_search.search.study import Proposal, StudyDriver
from mola_search.trial import Fidelity, TrialOutcome, TrialRequest, TrialSettings, run_trial


def trainable(config: dict[str, Any], settings: dict[str, Any], fidelity: dict[str, Any], num_layers: int,
              sink: str | None = None, study_folder: str | None = None,
              objective: Callable[..., Any] | None = None) -> None:
    """Runs inside a Ray worker: one trial, reported rung by rung; a finished finalist's run folder is
    sent to the driver's sink."""
    from mola_search.search.executors._sink import send_run_folder

    request = TrialRequest.from_payload(config["request"])

    def report(rung: int, score: float, last: bool, examples: list[float] | None) -> bool:
        if last or score != score:  # the last rung is reported once, with the outcome, below
            return False
        tune.report({"rung": rung, "score": score, "examples": examples, "node": _node()})
        return False

    outcome = run_trial(TrialSettings.from_dict(settings), Fidelity.from_dict(fidelity), request, report,
                        num_layers, objective)
    if sink and request.out and outcome.failure is None and Path(request.out).is_dir():
        try:
            send_run_folder(sink, Path(request.out), Path(study_folder))
        except Exception as exc:  # noqa: BLE001 - the run is lost to the study: say so, never drop it silently
            outcome.failure = f"could not send the run folder to the driver: {type(exc).__name__}: {exc}"[:500]
    score = outcome.score if outcome.score is not None and outcome.score == outcome.score else -1e9
    tune.report({"rung": len(outcome.scores) or 1, "score": score, "final": True, "outcome": outcome.to_payload(),
                 "node": outcome.node})


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def tune_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.removeprefix("Caught unexpected exception: ")
    kind = "out of memory" if "memory" in text.lower() else type(exc).__name__
    return f"{kind}: {text}"[:500]


class OptunaBridge(Searcher):
    """Ray's view of the StudyDriver: suggest = ask, results = report, complete = tell."""

    def __init__(self, driver: StudyDriver, live: dict[str, Proposal], ray_dir: Path) -> None:
        super().__init__(metric="score", mode="max")
        self.driver, self.live, self.ray_dir = driver, live, ray_dir
        self.exhausted = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm into ray/tune/tuner.pkl (for Tuner.restore, which this
        # executor never uses: `mola-search --resume` continues from the Optuna storage). The live
        # driver (storage connection, sampler, output stream) is not state to pickle, and may not pickle.
        return {**self.__dict__, "driver": None, "live": {}}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.exhausted:
            return Searcher.FINISHED
        proposal = self.driver.ask()
        if proposal is None:
            self.exhausted = True
            self.driver.progress.message("sampler only proposes allocations already trained: stopping early")
            return Searcher.FINISHED
        self.live[trial_id] = proposal
        return {"request": proposal.request.to_payload()}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        proposal = self.live.get(trial_id)
        if proposal is not None and not result.get("final"):  # (the Wilcoxon scheduler reported it already)
            self.driver.report(proposal, int(result["rung"]), float(result["score"]), result.get("examples"))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        proposal = self.live.pop(trial_id, None)
        if proposal is None:
            return
        if error or result is None:
            outcome = TrialOutcome(failure="the Ray worker died or raised outside the trial (killed, or out of "
                                           f"memory); see {self.ray_dir}")
        elif result.get("final"):
            outcome = TrialOutcome.from_payload(result["outcome"])
            if outcome.scores and not outcome.failure and not outcome.pruned:
                self.driver.report(proposal, len(outcome.scores), outcome.scores[-1],
                                   outcome.example_scores[-1] if outcome.example_scores else None)
        else:  # stopped by the scheduler after a rung: pruned, with the rung scores it reached
            if "rung" in result and "score" in result:
                self.driver.report(proposal, int(result["rung"]), float(result["score"]), result.get("examples"))
            outcome = TrialOutcome(pruned=True, node=str(result.get("node", "")))
        self.driver.finish(proposal, outcome)


class OptunaPruning(FIFOScheduler):
    """A Tune scheduler that stops a trial when the study's Optuna pruner (Wilcoxon) says so.

    Tune asks the scheduler before the search algorithm, so the rung (with its per-example
    values) is reported to Optuna here; the bridge's later report of the same rung is a no-op.
    """

    def __init__(self, bridge: OptunaBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl like the bridge: no live driver
        return {**self.__dict__, "bridge": None}

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        proposal = self.bridge.live.get(trial.trial_id) if self.bridge is not None else None
        if proposal is None or result.get("final") or "rung" not in result:
            return TrialScheduler.CONTINUE
        prune = self.bridge.driver.report(proposal, int(result["rung"]), float(result["score"]),
                                          result.get("examples"))
        return TrialScheduler.STOP if prune else TrialScheduler.CONTINUE


class Finished(tune.Callback):
    """Tune calls back in this process as each independent run ends: the user sees progress, not silence."""

    def __init__(self, on_done: Callable[[TrialRequest, TrialOutcome], None] | None,
                 told: list[dict[str, Any]]) -> None:
        # arguments and attributes, not closure variables: Tune pickles this callback into tuner.pkl,
        # and __getstate__ can leave out an attribute, not a closure cell
        self.on_done, self.told = on_done, told

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_done": None, "told": []}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if result.get("final") and "outcome" in result:
            self._tell(trial, TrialOutcome.from_payload(result["outcome"]))
        else:
            self._tell(trial, TrialOutcome(failure="the run ended without reporting an outcome"))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._tell(trial, TrialOutcome(failure="the Ray worker died or raised outside the run "
                                               "(killed, or out of memory)"))

    def _tell(self, trial, outcome: TrialOutcome) -> None:
        request = TrialRequest.from_payload(trial.config["request"])
        self.told.append(request.to_payload())
        if self.on_done:
            self.on_done(request, outcome)


class ResourceWatch(tune.Callback):
    """Each step of Tune's loop, tells `ResourceWait` how many trials are PENDING and RUNNING; it says what they
    wait for when no node can place one, and raises `ResourceTimeout` out of `Tuner.fit()` after
    `resource_timeout` minutes (mola_search.search.executors._wait)."""

    def __init__(self, wait: ResourceWait | None) -> None:
        self.wait = wait

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl like the others: no live output stream
        return {**self.__dict__, "wait": None}

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.wait is not None:
            self.wait.step(*trial_counts([t.status for t in trials]))
