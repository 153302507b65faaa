"""Image data sets as uint8 N×C×H×W tensors: sklearn digits, .npz archives, CIFAR-10 and MNIST."""

from dataclasses import dataclass
from pathlib import Path

import torch

CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
MNIST_NORM = ((0.1307,), (0.3081,))
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the file or field and the reason."""


@dataclass(frozen=True)
class ImageData:
    name: str
    x_train: torch.Tensor  # uint8 N×C×H×W
    y_train: torch.Tensor  # int64 N
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x_uint8.float() / 255


def clean_subset(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Seeded random (not class-balanced) indices of max(1, round(ratio*n)) of n samples, sorted."""
    if not 0 < ratio <= 1:
        raise DataError(f"clean_ratio: must be in (0, 1], got {ratio}")
    count = max(1, round(ratio * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values


def load_dataset(name: str, root: str | None = None, download: bool = False) -> ImageData:
    """'digits', 'npz:PATH', or 'cifar10' / 'mnist' from torchvision under `root`."""
    if name == "digits":
        return _digits()
    if name.startswith("npz:"):
        return _npz(Path(name[4:]).expanduser())
    if name in ("cifar10", "mnist"):
        return _torchvision(name, root, download)
    raise DataError(f"dataset: unknown name {name!r} (expected digits, npz:PATH, cifar10 or mnist)")


def _make(name, x_train, y_train, x_test, y_test, norm=None) -> ImageData:
    if norm is None:
        # Data sets without published constants normalize with their own training statistics.
        pixels = to_unit(x_train).transpose(0, 1).reshape(x_train.shape[1], -1)
        norm = (tuple(round(v, 4) for v in pixels.mean(1).tolist()),
                tuple(round(v, 4) for v in pixels.std(1).tolist()))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ImageData(name, x_train, y_train, x_test, y_test, num_classes, *norm)


def _digits() -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:round(0.8 * len(y))], order[round(0.8 * len(y)):]
    return _make("digits", x[train], y[train], x[test], y[test])


def _npz_images(path: Path, key: str, array) -> torch.Tensor:
    if array.dtype.name != "uint8":
        raise DataError(f"{path}: {key}: expected uint8 images, got {array.dtype.name}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or not 1 <= array.shape[3] <= 4 or len(array) == 0:
        raise DataError(f"{path}: {key}: expected shape N×H×W or N×H×W×C (channels last, C ≤ 4), "
                        f"got {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _npz_labels(path: Path, key: str, array, count: int) -> torch.Tensor:
    if array.dtype.kind not in "iu" or array.shape != (count,):
        raise DataError(f"{path}: {key}: expected {count} integer labels, got {array.dtype.name} "
                        f"array of shape {array.shape}")
    if array.min() < 0:
        raise DataError(f"{path}: {key}: labels must be >= 0, found {array.min()}")
    return torch.from_numpy(array.astype("int64"))


def _npz(path: Path) -> ImageData:
    import numpy as np

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in NPZ_KEYS if key in archive}
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz archive ({str(error).splitlines()[0]})") from None
    for key in NPZ_KEYS:
        if key not in arrays:
            raise DataError(f"{path}: {key}: missing")
    x_train = _npz_images(path, "x_train", arrays["x_train"])
    x_test = _npz_images(path, "x_test", arrays["x_test"])
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"{path}: x_test: image shape {tuple(x_test.shape[1:])} differs from "
                        f"x_train's {tuple(x_train.shape[1:])}")
    y_train = _npz_labels(path, "y_train", arrays["y_train"], len(x_train))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    return _make(f"npz:{path}", x_train, y_train, x_test, y_test)


def _torchvision(name: str, root: str | None, download: bool) -> ImageData:
    from torchvision import datasets

    if root is None:
        raise DataError(f"dataset {name}: root: required (the directory that holds or receives the data)")
    root_path = Path(root).expanduser()
    cls, folder, norm = {"cifar10": (datasets.CIFAR10, "cifar-10-batches-py", CIFAR10_NORM),
                         "mnist": (datasets.MNIST, "MNIST/raw", MNIST_NORM)}[name]
    try:
        splits = [cls(str(root_path), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as error:
        reason = f"download failed ({error})" if download else "not found or incomplete (downloading is off: --download or download: true allows it)"
        raise DataError(f"dataset {name}: {root_path / folder}: {reason}".splitlines()[0]) from None
    xs, ys = [], []
    for split in splits:
        x = torch.as_tensor(split.data)
        xs.append(x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous())
        ys.append(torch.as_tensor(split.targets, dtype=torch.int64))
    return _make(name, xs[0], ys[0], xs[1], ys[1], norm)
