"""``one-shot``: one over-provisioned MoLA (the supernet) trained once, hundreds of allocations scored on it
by masking, a few of them trained standalone to measure how far its ranking can be trusted.

`queue` trains (or loads) the supernet, turns its cheap signals into seeds, scores `oneshot_trials`
allocations and queues the standalone checks (the one-shot top-N first: they become the contenders, then
the signals, the seeds and checks spread over the one-shot ranking); the supernet is dropped before any
standalone trial. `conclude` compares the one-shot and standalone rankings (oneshot.json).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from mola_search.search.seeds import Seed
from mola_search.search.strategies.base import Strategy, candidates, register_strategy
from mola_search.search.strategies.oneshot.trust import Trust, check_seeds, summary_lines
from mola_search.search.study import Contender, Finalist, Origin, choose_best
from mola_search.search.study.records import DUPLICATE_OF, SEEDS_ENQUEUED, spec_key, trial_origin, trial_seed, \
    trial_spec
from mola_search.stats.rank import kendall_tau, rank_agreement
from mola_search.trial.run import peak_rss_mb

if TYPE_CHECKING:
    from mola_search.search.context import StudyContext


@register_strategy
class OneShot(Strategy):
    name = "one-shot"
    searched = "standalone checks of the one-shot ranking"

    def __init__(self) -> None:
        self.oneshot: Any = None              # the "<name>-oneshot" Optuna study
        self.checks: list[Seed] = []
        self.trust = Trust()
        self.signal_weights: dict[str, list[float]] = {}

    def describe(self, study: "StudyContext") -> str:
        return (f"one-shot: {study.config.oneshot_trials} allocations scored on a supernet, then standalone "
                "checks")

    def queue(self, study: "StudyContext") -> None:
        from mola_search.search.pilot import pilot_specs
        from mola_search.search.strategies.oneshot import scoring, supernet as one

        net = one.train_supernet(study, study.fidelity)
        signal_list, signal_info = one.signal_seeds(net, study.space, study.num_layers, study.budget)
        pilot = pilot_specs(study) if study.config.pilot else {}
        first = [Seed(name, spec) for name, spec in pilot.items()] + list(study.seeds) + signal_list
        self.oneshot = scoring.score_allocations(study, net, first)
        log, examples = net.log, len(net.prepared.splits["validation"])
        del net
        gc.collect()
        self.checks = self._checks(study, pilot, signal_list)
        self.signal_weights = {k: v["weights"] for k, v in signal_info.items()}
        self.trust = Trust(metric=study.config.metric, signals=signal_info,
                           supernet={k: log.get(k) for k in ("max_experts", "factor", "trial_steps", "steps",
                                                             "train_examples", "wall_time_s")},
                           scoring={"scored": len(scoring.ranked_allocations(self.oneshot)), "examples": examples,
                                    "seconds_per_allocation": self.oneshot.user_attrs.get("seconds_per_allocation"),
                                    "peak_rss_mb": round(peak_rss_mb(), 1)})
        study.folder.write_oneshot(self.trust.to_dict())
        driver = study.driver
        if driver.study.user_attrs.get(SEEDS_ENQUEUED):  # resumed: the checks queued before are the ones trained
            study.message("one-shot: the standalone checks were chosen before this resume; training those")
        else:
            study.message(f"one-shot: {len(self.checks)} allocations to train standalone as checks "
                          f"({', '.join(s.label for s in self.checks)})")
        driver.enqueue_seeds(self.checks)
        driver.target = len(driver.trained_trials()) + len(driver.study.get_trials(
            deepcopy=False, states=(TrialState.WAITING,)))
        study.progress.total = driver.target

    def _checks(self, study: "StudyContext", pilot: dict[str, Any], signal_list: list[Seed]) -> list[Seed]:
        """The one-shot top-N first, then the signals, the seeds and the spread checks; each allocation once,
        and none the pilot trained already."""
        from mola_search.search.strategies.oneshot.scoring import ranked_allocations

        trained = {spec_key(s) for s in pilot.values()}
        picked = check_seeds(ranked_allocations(self.oneshot), study.config.finalist_top_n,
                             study.config.oneshot_checks,
                             skip=[*pilot.values(), *(s.spec for s in study.seeds), *(s.spec for s in signal_list)])
        tops = [s for s in picked if Origin(s.label).is_oneshot_top]
        checks = []
        for s in [*tops, *signal_list, *study.seeds, *(s for s in picked if s not in tops)]:
            if spec_key(s.spec) not in trained:
                trained.add(spec_key(s.spec))
                checks.append(s)
        return checks

    def contenders(self, study: "StudyContext") -> list[Contender]:
        """The one-shot top-N (chosen by the one-shot ranking, not by the standalone checks' validation
        scores) and the configured seeded shapes, as in a standalone study."""
        tops = tuple(s.label for s in self.checks if Origin(s.label).is_oneshot_top)
        return candidates(study, 0, origins=tops)

    def conclude(self, study: "StudyContext", finalists: Sequence[Finalist]) -> list[str]:
        """Kendall tau of one-shot vs standalone validation scores: over every allocation trained with the
        study seed at trial fidelity (pilot, checks), and over the finalists at theirs; oneshot.json."""
        self.measure(study, finalists)
        study.folder.write_oneshot(self.trust.to_dict())
        study.message(self.trust.line())
        return summary_lines(self.trust)

    def measure(self, study: "StudyContext", finalists: Sequence[Finalist]) -> Trust:
        from mola_search.search.strategies.oneshot.scoring import ranked_allocations

        ranked = ranked_allocations(self.oneshot)
        scores = {spec_key(spec): score for spec, score in reversed(ranked)}
        seed = study.config.seed
        pairs = []
        for t in study.driver.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            spec = trial_spec(t)
            if DUPLICATE_OF in t.user_attrs or trial_seed(t, seed) != seed or spec_key(spec) not in scores:
                continue
            pairs.append({"experts": list(spec.experts), "origin": trial_origin(t).text,
                          "oneshot": scores[spec_key(spec)], "standalone": float(t.value)})
        trust = self.trust
        trust.pairs = pairs
        trust.trial_fidelity = kendall_tau([p["oneshot"] for p in pairs], [p["standalone"] for p in pairs], seed=seed)
        done = [f for f in finalists if f.validation and spec_key(f.spec) in scores]
        trust.finalists = kendall_tau([scores[spec_key(f.spec)] for f in done], [f.val_mean for f in done], seed=seed)
        best_oneshot = ranked[0][0].experts if ranked else None
        scored = [f for f in finalists if f.validation]
        best = choose_best(scored).spec.experts if scored else None
        for name, weights in self.signal_weights.items():
            info = trust.signals.setdefault(name, {})
            info["rho_oneshot_best"] = rank_agreement(weights, best_oneshot) if best_oneshot else float("nan")
            info["rho_best"] = rank_agreement(weights, best) if best else float("nan")
        return trust
