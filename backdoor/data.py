"""Image data sets as uint8 N×C×H×W tensors: sklearn digits, .npz archives, the torchvision sets (MNIST,
CIFAR-10/100, GTSRB) and Tiny-ImageNet's folder layout."""

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Names load_dataset knows besides npz:PATH; every one but digits is read from under a root directory.
DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "cifar100", "gtsrb", "tiny-imagenet")
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
CIFAR100_NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_NORM = ((0.1307,), (0.3081,))
GTSRB_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # BackdoorBench does not normalize GTSRB
TINY_IMAGENET_NORM = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
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


def check_clean_subset(n: int, ratio: float, num_classes: int) -> None:
    """A clean subset SAU can learn from: at least one image per class on average (clean_subset would quietly
    take one image where the ratio gives none)."""
    if not 0 < ratio <= 1:
        raise DataError(f"clean_ratio: must be in (0, 1], got {ratio}")
    count = round(ratio * n)
    if count < num_classes:
        raise DataError(f"clean_ratio: {ratio:g} of the {n} training images gives {count}, fewer than the "
                        f"{num_classes} classes")


def load_dataset(name: str, root: str | None = None, download: bool = False) -> ImageData:
    """'digits', 'npz:PATH', or one of DATASETS read from under `root`."""
    if name == "digits":
        return _digits()
    if name.startswith("npz:"):
        return _npz(Path(name[4:]).expanduser())
    if name not in DATASETS:
        raise DataError(f"dataset: unknown name {name!r} (expected npz:PATH or one of {', '.join(DATASETS)})")
    if root is None:
        raise DataError(f"dataset {name}: root: required (the directory that holds or receives the data)")
    root_path = Path(root).expanduser()
    return _tiny_imagenet(root_path, download) if name == "tiny-imagenet" else _torchvision(name, root_path, download)


def _make(name, x_train, y_train, x_test, y_test, norm=None) -> ImageData:
    if norm is None:
        # Data sets without published constants normalize with their own training statistics.
        pixels = to_unit(x_train).transpose(0, 1).reshape(x_train.shape[1], -1)
        norm = (tuple(round(v, 4) for v in pixels.mean(1).tolist()),
                tuple(round(v, 4) for v in pixels.std(1).tolist()))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ImageData(name, x_train, y_train, x_test, y_test, num_classes, *norm)


def _digits() -> ImageData:
    # scikit-learn's file, read as its load_digits reads it: importing scikit-learn (and SciPy with it) would add
    # 1.5 s (on a loaded 2-core machine) and some 60 MiB to every process that loads the set.
    package = Path(importlib.util.find_spec("sklearn").origin).parent
    data = np.loadtxt(package / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x = torch.from_numpy(data[:, :-1].reshape(-1, 8, 8)).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(data[:, -1].astype(np.int64))
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


def _check_npz_sizes(path: Path) -> None:
    """Each array's header (shape, dtype) fits the bytes the archive holds for it, so that a forged header
    fails here instead of allocating what it claims."""
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if key not in NPZ_KEYS:
                continue
            with archive.open(info) as member:
                version = npy.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise DataError(f"{path}: {key}: unsupported .npy format version {version}")
                read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read_header(member)
                data_size = info.file_size - member.tell()
            size = math.prod(shape) * dtype.itemsize
            # Deflate expands a byte to at most 1032 (zlib's documented limit); stored members do not expand.
            most = info.compress_size * (1032 if info.compress_type != zipfile.ZIP_STORED else 1)
            if size != data_size or info.file_size > most + 1024:
                raise DataError(f"{path}: {key}: header says {dtype} array of shape {shape} ({size:,} bytes), "
                                f"which does not fit the archive ({data_size:,} bytes of data)")


def _npz(path: Path) -> ImageData:
    import zipfile

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in NPZ_KEYS if key in archive}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
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


def _to_rgb(size: int):
    """PIL image -> uint8 3×size×size tensor, resized by PIL (bilinear, antialiased) where its size differs."""
    from torchvision import transforms

    return transforms.Compose([lambda image: image.convert("RGB"), transforms.Resize((size, size)),
                               transforms.PILToTensor()])


def _torchvision(name: str, root: Path, download: bool) -> ImageData:
    from torchvision import datasets

    folder, norm = {"mnist": ("MNIST/raw", MNIST_NORM), "cifar10": ("cifar-10-batches-py", CIFAR10_NORM),
                    "cifar100": ("cifar-100-python", CIFAR100_NORM), "gtsrb": ("gtsrb", GTSRB_NORM)}[name]
    try:
        if name == "gtsrb":
            # Images of varying size, resized to 32×32 as BackdoorBench does.
            splits = [datasets.GTSRB(str(root), split=split, download=download, transform=_to_rgb(32))
                      for split in ("train", "test")]
            arrays = [(torch.stack([x for x, _ in split]), torch.tensor([y for _, y in split])) for split in splits]
        else:
            cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
            splits = [cls(str(root), train=train, download=download) for train in (True, False)]
            arrays = [(_channels_first(torch.as_tensor(split.data)),
                       torch.as_tensor(split.targets, dtype=torch.int64)) for split in splits]
    except (RuntimeError, OSError) as error:
        where = getattr(error, "filename", None) or root / folder  # the missing file, where the error names one
        reason = (f"download failed ({error})" if download else
                  "not found or incomplete (downloading is off: --download or download: true allows it)")
        raise DataError(f"dataset {name}: {where}: {reason}".splitlines()[0]) from None
    (x_train, y_train), (x_test, y_test) = arrays
    return _make(name, x_train, y_train, x_test, y_test, norm)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _tiny_imagenet(root: Path, download: bool) -> ImageData:
    """ROOT/tiny-imagenet-200 as unpacked from tiny-imagenet-200.zip; its labelled validation split is the test set."""
    from PIL import Image

    base = root / "tiny-imagenet-200"

    def bad(path: Path, reason: str) -> DataError:
        return DataError(f"dataset tiny-imagenet: {path}: {reason}")

    def existing(path: Path) -> Path:
        if not path.exists():
            # torchvision has no Tiny-ImageNet class, so there is no official mirror to download from.
            raise bad(path, "missing" + (" (download: not available for tiny-imagenet; unpack "
                                         "tiny-imagenet-200.zip under root)" if download else ""))
        return path

    wnids = existing(base / "wnids.txt").read_text().split()
    if not wnids:
        raise bad(base / "wnids.txt", "lists no classes")
    train = []
    for label, wnid in enumerate(wnids):
        files = sorted(existing(base / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise bad(base / "train" / wnid / "images", "no .JPEG images")
        train += [(path, label) for path in files]
    annotations = existing(base / "val" / "val_annotations.txt")
    index, test = {wnid: label for label, wnid in enumerate(wnids)}, []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise bad(annotations, f"line {number}: expected FILE<tab>WNID with a WNID from wnids.txt")
        test.append((base / "val" / "images" / fields[0], index[fields[1]]))

    def load(samples: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, to_rgb = [], _to_rgb(64)  # the set is 64×64; some of its images are grayscale
        for path, _ in samples:
            try:
                with Image.open(existing(path)) as image:
                    images.append(to_rgb(image))
            except OSError as error:
                raise bad(path, f"unreadable image ({error})".splitlines()[0]) from None
        return torch.stack(images), torch.tensor([label for _, label in samples])

    return _make("tiny-imagenet", *load(train), *load(test), TINY_IMAGENET_NORM)
