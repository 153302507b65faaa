import hashlib
import pickle
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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

    data, digits = load_dataset("digits"), load_digits()
    raw = np.round(digits.images * 255 / 16).astype(np.uint8)
    ours = torch.cat([data.x_train, data.x_test])[:, 0].numpy()
    assert sorted(img.tobytes() for img in ours) == sorted(img.tobytes() for img in raw)
    # Image by image, with its label, in the fixed split's order: the set is read from scikit-learn's file.
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(ours, raw[order]) and np.array_equal(
        torch.cat([data.y_train, data.y_test]).numpy(), digits.target[order])


def test_loading_digits_does_not_import_scikit_learn():
    code = "import sys, backdoor; backdoor.load_dataset('digits'); print('sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


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


def write_cifar100(root: Path, monkeypatch) -> dict:
    from torchvision import datasets

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    splits = {"train": (rng.integers(0, 256, (6, 3072), dtype=np.uint8), [0, 5, 99, 5, 0, 1]),
              "test": (rng.integers(0, 256, (3, 3072), dtype=np.uint8), [99, 1, 0])}
    for name, (data, labels) in splits.items():
        (folder / name).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    # torchvision checks the published files' md5 sums; point it at the sums of the files written here.
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {**datasets.CIFAR100.meta, "md5": md5["meta"]})
    return splits


def test_cifar100_through_torchvision(tmp_path, monkeypatch):
    splits = write_cifar100(tmp_path, monkeypatch)
    data = load_dataset("cifar100", root=str(tmp_path))
    assert data.shape == (3, 32, 32) and (len(data.x_train), len(data.x_test)) == (6, 3)
    assert torch.equal(data.x_train, torch.from_numpy(splits["train"][0]).reshape(6, 3, 32, 32))
    assert data.y_train.tolist() == [0, 5, 99, 5, 0, 1] and data.y_test.dtype == torch.int64
    assert data.num_classes == 100
    assert (data.mean, data.std) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    (tmp_path / "cifar-100-python" / "test").unlink()
    with data_error("dataset cifar100", str(tmp_path / "cifar-100-python"), "not found or incomplete"):
        load_dataset("cifar100", root=str(tmp_path))


def solid(color, size=(32, 32), mode="RGB"):
    return Image.new(mode, size, color)


def write_gtsrb(root: Path) -> None:
    """The layout torchvision's GTSRB reads: Training/<class>/*.ppm, Final_Test/Images/*.ppm + GT-final_test.csv."""
    base = root / "gtsrb"
    for label, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        solid(color, (40, 35)).save(folder / "00000_00000.ppm")
        solid(color, (20, 28)).save(folder / "00000_00001.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate([2, 0]):
        Image.fromarray(texture(i, (45, 50))).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;50;45;5;5;40;45;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def texture(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_gtsrb_resized_to_32(tmp_path):
    write_gtsrb(tmp_path)
    data = load_dataset("gtsrb", root=str(tmp_path))
    assert data.shape == (3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2] and data.y_test.tolist() == [2, 0]
    assert torch.equal(data.x_train[2], torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    resized = Image.fromarray(texture(1, (45, 50))).resize((32, 32), Image.BILINEAR)  # what BackdoorBench feeds
    assert torch.equal(data.x_test[1], torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    assert (data.mean, data.std, data.num_classes) == ((0.0,) * 3, (1.0,) * 3, 3)


def test_gtsrb_incomplete(tmp_path):
    with data_error("dataset gtsrb", str(tmp_path / "gtsrb"), "not found"):
        load_dataset("gtsrb", root=str(tmp_path))
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with data_error("dataset gtsrb", str(tmp_path / "gtsrb" / "GT-final_test.csv")):
        load_dataset("gtsrb", root=str(tmp_path))


WNIDS = ["n09999999", "n01443537", "n02124075"]  # wnids.txt order, not sorted: it defines the labels


def write_tiny(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for label, wnid in enumerate(WNIDS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            solid((80 * label, 200, 40 * i), (64, 64)).save(images / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    solid(128, (64, 64), mode="L").save(base / "val" / "images" / "val_0.JPEG")  # some are grayscale
    solid((0, 0, 250), (64, 64)).save(base / "val" / "images" / "val_1.JPEG")
    (base / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{WNIDS[2]}\t0\t0\t63\t63\nval_1.JPEG\t{WNIDS[0]}\t3\t4\t50\t60\n")
    return base


def test_tiny_imagenet_folder_layout(tmp_path):
    write_tiny(tmp_path)
    data = load_dataset("tiny-imagenet", root=str(tmp_path))
    assert data.shape == (3, 64, 64) and (len(data.x_train), len(data.x_test)) == (6, 2)
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2] and data.y_test.tolist() == [2, 0]
    # JPEG keeps flat colours to within a few levels.
    colors = data.x_train.float().mean((2, 3))
    assert torch.allclose(colors, torch.tensor([[0, 200, 0], [0, 200, 40], [80, 200, 0], [80, 200, 40],
                                                [160, 200, 0], [160, 200, 40]]).float(), atol=3)
    assert torch.allclose(data.x_test[0].float().mean((1, 2)), torch.full((3,), 128.0), atol=3)
    assert (data.num_classes, data.mean) == (3, (0.4802, 0.4481, 0.3975))


@pytest.mark.parametrize("remove", ["wnids.txt", f"train/{WNIDS[1]}/images", "val/val_annotations.txt",
                                    "val/images/val_1.JPEG"])
def test_tiny_imagenet_incomplete(tmp_path, remove):
    path = write_tiny(tmp_path) / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with data_error(f"dataset tiny-imagenet: {path}: missing"):
        load_dataset("tiny-imagenet", root=str(tmp_path))


def test_tiny_imagenet_bad_annotations_and_no_download(tmp_path):
    with data_error(str(tmp_path / "tiny-imagenet-200" / "wnids.txt"), "missing", "download: not available"):
        load_dataset("tiny-imagenet", root=str(tmp_path), download=True)
    annotations = write_tiny(tmp_path) / "val" / "val_annotations.txt"
    annotations.write_text(f"val_0.JPEG\t{WNIDS[0]}\nval_1.JPEG\tn00000000\n")
    with data_error(str(annotations), "line 2"):
        load_dataset("tiny-imagenet", root=str(tmp_path))
