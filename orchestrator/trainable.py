"""The functions Ray Tune runs as trials. Kept apart from the sweep driver so that a trial's worker imports what a
trial needs (torch, MLflow, Parquet) and not what the driver does (Optuna, its searchers, plotting)."""

from __future__ import annotations

from ray import tune

from .errors import USER_ERRORS
from .spec import TrialSpec
from .storage import Storage
from .tracking import SweepTracking
from .trial import run_trial


def _trial(spec: TrialSpec, storage: Storage, tracking: SweepTracking | None) -> None:
    try:
        run_trial(spec, storage, tracking, report=lambda m: tune.report({"trial": spec.trial_id, **m}))
    except USER_ERRORS as error:
        # Raising would make Tune retry what cannot change (FailureConfig has no notion of a permanent error):
        # the trial ends at once, and the driver reads the error from its last result.
        tune.report({"trial": spec.trial_id, "error": f"{type(error).__name__}: {error}"})


def grid_trial(config: dict, specs: dict[str, TrialSpec], storage: Storage, tracking: SweepTracking | None) -> None:
    """A Tune trial of the grid. A trial Tune retries after a failure (FailureConfig) continues from its
    own checkpoint, storage/checkpoints/<trial_id>/, which run_trial writes; Tune checkpoints are not used."""
    _trial(specs[config["trial_id"]], storage, tracking)


def search_trial(config: dict, base: TrialSpec, storage: Storage, tracking: SweepTracking | None) -> None:
    """A Tune trial of a search: `base` with the values the searcher sampled (retried like grid_trial).
    A sample that repeats a finished one is answered from its row."""
    _trial(base.with_params(**config), storage, tracking)
