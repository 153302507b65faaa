"""Orchestration: grid specs, the Ray Tune driver, Optuna search, MLflow logging, Parquet results, CLI."""

import os

# Settings Ray reads when it is first imported, set here because every module of this package, and so every
# path to `import ray` in it, imports this first.
# "0": a local instance listens on 127.0.0.1 only (every server and metrics port), not on the machine's network
# address; joining a cluster by address works either way.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tune prints a trial's full traceback on every failure, also one it retries; the sweep prints one line instead.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
# Tune's newer output prints boxes (the experiment, each errored trial) whatever `verbose` says; the classic
# output is silent at verbose=0, and the sweep prints one line per trial itself.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune's driver writes every result of every trial through a CSV, a JSON and a TensorBoard logger, each with
# its own files per trial; sweeps keep the JSON record (result.json, each report with its node) only.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Tune runs each trial in its own trial directory; a sweep's trials run where stage 1 does, in the driver's
# working directory (locally), so that a grid's relative data path (`npz:data/x.npz`) means the same to both.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
