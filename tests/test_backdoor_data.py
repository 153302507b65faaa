import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor.data import DataError, clean_subset, load_dataset, to_unit

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@contextmanager
def data_error(*parts: str):
    """Expect a DataError with a one-line message that contains every part."""
    with pytest.raises(DataError) as info:
        yield
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in parts), message


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8),
              "y_train": np.array([0, 1, 2, 3] * 3, dtype=np.int64),
              "x_test": rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8),
              "y_test": np.array([0, 1, 4, 1], dtype=np.int64)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_digits_split_is_fixed_and_uint8():
    data = load_dataset("digits")
    again = load_dataset("digits")
    assert (len(data.x_train), len(data.x_test)) == (1438, 359)
    assert data.shape == (1, 8, 8) and data.channels == 1 and data.image_size == 8
    assert data.x_train.dtype == torch.uint8 and data.y_train.dtype == torch.int64
    assert int(data.x_train.max()) == 255 and int(data.x_train.min()) == 0
    assert data.num_classes == 10
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    pixels = to_unit(data.x_train)
    assert data.mean == pytest.approx((pixels.mean().item(),), abs=1e-4)
    assert data.std == pytest.approx((pixels.std().item(),), abs=1e-4)


def test_digits_split_partitions_rescaled_sklearn_images():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    raw = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    ours = torch.cat([data.x_train, data.x_test])[:, 0].numpy()
    assert sorted(img.tobytes() for img in ours) == sorted(img.tobytes() for img in raw)


def test_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_unit(x), torch.tensor([0.0, 0.2, 1.0]))
    assert to_unit(x).dtype == torch.float32


def test_clean_subset_size_and_seed():
    first = clean_subset(1000, 0.05, seed=3)
    assert len(first) == 50 and len(set(first.tolist())) == 50
    assert torch.equal(first, clean_subset(1000, 0.05, seed=3))
    assert not torch.equal(first, clean_subset(1000, 0.05, seed=4))
    assert len(clean_subset(10, 0.01, seed=0)) == 1
    assert sorted(clean_subset(7, 1.0, seed=0).tolist()) == list(range(7))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_clean_subset_rejects_bad_ratio(ratio):
    with data_error("clean_ratio"):
        clean_subset(100, ratio, seed=0)


def test_npz_channels_last_to_channels_first(tmp_path):
    arrays = write_npz(tmp_path / "d.npz")
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.shape == (3, 5, 6) and data.image_size == 5
    assert torch.equal(data.x_train, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert data.num_classes == 5  # the largest label (4, in the test split) + 1
    unit = arrays["x_train"].astype(np.float64) / 255
    assert data.mean == pytest.approx(tuple(unit.mean(axis=(0, 1, 2))), abs=1e-4)
    assert data.std == pytest.approx(tuple(unit.std(axis=(0, 1, 2), ddof=1)), abs=1e-4)


def test_npz_grayscale(tmp_path):
    gray = np.arange(12 * 4 * 4, dtype=np.uint8).reshape(12, 4, 4)
    write_npz(tmp_path / "g.npz", x_train=gray, x_test=gray[:4])
    data = load_dataset(f"npz:{tmp_path / 'g.npz'}")
    assert data.shape == (1, 4, 4) and torch.equal(data.x_train[:, 0], torch.from_numpy(gray))


@pytest.mark.parametrize("override, key", [
    ({"y_test": None}, "y_test"),
    ({"x_train": np.zeros((12, 5, 6, 3), dtype=np.float32)}, "x_train"),
    ({"y_train": np.array([0, 1, -1] * 4)}, "y_train"),
    ({"y_train": np.zeros(11, dtype=np.int64)}, "y_train"),
    ({"x_test": np.zeros((4, 5, 5, 3), dtype=np.uint8)}, "x_test"),
    ({"x_test": np.zeros((4, 3, 5, 6, 3), dtype=np.uint8)}, "x_test"),
])
def test_npz_validation_names_file_and_key(tmp_path, override, key):
    path = tmp_path / "bad.npz"
    write_npz(path, **override)
    with data_error(str(path), key):
        load_dataset(f"npz:{path}")


def test_npz_missing_or_unreadable_file(tmp_path):
    with data_error("no such file", str(tmp_path / "none.npz")):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")
    (tmp_path / "junk.npz").write_text("not an archive")
    with data_error("npz", str(tmp_path / "junk.npz")):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


def test_unknown_dataset_and_missing_root(tmp_path):
    with data_error("unknown name"):
        load_dataset("imagenet")
    with data_error("root"):
        load_dataset("cifar10")
    with data_error("cifar-10-batches-py", str(tmp_path)):
        load_dataset("cifar10", root=str(tmp_path))


def write_idx(path: Path, array: np.ndarray) -> None:
    # MNIST's raw IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, bytes.
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_mnist_through_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    labels = {"train": np.arange(20) % 10, "t10k": np.array([9, 8, 7, 6, 5, 4])}
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    data = load_dataset("mnist", root=str(tmp_path))
    assert data.shape == (1, 28, 28) and len(data.x_train) == 20 and len(data.x_test) == 6
    assert torch.equal(data.x_test[:, 0], torch.from_numpy(images["t10k"].astype(np.uint8)))
    assert data.y_test.tolist() == [9, 8, 7, 6, 5, 4] and data.y_test.dtype == torch.int64
    assert (data.mean, data.std, data.num_classes) == ((0.1307,), (0.3081,), 10)


def test_real_cifar10_subset():
    path = SHARED_DATA / "cifar10_subset.npz"
    if not path.is_file():
        pytest.skip(f"real data not present at {path}")
    data = load_dataset(f"npz:{path}")
    assert (len(data.x_train), len(data.x_test)) == (5085, 1017)
    assert data.shape == (3, 32, 32) and data.num_classes == 10
    assert data.y_train.dtype == torch.int64 and set(data.y_test.tolist()) == set(range(10))
    # Statistics of a subset are close to CIFAR-10's published ones.
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.02)
    assert data.std == pytest.approx((0.247, 0.243, 0.261), abs=0.02)
