"""MLflow tracking: one experiment per grid, a parent run per sweep, a child run per trial.

Every call goes through an explicit MlflowClient (no global mlflow state). Tracking never stops a
sweep: when the store is unreachable or errors, one warning line is printed and the work goes on
untracked, because the Parquet row is the record.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# mlflow reads this when it is imported; its telemetry thread races the HTTP client on offline machines.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's client retries a call to a dead server for about 4 minutes (7 retries, backoff factor 2, 120 s
# timeout). A trial's row does not need the server, so the project's clients (the driver, and every Ray worker
# that imports this module) give up after seconds: 2 retries within about 4 s of a refused connection, 15 s
# for a request that hangs. A user's own setting wins; mlflow reads these at every call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

TRIAL_ID_TAG = "sau.trial_id"
# On the KILLED run of a trial a scheduler stopped: it holds the trial's row, unlike a run killed by Ctrl-C.
STOPPED_TAG = "sau.stopped"
ERRORS = (MlflowException, OSError)  # OSError covers requests' connection errors


def default_uri(storage: Path) -> str:
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def warn(what: str, error: Exception) -> None:
    reason = str(error).partition("\n")[0]
    print(f"warning: MLflow {what} failed, continuing without tracking: {type(error).__name__}: {reason}",
          file=sys.stderr)


@dataclass(frozen=True)
class SweepTracking:
    uri: str
    experiment_id: str
    parent_run_id: str


def open_sweep(uri: str, grid_name: str, sweep_name: str, artifacts: Path,
               resume_parent: str | None = None) -> SweepTracking | None:
    """The experiment named after the grid (created if new) and the sweep's parent run: a new one, or
    `resume_parent` set running again. None (after a warning) if the tracking store fails.

    `artifacts` is the artifact root for stores without an artifact server (anything but http(s))."""
    client = MlflowClient(uri)
    try:
        experiment_id = _experiment(client, uri, grid_name, artifacts)
        if resume_parent is None:
            parent = client.create_run(experiment_id, run_name=sweep_name).info.run_id
        else:
            parent = resume_parent
            client.update_run(parent, status="RUNNING")
            # Child runs the killed sweep left running; a trial that resumes from its checkpoint reopens its own.
            stale = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' "
                                                        "and attributes.status = 'RUNNING'")
            for run in stale:
                client.set_terminated(run.info.run_id, "KILLED")
    except ERRORS as error:
        warn(f"tracking at {uri}", error)
        return None
    return SweepTracking(uri, experiment_id, parent)


def _experiment(client: MlflowClient, uri: str, grid_name: str, artifacts: Path) -> str:
    """The id of the experiment named after the grid, created if new."""
    experiment = client.get_experiment_by_name(grid_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if uri.startswith(("http://", "https://")) else Path(artifacts).resolve().as_uri()
    return client.create_experiment(grid_name, artifact_location=location)


def find_sweep(uri: str, grid_name: str, sweep_name: str, artifacts: Path,
               parent_run_id: str | None = None) -> SweepTracking:
    """The sweep's experiment and parent run in the store at `uri`, for runs created after the sweep: the run
    `parent_run_id` if the store holds it, else the top-level run named `sweep_name`, else a new one (ended
    FINISHED). Errors of the store are raised (MlflowException, OSError)."""
    client = MlflowClient(uri)
    experiment_id = _experiment(client, uri, grid_name, artifacts)
    if parent_run_id:
        try:
            if client.get_run(parent_run_id).info.experiment_id == experiment_id:
                return SweepTracking(uri, experiment_id, parent_run_id)
        except MlflowException:
            pass  # not in this store
    named = [run for run in client.search_runs([experiment_id], f"attributes.run_name = '{sweep_name}'")
             if MLFLOW_PARENT_RUN_ID not in run.data.tags]
    if named:
        return SweepTracking(uri, experiment_id, named[0].info.run_id)
    parent = client.create_run(experiment_id, run_name=sweep_name).info.run_id
    client.set_terminated(parent, "FINISHED")
    return SweepTracking(uri, experiment_id, parent)


def tracked_trials(tracking: SweepTracking) -> set[str]:
    """Ids of the trials whose child run of the sweep's parent run holds their row: FINISHED, or stopped."""
    client, ids = MlflowClient(tracking.uri), set()
    parent = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{tracking.parent_run_id}'"
    for query in (f"{parent} and attributes.status = 'FINISHED'", f"{parent} and tags.`{STOPPED_TAG}` = 'true'"):
        token = None
        while True:
            page = client.search_runs([tracking.experiment_id], query, max_results=1000, page_token=token)
            ids |= {run.data.tags[TRIAL_ID_TAG] for run in page if TRIAL_ID_TAG in run.data.tags}
            token = page.token
            if not token:
                break
    return ids


def close_sweep(tracking: SweepTracking | None, artifacts: list[Path], status: str) -> None:
    """Attach `artifacts` (files, or directories kept as one folder) to the parent run and end it with `status`."""
    if tracking is None:
        return
    client = MlflowClient(tracking.uri)
    try:
        for path in artifacts:
            if path.is_dir():
                client.log_artifacts(tracking.parent_run_id, str(path), path.name)
            else:
                client.log_artifact(tracking.parent_run_id, str(path))
        client.set_terminated(tracking.parent_run_id, status)
    except ERRORS as error:
        warn("closing the sweep's parent run", error)


class TrialTracker:
    """The child run of one trial. Round metrics are buffered and sent by flush(), one batch per checkpoint.

    With `run_id` (a trial resumed from its checkpoint) the run is reopened, and rounds it already holds are
    not logged again, so every round is logged exactly once however often the trial was interrupted."""

    def __init__(self, tracking: SweepTracking | None, trial_id: str, params: dict, run_id: str | None = None,
                 run_name: str | None = None):
        self.run_id = ""
        self._client = None if tracking is None else MlflowClient(tracking.uri)
        self._buffer: list[Metric] = []
        self._logged = 0  # the last round the run holds
        if tracking is None:
            return
        with self._guard("starting the trial's run"):
            if run_id:
                self._client.update_run(run_id, status="RUNNING")
                history = self._client.get_metric_history(run_id, "loss")
                self._logged = max((m.step for m in history), default=0)
            else:
                # A trial that starts over (no checkpoint yet) replaces the run an interrupted attempt left.
                stale = self._client.search_runs(
                    [tracking.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{tracking.parent_run_id}' and "
                                              f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and attributes.status != 'FINISHED'")
                for run in stale:
                    self._client.delete_run(run.info.run_id)
                tags = {MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, TRIAL_ID_TAG: trial_id}
                run_id = self._client.create_run(tracking.experiment_id, run_name=run_name or trial_id,
                                                 tags=tags).info.run_id
                self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self.run_id = run_id

    @contextmanager
    def _guard(self, what: str):
        """On the first error of the tracking store: warn once and stop tracking."""
        try:
            yield
        except ERRORS as error:
            warn(what, error)
            self._client, self.run_id = None, ""

    def log(self, step: int, metrics: dict[str, float], final: bool = False) -> None:
        """Buffer `metrics` at round `step`; rounds the run already holds are skipped unless `final`."""
        if final or step > self._logged:
            now = int(time.time() * 1000)
            self._buffer += [Metric(key, float(value), now, step) for key, value in metrics.items()]

    def flush(self) -> None:
        if self._client is not None and self._buffer:
            with self._guard("logging metrics"):
                self._client.log_batch(self.run_id, metrics=self._buffer)
        self._buffer = []

    def finish(self, artifacts: dict[str, str], stopped: bool = False) -> None:
        """Send what is buffered, attach `artifacts` (file name -> text) and end the run: FINISHED, or KILLED
        and tagged STOPPED_TAG for a trial a scheduler `stopped`."""
        self.flush()
        if self._client is not None:
            with self._guard("ending the trial's run"):
                for name, text in artifacts.items():
                    self._client.log_text(self.run_id, text, name)
                if stopped:
                    self._client.set_tag(self.run_id, STOPPED_TAG, "true")
                self._client.set_terminated(self.run_id, "KILLED" if stopped else "FINISHED")
