"""Datasets of the examples as uint8 tensors: MNIST from torchvision's files, the embedded
sample, smallNORB from its official files.

The whole dataset is read into memory (47 MB for MNIST, 0.9 GB for smallNORB) and later moved to
the training device in one copy; nothing here depends on torchvision except downloading MNIST.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchcaps.datasets import SmallNORB

EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "mnist_sample"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# The standard, uncompressed MNIST files and their SHA-256, to compare downloaded files with
# (before training, their sizes and idx headers are checked).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or read."""


def read_idx(path: Path, expected_ndim: int) -> Tensor:
    """Read an idx file (optionally gzipped) as a uint8 tensor, checking its header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 + 4 * expected_ndim:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than an idx header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic >> 8 != 0x08 or (magic & 0xFF) != expected_ndim:
        raise DataError(
            f"{path} is not an idx file of {expected_ndim}-d uint8 data (magic 0x{magic:08x})"
        )
    dims = struct.unpack(">" + "I" * expected_ndim, raw[4 : 4 + 4 * expected_ndim])
    offset = 4 + 4 * expected_ndim
    size = math.prod(dims)
    if len(raw) != offset + size:
        raise DataError(
            f"{path} has {len(raw) - offset} data bytes, its header {tuple(dims)} promises {size}: "
            "the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).view(*dims)


@dataclass
class ImageData:
    """A dataset held as tensors: uint8 images (N, H, W) or (N, C, H, W), int64 labels (N,)."""

    train_images: Tensor  # (N, H, W) or (N, C, H, W) uint8
    train_labels: Tensor  # (N,) int64
    test_images: Tensor
    test_labels: Tensor
    source: str


def load_split(directory: Path, split: str, suffix: str = "") -> tuple[Tensor, Tensor]:
    image_name, label_name, _ = MNIST_FILES[split]
    images = read_idx(directory / (image_name + suffix), 3)
    labels = read_idx(directory / (label_name + suffix), 1).long()
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise DataError(
            f"{directory}: {split} images {tuple(images.shape)} do not match labels "
            f"{tuple(labels.shape)} or are not 28x28"
        )
    if int(labels.max()) > 9:
        raise DataError(f"{directory}: {split} labels out of range 0..9")
    return images, labels


def load_embedded() -> ImageData:
    train = load_split(EMBEDDED_DIR, "train", ".gz")
    test = load_split(EMBEDDED_DIR, "test", ".gz")
    return ImageData(*train, *test, source=f"embedded sample ({EMBEDDED_DIR})")


def _check_full_files(raw_dir: Path) -> None:
    """Check sizes (and headers, via read_idx) of the full MNIST files before training."""
    for split, (image_name, label_name, count) in MNIST_FILES.items():
        for name, size in ((image_name, 16 + count * 784), (label_name, 8 + count)):
            path = raw_dir / name
            if path.stat().st_size != size:
                raise DataError(
                    f"{path} has {path.stat().st_size} bytes, expected {size} for the {split} "
                    "split of MNIST: the file is truncated or not MNIST"
                )


def _mnist_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).is_file() for name in MNIST_SHA256)


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "downloading MNIST needs torchvision: pip install torchcaps[examples]"
        ) from exc
    for train in (True, False):
        MNIST(str(root), train=train, download=True)


def load_mnist(
    data_dir: Path | None = None,
    *,
    download: bool = True,
    embedded_sample: bool = False,
    log: Callable[..., Any] = print,
) -> ImageData:
    """MNIST from ``data_dir`` (torchvision layout), downloaded there or the embedded sample.

    ``data_dir=None`` means ``./data``, where a missing dataset falls back (loudly) to the
    embedded sample when it cannot be downloaded; an explicit ``data_dir`` never falls back.
    """
    if embedded_sample:
        return load_embedded()
    explicit = data_dir is not None
    root = data_dir if data_dir is not None else Path("data")
    if not _mnist_present(root):
        error: str
        if not download:
            error = "it is not there and --no-download was given"
        else:
            log(f"MNIST not found under {root}/MNIST/raw; downloading ...")
            try:
                _download(root)
                error = ""
            except Exception as exc:
                error = f"download failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if error:
            if explicit:
                raise DataError(
                    f"--data-dir {root}: MNIST expected at {root}/MNIST/raw/"
                    f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte, but {error}"
                )
            bar = "!" * 78
            log(
                f"{bar}\n!! MNIST is not available under ./data ({error}).\n"
                f"!! Falling back to the EMBEDDED SAMPLE: 5,000 training and 1,000 test digits.\n"
                f"!! This is NOT the full dataset; its accuracy says nothing about the paper's.\n"
                f"!! Pass --data-dir DIR (torchvision layout) for the real run.\n{bar}"
            )
            return load_embedded()
    raw = root / "MNIST" / "raw"
    _check_full_files(raw)
    train = load_split(raw, "train")
    test = load_split(raw, "test")
    return ImageData(*train, *test, source=str(raw))


def load_mnist_test(data_dir: Path | None, log: Callable[..., Any] = print) -> ImageData:
    """Only the MNIST test set: from ``data_dir`` (torchvision layout) or the embedded sample."""
    if data_dir is None:
        log("using the embedded sample: the first 1,000 MNIST test digits (pass --data-dir)")
        return load_embedded()
    raw = Path(data_dir) / "MNIST" / "raw"
    image_name, label_name, _ = MNIST_FILES["test"]
    missing = [name for name in (image_name, label_name) if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"--data-dir {data_dir}: the MNIST test set is expected at {raw}/{{{image_name},"
            f"{label_name}}} (torchvision layout); missing: {', '.join(missing)}"
        )
    images, labels = load_split(raw, "test")
    log(f"using the MNIST test set from {raw}: {len(labels):,} digits")
    empty = images[:0]
    return ImageData(empty, labels[:0], images, labels, source=str(raw))


FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def load_fashion_mnist(
    data_dir: Path | None = None,
    *,
    download: bool = True,
    embedded_sample: bool = False,
    log: Callable[..., Any] = print,
) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017): the MNIST file layout, 28x28 uint8, 10 classes.

    Looked for, in this order, in ``data_dir`` itself (the four idx files, plain or gzipped,
    as Debian's ``dataset-fashion-mnist`` installs them in
    ``/usr/share/datasets/fashion-mnist``, the default when ``data_dir`` is ``None``) and in
    ``data_dir/FashionMNIST/raw/`` (torchvision's layout, downloaded there when missing unless
    ``download`` is false). No embedded sample.
    """
    if embedded_sample:
        raise DataError("Fashion-MNIST has no embedded sample: pass --data-dir DIR")
    root = data_dir if data_dir is not None else FASHION_MNIST_DEBIAN
    for directory in (root, root / "FashionMNIST" / "raw"):
        for suffix in ("", ".gz"):
            if all((directory / (name + suffix)).is_file() for name in _idx_names()):
                data = ImageData(
                    *load_split(directory, "train", suffix),
                    *load_split(directory, "test", suffix),
                    source=str(directory),
                )
                _check_counts(data, directory)
                return data
    if download and data_dir is not None:
        log(f"Fashion-MNIST not found under {root}; downloading ...")
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as exc:
            raise DataError(
                f"--data-dir {root}: Fashion-MNIST is not there and the download failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from exc
        return load_fashion_mnist(root, download=False, log=log)
    raise DataError(
        f"Fashion-MNIST expected at {root}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] "
        f"or {root}/FashionMNIST/raw/ (apt-get install dataset-fashion-mnist puts it in "
        f"{FASHION_MNIST_DEBIAN}; --data-dir DIR to download it there)"
    )


def _idx_names() -> list[str]:
    return [name for image, label, _ in MNIST_FILES.values() for name in (image, label)]


def _check_counts(data: ImageData, directory: Path) -> None:
    for split, images in (("train", data.train_images), ("test", data.test_images)):
        expected = MNIST_FILES[split][2]
        if images.shape[0] != expected:
            raise DataError(
                f"{directory}: {images.shape[0]} {split} images, expected {expected}: the files "
                "are truncated or not Fashion-MNIST"
            )


SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"


def load_smallnorb(
    data_dir: Path | None = None,
    *,
    download: bool = True,
    embedded_sample: bool = False,
    log: Callable[..., Any] = print,
) -> ImageData:
    """smallNORB from ``data_dir`` (default ``./data``): its six official files, plain or
    gzipped, in it or in its ``smallnorb/`` (:class:`torchcaps.datasets.SmallNORB`).

    Images stay uint8 (N, 2, 96, 96); the recipe's augmentation and test transform do the
    paper's preprocessing per batch. Never downloaded (``download`` is ignored) and without an
    embedded sample.
    """
    if embedded_sample:
        raise DataError(
            "smallNORB has no embedded sample: pass --data-dir DIR with its official files"
        )
    root = data_dir if data_dir is not None else Path("data")
    try:
        train, test = SmallNORB(root, "train"), SmallNORB(root, "test")
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"--data-dir {root}: {exc}. The examples do not download smallNORB: put the six "
            f"files of {SMALLNORB_URL} in that directory"
        ) from exc
    log(f"smallNORB from {root}: {len(train):,} training and {len(test):,} test pairs")
    return ImageData(train.images, train.labels, test.images, test.labels, source=str(root))


# Dataset name -> loader taking the data flags of the command line.
DATASETS: dict[str, Callable[..., ImageData]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "smallnorb": load_smallnorb,
}
# Dataset name -> what --data-dir must hold.
DATA_DIR_HELP = {
    "mnist": "MNIST root in torchvision layout (<dir>/MNIST/raw/...); default ./data, falling "
    "back to the embedded sample when absent",
    "fashion-mnist": "Fashion-MNIST's four idx files (plain or .gz) or <dir>/FashionMNIST/raw/; "
    f"default {FASHION_MNIST_DEBIAN} (Debian's dataset-fashion-mnist)",
    "smallnorb": "directory of the six official smallNORB files (plain or .gz, also in "
    "<dir>/smallnorb/); default ./data; never downloaded",
}


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    *,
    download: bool = True,
    embedded_sample: bool = False,
    log: Callable[..., Any] = print,
) -> ImageData:
    """The dataset ``name`` (one of :data:`DATASETS`) as uint8 tensors."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choices: {sorted(DATASETS)}")
    return DATASETS[name](data_dir, download=download, embedded_sample=embedded_sample, log=log)
