"""Orchestration: grid specs, the Ray Tune driver, Optuna search, MLflow logging, Parquet results, CLI."""
