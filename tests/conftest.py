"""Shared fixtures: tiny grid specs on the bundled digits data set (seconds per trial on a CPU), and a slice
of the real CIFAR-10 images in ../shared/data."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from backdoor import TrainRecipe, load_dataset, train_clean

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def cifar_slice():
    """The CIFAR-10 subset with its first 1,000 training images: a few epochs of cnn-small take seconds."""
    path = SHARED_DATA / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent (real images live in ../shared/data beside the repository)")
    full = load_dataset(f"npz:{path}")
    return replace(full, x_train=full.x_train[:1000], y_train=full.y_train[:1000])


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def clean_model(digits):
    """cnn-small trained 2 epochs on clean digits: the clean model LF and Trojan fit their triggers to."""
    return train_clean(digits, "cnn-small", TrainRecipe(epochs=2, lr=0.05, batch_size=64), seed=0)


def sau(*args: str) -> subprocess.CompletedProcess:
    """The installed `sau` command on this checkout's code, in a process of its own with this one's environment."""
    return subprocess.run([str(Path(sys.executable).with_name("sau")), *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
