"""The sweep driver: stage 1 trains the backdoored models on Ray, stage 2 runs the SAU trials on Ray Tune,
as the full grid or as an Optuna search, and the results end up as Parquet rows and in MLflow."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import pyarrow as pa
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from backdoor import AttackError, DataError, ModelError, check_clean_subset, check_fits, load_dataset, make_attack
from defenses import DEFENSES

from .cluster import RaySession, check_resources
from .lease import Lease
from .plots import sweep_figures
from .results import finished_rows, format_table, frame, pareto_front, row_table
from .spec import DEFAULT_CLEAN_RATIO, GridSpec, SearchSpec, TrialSpec, expand
from .storage import Storage
from .store import ensure_models
from .tracking import SweepTracking, close_sweep, default_uri, open_sweep
from .trainable import grid_trial, search_trial
from .trial import write_stopped_row

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "nsga2": optuna.samplers.NSGAIISampler, "gp": optuna.samplers.GPSampler}


class SweepError(ValueError):
    """A sweep that cannot start or whose trials failed; one line."""


class Finished(tune.Callback):
    """One line per finished trial: Tune's own output is a box per trial start and end, too long for big sweeps.

    A trial completes without a row when the scheduler stopped it: its `stopped` row is written here, from its
    checkpoint. (Ctrl-C ends trials without completing them.) Each row is read back once, here, and kept in
    `rows` for the sweep's results table."""

    def __init__(self, out: Callable[[str], None], total: int, storage: Storage, tracking: SweepTracking | None):
        self.out, self.total, self.done = out, total, 0
        self.storage, self.tracking = storage, tracking
        self.rows: dict[str, pa.Table] = {}

    def __getstate__(self) -> dict:
        # Tune pickles callbacks for Tuner.restore, which sweeps do not use; `out` need not pickle.
        return {**self.__dict__, "out": None}

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Instead of Tune's traceback (TUNE_PRINT_ALL_TRIAL_ERRORS=0): the error's own last line.
        error = Path(trial.error_file) if trial.error_file else None
        lines = error.read_text().strip().splitlines() if error is not None and error.is_file() else []
        self.out(f"trial {trial.config.get('trial_id', trial.trial_id)}: {lines[-1] if lines else 'failed'}; "
                 f"retrying (failure {trial.run_metadata.num_failures})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result
        if "error" in r:
            self.out(f"[{self.done}/{self.total}] trial {r['trial']}: failed: {r['error']}")
            return
        row = row_table(self.storage / "results", r["trial"])
        stopped = row is None and write_stopped_row(self.storage, r["trial"], self.tracking) is not None
        if stopped:
            row = row_table(self.storage / "results", r["trial"])
        if row is not None:
            self.rows[r["trial"]] = row
        if r.get("status") == "diverged":
            self.out(f"[{self.done}/{self.total}] trial {r['trial']}: diverged at round {r['round'] + 1} "
                     "(non-finite loss); recorded with status diverged")
            return
        how = f"stopped at round {r['round']}" if stopped else "finished"
        self.out(f"[{self.done}/{self.total}] trial {r['trial']} {how}: ACC {r['acc_after']:.1%}  "
                 f"ASR {r['asr_after']:.1%}  RA {r['ra_after']:.1%}  DER {r['der']:.3f}")


def _journal(storage: Storage) -> Path:
    """The Optuna journal, on this machine's disk: an append-only file cannot live on an object store. There,
    the journal is a local copy (Storage.local_dir) that is uploaded after each search and downloaded by a
    resumed search on a machine that lacks it."""
    path = storage.local_dir() / "optuna.journal"
    if not storage.is_local and not path.exists() and storage.exists("optuna.journal"):
        Storage(path.parent).write(path.name, storage.read("optuna.journal"))
    return path


def _searcher(grid: GridSpec, storage: Storage) -> ConcurrencyLimiter:
    search: SearchSpec = grid.search
    space = {}
    for name, dim in search.space.items():
        if dim.choices is not None:
            space[name] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif isinstance(dim.low, int):
            space[name] = optuna.distributions.IntDistribution(dim.low, dim.high, log=dim.log)
        else:
            space[name] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
    metrics, modes = [o.metric for o in search.objectives], [o.mode for o in search.objectives]
    if len(metrics) == 1:
        metrics, modes = metrics[0], modes[0]
    # The journal keeps the study beyond Tune's experiment, so a resumed search goes on learning from it.
    path = _journal(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = JournalStorage(JournalFileBackend(str(path)))
    searcher = OptunaSearch(space, metric=metrics, mode=modes, sampler=SAMPLERS[search.sampler](seed=search.seed),
                            study_name=grid.name, storage=journal)
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)


def _scheduler(grid: GridSpec, base: TrialSpec) -> ASHAScheduler | None:
    """ASHA on the first objective: with two, the first decides which trials go on (docs/design.md)."""
    spec = grid.search.scheduler
    if spec is None:
        return None
    first = grid.search.objectives[0]
    # Trials that reach the last round finish by themselves (stop_last_trials=False), so every row written
    # after a stop decision is marked stopped, and every trial that ran all its rounds is finished.
    return ASHAScheduler(time_attr="round", metric=first.metric, mode=first.mode, max_t=base.config().rounds,
                         grace_period=spec.grace_rounds, reduction_factor=spec.reduction_factor,
                         stop_last_trials=False)


def _run_trials(grid: GridSpec, storage: Storage, tracking: SweepTracking | None,
                out) -> tuple[list[str], int, dict[str, pa.Table]]:
    """Train the missing models (stage 1), then run the trials still to do on Ray Tune (stage 2);
    returns one line per failed trial, how many trials Tune stopped unfinished (Ctrl-C), and the rows that read
    back whole, by trial id."""
    finished = finished_rows(storage / "results")
    if grid.search is None:
        todo = {s.trial_id: s for s in expand(grid) if s.trial_id not in finished}
        total, specs = len(todo), list(todo.values())
        trainable = tune.with_parameters(grid_trial, specs=todo, storage=storage, tracking=tracking)
        param_space, searcher, scheduler = {"trial_id": tune.grid_search(list(todo))}, None, None
    else:
        (base,) = specs = expand(grid)  # a search has no grid axes
        total = grid.search.num_samples - len(finished)
        trainable = tune.with_parameters(search_trial, base=base, storage=storage, tracking=tracking)
        param_space, searcher = {}, _searcher(grid, storage)
        scheduler = _scheduler(grid, base)
    out(f"{grid.name}: {max(total, 0)} trials to run, {len(finished)} already finished")
    if total <= 0:
        return [], 0, finished
    ensure_models(specs, storage / "models", grid.resources, out)
    progress = Finished(out, total, storage, tracking)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": grid.resources.cpu, "gpu": grid.resources.gpu}),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=1 if searcher is None else total, search_alg=searcher,
                                    scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(name=time.strftime("%Y%m%d-%H%M%S"), **storage.tune_storage(),
                                  failure_config=tune.FailureConfig(max_failures=2), verbose=0,
                                  callbacks=[progress, JsonLoggerCallback()]))
    # Tune ends a sweep with failed trials by logging their Tune names; the sweep's own error line names them.
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    try:
        results = tuner.fit()
    finally:
        if searcher is not None and not storage.is_local:
            storage.write("optuna.journal", _journal(storage).read_bytes())
    failed = [f"trial {r.config.get('trial_id') or json.dumps(r.config)}: "
              f"{getattr(r.error, 'cause', None) or r.error!r}" for r in results if r.error is not None]
    failed += [f"trial {r.metrics['trial']}: {r.metrics['error']}" for r in results if "error" in r.metrics]
    # On Ctrl-C Tune stops the trials and returns normally: a trial without error and without row did not finish.
    rows = {**finished, **progress.rows}
    unfinished = sum(r.error is None and r.metrics.get("trial") not in rows for r in results)
    return failed, unfinished, rows


def _check_against_data(grid: GridSpec) -> None:
    """What the spec alone cannot tell (the data is there; a patch fits the images; the target is a
    class; the architecture takes images of this size) fails here, before anything is written."""
    data = load_dataset(grid.dataset.name, root=grid.dataset.root, download=grid.dataset.download)
    for i, attack in enumerate(grid.attacks):
        try:
            make_attack(attack.name, attack.params, data.shape, data.num_classes)
        except AttackError as error:
            raise SweepError(f"attacks[{i}]: {error}") from None
    for i, arch in enumerate(grid.archs):
        try:
            check_fits(arch, data.shape, data.num_classes)
        except ModelError as error:
            raise SweepError(f"archs[{i}]: {error}") from None
    _check_clean_subsets(grid, len(data.x_train), data.num_classes)


def _check_clean_subsets(grid: GridSpec, n: int, num_classes: int) -> None:
    """Every clean_ratio the grid's defenses use (a search: the smallest it samples) gives a clean subset with room
    for each class; an error names where that ratio is set."""
    dim = grid.search.space.get("clean_ratio") if grid.search is not None else None
    for i, (name, axes) in enumerate(grid.defense_axes()):
        if DEFENSES[name].per_model:  # a defense without clean data
            continue
        if dim is not None:
            place, ratios = "search.space", dim.choices or [dim.low]
        else:
            place = f"defenses[{i}]" if "clean_ratio" in grid.defenses[i].params else "sau"
            ratios = axes.get("clean_ratio", DEFAULT_CLEAN_RATIO)
        for ratio in ratios if isinstance(ratios, list) else [ratios]:
            try:
                check_clean_subset(n, ratio, num_classes)
            except DataError as error:
                raise SweepError(f"{place}.{error}") from None


def run_sweep(grid: GridSpec, *, storage: Storage | str | Path, resume: bool, address: str | None,
              tracking_uri: str | None, out: Callable[[str], None] = print) -> pd.DataFrame:
    """Run `grid` with everything it produces under `storage` (a path or a URI); returns the grid's result rows.

    A killed or failed sweep continues with `resume`: finished trials are skipped, and unfinished ones
    continue from their checkpoints. `address` (or RAY_ADDRESS) joins a Ray cluster, else a local instance
    is started; `tracking_uri` defaults to sqlite in storage.local_dir()."""
    storage = storage if isinstance(storage, Storage) else Storage(storage)
    lease = Lease(storage, resume)
    lease.check()  # first: a second driver hears of the one that runs, not of --resume
    info_text = storage.read("sweep.json")
    info = json.loads(info_text) if info_text is not None else None
    if info is not None and not resume:
        raise SweepError(f"{storage} already holds sweep {info['grid']!r}; "
                         "pass --resume to continue it or choose another --storage")
    if info is not None and info["grid"] != grid.name:
        raise SweepError(f"{storage} holds sweep {info['grid']!r}, not {grid.name!r}; choose another --storage")

    _check_against_data(grid)
    storage.check_writable()

    try:
        return _run(grid, storage, info, lease, address, tracking_uri, out)
    finally:
        lease.release()


def _run(grid: GridSpec, storage: Storage, info: dict | None, lease: Lease, address: str | None,
         tracking_uri: str | None, out: Callable[[str], None]) -> pd.DataFrame:
    """run_sweep once the checks that need no Ray have passed: the lease is taken once the cluster has what a
    trial asks for (nothing is written before), and released by the caller."""
    ray_session, tracking = RaySession.connect(address, out), None
    try:
        check_resources(grid.resources)
        lease.acquire(out)
        storage.local_dir().mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or grid.tracking_uri or default_uri(storage.local_dir())
        sweep_name = info["sweep"] if info else f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = info["parent_run_id"] if info and info["tracking_uri"] == uri else None
        tracking = open_sweep(uri, grid.name, sweep_name, storage.local_dir() / "mlartifacts", resume_parent=parent)
        storage.write("sweep.json", (json.dumps({
            "grid": grid.name, "sweep": sweep_name, "tracking_uri": uri,
            "experiment_id": tracking and tracking.experiment_id,
            "parent_run_id": tracking and tracking.parent_run_id}, indent=2) + "\n").encode())
        failed, unfinished, rows = _run_trials(grid, storage, tracking, out)
    except BaseException as error:
        close_sweep(tracking, [], _ended(error))
        raise
    finally:
        ray_session.close()

    try:
        df = _finish(grid, storage, tracking, rows, failed, unfinished, out)
    except BaseException as error:
        close_sweep(tracking, [], _ended(error))
        raise
    for line in failed:
        out(line)
    if failed:
        raise SweepError(f"{len(failed)} of the trials failed, first {failed[0]}; "
                         "fix the cause and pass --resume to rerun them")
    if unfinished:
        raise SweepError(f"interrupted with {unfinished} trials unfinished; pass --resume to continue them")
    return df


def _ended(error: BaseException) -> str:
    """The parent run's status for a sweep that ends with `error`."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def _finish(grid: GridSpec, storage: Storage, tracking: SweepTracking | None, rows: dict[str, pa.Table],
            failed: list[str], unfinished: int, out: Callable[[str], None]) -> pd.DataFrame:
    """Print the results (and a search's Pareto front), attach them to the parent run and close it."""
    df = frame(list(rows.values())) if rows else pd.DataFrame()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = []
        if len(df):
            out(format_table(df))
            artifacts.append(Path(tmp) / "results.csv")
            artifacts[-1].write_text(format_table(df, "csv"))
        if grid.search is not None and len(grid.search.objectives) == 2 and len(df):
            front = pareto_front(df, [(o.metric, o.mode) for o in grid.search.objectives])
            out(f"Pareto front ({len(front)} of {len(df)} trials):\n{format_table(front)}")
            artifacts.append(Path(tmp) / "pareto.csv")
            artifacts[-1].write_text(front.to_csv(index=False))
            storage.write("pareto.csv", artifacts[-1].read_bytes())
        if len(df):
            objectives = [(o.metric, o.mode) for o in grid.search.objectives] if grid.search else []
            figures = Path(tmp) / "figures"
            if sweep_figures(df, objectives, tracking and tracking.uri, Storage(figures)):
                artifacts.append(figures)
                for path in sorted(figures.iterdir()):  # beside the rows too: MLflow may not be there
                    storage.write(f"figures/{path.name}", path.read_bytes())
        close_sweep(tracking, artifacts, "FAILED" if failed else "KILLED" if unfinished else "FINISHED")
    return df
