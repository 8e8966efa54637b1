"""What becomes of the contenders: the `FinalStage` interface and the registry of stages by name.

Call order (search.runner): the strategy names its contenders -> `FinalStage.run(study, contenders)` retrains
them at finalist fidelity with seeds no search or pilot trial used, scores validation and test, and returns
one `Finalist` per contender (failed runs carried with their reasons) -> the study's outputs choose the best on
validation and report test once. A stage must be resumable: a run whose metrics.json exists is never trained
again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from mola_search.allocation import run_length
from mola_search.search.progress import RunProgress
from mola_search.search.study import Contender, Finalist
from mola_search.trial import TrialOutcome, TrialRequest

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext

FINAL_STAGES: dict[str, type["FinalStage"]] = {}


def register_stage(cls: type["FinalStage"]) -> type["FinalStage"]:
    FINAL_STAGES[cls.name] = cls
    return cls


class FinalStage(ABC):
    name: ClassVar[str]

    @abstractmethod
    def run(self, study: "StudyContext", contenders: Sequence[Contender]) -> list[Finalist]:
        """Retrain and score the contenders; one `Finalist` per contender."""


Failures = dict[tuple[int, int], str]
"""(contender's trial number, training seed) -> why that run produced no metrics."""


def train_runs(study: "StudyContext", contenders: Sequence[Contender], seeds: Sequence[int], what: str) -> Failures:
    """Train every (contender, seed) run that has no metrics.json yet, at finalist fidelity, scored on
    validation and the held-out test split; each run's metrics come back with its outcome and are written
    here, on the driver. Failed runs leave no metrics.json; their reasons are returned for `collect`."""
    requests, labels = [], {}
    for c in contenders:
        labels[c.number] = c.label
        for seed in seeds:
            out = study.folder.finalist_run_dir(c.label, seed)
            if study.folder.run_metrics(out) is None:  # finished runs are kept: the stage resumes too
                requests.append(TrialRequest(c.number, c.spec.experts, c.spec.top_k, c.spec.rank, c.origin,
                                             train_seed=seed, min_experts=study.space.min_experts,
                                             max_experts=study.space.max_experts, final=True, out=str(out)))
    failures: Failures = {}
    if not requests:
        return failures
    study.message(what.format(runs=len(requests)))
    runs = RunProgress(len(requests), study.progress.stream)

    def on_done(r: TrialRequest, outcome: TrialOutcome) -> None:
        if outcome.failure is None and outcome.metrics:
            study.folder.write_run_metrics(r.out, outcome.metrics)
        else:
            failures[(r.number, r.train_seed)] = outcome.failure or "the run produced no metrics"
        runs.run_done(labels[r.number], r.train_seed, outcome.test_score, outcome.failure,
                      what=f"test {study.config.metric}")

    study.executor.run(requests, study.fidelity, on_done, name="finalists",
                       concurrency=study.concurrency("finalists"))
    return failures


def collect(study: "StudyContext", contender: Contender, seeds: Sequence[int], failures: Failures) -> Finalist:
    """A contender's finished runs at `seeds`, read from their metrics.json; the others as failures."""
    metric = study.config.metric
    fin = Finalist(contender.label, contender.number, contender.origin, contender.spec, [], [])
    for seed in seeds:
        m = study.folder.run_metrics(study.folder.finalist_run_dir(contender.label, seed))
        val, test = (m or {}).get("validation") or {}, (m or {}).get("test") or {}
        if val.get(metric) is not None and test.get(metric) is not None:
            fin.seeds.append(seed)
            fin.validation.append(float(val[metric]))
            fin.test.append(float(test[metric]))
            fin.test_accuracy.append(float(test.get("accuracy") if test.get("accuracy") is not None else "nan"))
        else:
            fin.failures.append(f"seed {seed}: {failures.get((contender.number, seed), 'no metrics.json')}")
    return fin


def report_finalist(study: "StudyContext", fin: Finalist) -> None:
    if fin.validation:
        study.message(f"  {fin.label:<32} {run_length(fin.spec.experts):<22} validation {fin.val_mean:.4f} "
                      f"± {fin.val_std:.4f} (n={len(fin.validation)})")
    else:
        study.message(f"  {fin.label:<32} FAILED: {'; '.join(fin.failures)}")
