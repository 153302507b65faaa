"""Shared fixtures: tiny grid specs on the bundled digits data set (seconds per trial on a CPU)."""

from pathlib import Path

import pytest
import yaml

TINY_GRID = {
    "name": "tiny",
    "dataset": {"name": "digits"},
    "attacks": [{"name": "badnets"}],
    "archs": ["cnn-small"],
    "attack_training": {"epochs": 3, "lr": 0.05, "batch_size": 64},
    "sau": {"lr": 0.001, "rounds": 3, "clean_ratio": 0.2},
    "seeds": [0],
    "eval_every": 2,
    "resources": {"cpu": 1, "gpu": 0},
}


@pytest.fixture(scope="session")
def write_grid(tmp_path_factory):
    """write_grid(**fields) -> path of a YAML grid: TINY_GRID with `fields` replaced (sau is merged)."""
    directory = tmp_path_factory.mktemp("grids")

    def write(**fields) -> Path:
        grid = {**TINY_GRID, **fields, "sau": {**TINY_GRID["sau"], **fields.get("sau", {})}}
        path = directory / f"{grid['name']}.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return path

    return write
