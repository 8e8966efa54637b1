"""Trials as Ray Tune trials: on this machine's cores and GPUs, or on a Ray cluster.

Search trials are proposed by the study's Optuna driver through a Tune searcher (`_tune.OptunaBridge`);
Tune's ASHA prunes them, or for Wilcoxon a Tune scheduler that asks the same Optuna pruner. A trial
stopped either way is told to Optuna as PRUNED (never as a completed trial with a partial score).

Independent runs (the pilot, the finalists) come back as `TrialOutcome`s through Tune's results, not
through a shared disk; a finalist's run folder is sent to the driver's node (`_sink`).

While no node can run a trial (a node lost, no free CPUs or GPUs), both say what they wait for every minute and
end the study with `ResourceTimeout` after `resource_timeout` minutes (`_wait`); that is never a Tune failure
to retry or to fail runs for: finished trials and runs are kept, and a resumed study runs the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mola_search.errors import ResourceTimeout
from mola_search.search.config import StudyConfig
from mola_search.search.executors import _cluster
from mola_search.search.executors.base import Executor, RunDone, register_executor
from mola_search.search.study import Proposal, StudyDriver
from mola_search.trial import Fidelity, TrialOutcome, TrialRequest

MAX_TUNE_RESTARTS = 3


@register_executor
class RayExecutor(Executor):
    name = "ray"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen_nodes: dict[str, str] = {}  # node id -> "id at address", for every node any phase saw alive

    @classmethod
    def check(cls, config: StudyConfig) -> None:
        _cluster.check_cluster(config)

    def concurrency(self, trial_mb: float, measured: bool) -> tuple[int, str]:
        """Trials at once; turns activation checkpointing on for the trials when memory binds (and the user
        chose nothing about it): the same trained numbers, more trials at once."""
        chosen = "activation_checkpointing" in self.config.train
        n, line, checkpoint = _cluster.ray_concurrency(
            self.config, trial_mb, measured, checkpointed=bool(self.settings.train.get("activation_checkpointing")),
            can_checkpoint=not chosen and self.objective is None and self.settings.objective == "mola")
        if checkpoint and not self.settings.train.get("activation_checkpointing"):
            self.settings = replace(self.settings, train={**self.settings.train, "activation_checkpointing": True})
        return n, line

    def _watch(self, say: Any) -> Any:
        """The Tune callback that says what trials wait for, and ends the study after `resource_timeout`."""
        from mola_search.search.executors._tune import ResourceWatch
        from mola_search.search.executors._wait import ResourceWait

        need = {"CPU": self.config.cpus_per_trial, "GPU": self.config.gpus_per_trial}
        return ResourceWatch(ResourceWait(need, self.config.resource_timeout, say, seen=self._seen_nodes))

    def search(self, driver: StudyDriver, fidelity: Fidelity, concurrency: int | None = None) -> None:
        """Search trials as Tune trials; if Tune itself gives up (e.g. Ray's memory monitor killed a trial's
        actor while it started), the trials it had in flight are FAILED with the reason and Tune is started
        again for the trials still to run."""
        from mola_search.search.executors._tune import tune_failure

        for attempt in range(MAX_TUNE_RESTARTS + 1):
            if driver.remaining() == 0:
                return
            live: dict[str, Proposal] = {}
            try:
                self._search_once(driver, fidelity, live, concurrency)
                return
            except ResourceTimeout:  # the study ends; the trials still waiting are re-queued by --resume
                raise
            except Exception as exc:  # noqa: BLE001 - Tune raised out of fit(): record it, keep the study going
                reason = tune_failure(exc)
                for proposal in list(live.values()):
                    driver.finish(proposal, TrialOutcome(failure=reason))
                driver.progress.message(f"Ray Tune stopped ({reason}); "
                                        + ("starting it again for the remaining trials" if attempt < MAX_TUNE_RESTARTS
                                           else "giving up: continue later with mola-search --resume"))

    def _search_once(self, driver: StudyDriver, fidelity: Fidelity, live: dict[str, Proposal],
                     concurrency: int | None) -> None:
        from ray import tune

        from mola_search.search.executors._tune import OptunaBridge

        _cluster.init_ray(self.config)
        bridge = OptunaBridge(driver, live, self.folder.ray_dir)
        tuner = tune.Tuner(
            self._trainable(fidelity),
            tune_config=tune.TuneConfig(search_alg=bridge, scheduler=self._scheduler(bridge, fidelity),
                                        num_samples=driver.remaining(), max_concurrent_trials=concurrency,
                                        metric="score", mode="max"),
            run_config=tune.RunConfig(name="tune", storage_path=str(self.folder.ray_dir), verbose=0,
                                      log_to_file=True, callbacks=[self._watch(driver.progress.message)]),
        )
        tuner.fit()

    def _scheduler(self, bridge: Any, fidelity: Fidelity) -> Any:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        from mola_search.search.executors._tune import OptunaPruning

        if self.config.scheduler == "asha" and len(fidelity.rungs) > 1:
            return ASHAScheduler(time_attr="rung", max_t=len(fidelity.rungs), grace_period=1,
                                 reduction_factor=self.config.asha_reduction_factor)
        if self.config.scheduler == "wilcoxon" and len(fidelity.rungs) > 1:
            return OptunaPruning(bridge)
        return FIFOScheduler()

    def _trainable(self, fidelity: Fidelity, **extra: Any) -> Any:
        from ray import tune

        from mola_search.search.executors._tune import trainable

        return tune.with_resources(
            tune.with_parameters(trainable, settings=self.settings.to_dict(), fidelity=fidelity.to_dict(),
                                 num_layers=self.num_layers, objective=self.objective, **extra),
            _cluster.trial_resources(self.config))

    def run(self, requests: Sequence[TrialRequest], fidelity: Fidelity, on_done: RunDone, *, name: str = "runs",
            concurrency: int | None = None) -> None:
        """Independent runs spread over the cluster, never pruned. Each run's outcome (scores, per-example
        values, metrics) comes back in its last Tune result and is handed to `on_done` here as the run ends;
        a run whose worker died, or that Tune never finished, comes back as an outcome with a failure."""
        from ray import tune

        from mola_search.search.executors._sink import start_sink, stop_sink
        from mola_search.search.executors._tune import Finished, tune_failure

        told: list[dict[str, Any]] = []  # requests whose outcome reached on_done
        _cluster.init_ray(self.config)
        root = self.folder.resolved().root
        sink, sink_handle = start_sink(root) if any(r.out for r in requests) else (None, None)
        tuner = tune.Tuner(
            self._trainable(fidelity, sink=sink, study_folder=str(root)),
            param_space={"request": tune.grid_search([r.to_payload() for r in requests])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, metric="score", mode="max"),
            run_config=tune.RunConfig(name=name, storage_path=str(self.folder.ray_dir), verbose=0,
                                      log_to_file=True, callbacks=[Finished(on_done, told), self._watch(self.say)]),
        )
        try:
            tuner.fit()
        except ResourceTimeout:  # the study ends; the runs not told yet run again when it is resumed
            raise
        except Exception as exc:  # noqa: BLE001 - Tune gave up: the runs it never finished are failed, with why
            reason = tune_failure(exc)
            for r in requests:
                if r.to_payload() not in told:
                    on_done(r, TrialOutcome(failure=f"{reason}; resume the study to run it again"))
        finally:
            if sink:
                stop_sink(sink)
            del sink_handle
