"""One trial: an allocation and a training seed in, validation (and for finalists, test) scores out.

The stage between training and search in the data flow: `run_trial(settings, fidelity, request, report,
num_layers)` runs the study's objective (the built-in MoLA fine-tune in `trial.mola`, the known-truth
`trial.synthetic`, or a user's function, `trial.objective`) and never raises: a failure comes back as a
`TrialOutcome` with its reason. Search executors move `TrialRequest`s to workers and outcomes back.
"""

from mola_search.trial.fidelity import Fidelity
from mola_search.trial.objective import ObjectiveTrial, TrialPruned
from mola_search.trial.request import TrialOutcome, TrialRequest
from mola_search.trial.run import run_trial
from mola_search.trial.settings import TrialSettings
from mola_search.trial.synthetic import SyntheticObjective, make_synthetic

__all__ = ["Fidelity", "ObjectiveTrial", "SyntheticObjective", "TrialOutcome", "TrialPruned", "TrialRequest",
           "TrialSettings", "make_synthetic", "run_trial"]
