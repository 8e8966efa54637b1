"""In-process, one trial after another: what tests, benchmarks and single-core users need.

The study's Optuna pruner (successive halving, or Wilcoxon paired over validation examples) stops weak
trials at a rung."""

from __future__ import annotations

from collections.abc import Sequence

from mola_search.errors import UserError
from mola_search.search.config import StudyConfig
from mola_search.search.executors.base import Executor, RunDone, register_executor
from mola_search.search.study import StudyDriver
from mola_search.trial import Fidelity, TrialRequest, run_trial


@register_executor
class LocalExecutor(Executor):
    name = "local"

    @classmethod
    def check(cls, config: StudyConfig) -> None:
        """`device` must exist here, and `gpus_per_trial` > 0 needs a visible GPU."""
        from mola_search.models import parse_device

        if config.gpus_per_trial > 0:
            try:
                parse_device("cuda")
            except UserError:
                raise UserError(f"`gpus_per_trial` {config.gpus_per_trial:g} with `executor` local: no CUDA GPU is "
                                "visible here; set it to 0 (trials run on the CPU) or run on a GPU machine") from None
        parse_device(config.device)

    def concurrency(self, trial_mb: float, measured: bool) -> tuple[int, str]:
        return 1, ""  # one trial at a time, in this process: nothing to say per phase

    def search(self, driver: StudyDriver, fidelity: Fidelity, concurrency: int | None = None) -> None:
        prune = self.config.scheduler != "none"
        while driver.remaining() > 0:
            proposal = driver.ask()
            if proposal is None:
                driver.progress.message("sampler only proposes allocations already trained: stopping early")
                return

            def report(rung: int, score: float, last: bool, examples: list[float] | None) -> bool:
                return driver.report(proposal, rung, score, examples) and prune and not last

            outcome = run_trial(self.settings, fidelity, proposal.request, report, self.num_layers, self.objective)
            driver.finish(proposal, outcome)

    def run(self, requests: Sequence[TrialRequest], fidelity: Fidelity, on_done: RunDone, *, name: str = "runs",
            concurrency: int | None = None) -> None:
        for request in requests:
            on_done(request, run_trial(self.settings, fidelity, request, lambda *_: False, self.num_layers,
                                       self.objective))
