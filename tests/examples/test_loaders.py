"""examples/loaders.py: MNIST files in torchvision's layout, the embedded sample, and the errors
of a bad dataset (each a DataError naming the file)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

import loaders
import mnist_capsnet
from _helpers import quiet


def test_embedded_sample_is_real_mnist() -> None:
    data = loaders.load_embedded()
    assert data.train_images.shape == (5000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert data.train_images.dtype == torch.uint8
    # every class is present in both splits
    assert set(data.train_labels.tolist()) == set(range(10))
    assert set(data.test_labels.tolist()) == set(range(10))
    size = sum(p.stat().st_size for p in loaders.EMBEDDED_DIR.iterdir())
    assert size < 2 * 1024 * 1024


def test_truncated_data_file_is_reported(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in loaders.MNIST_SHA256:
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    with pytest.raises(
        loaders.DataError, match="train-images-idx3-ubyte has 104 bytes, expected 47040016"
    ):
        mnist_capsnet.run(
            ["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=quiet
        )


def _fake_mnist(root: Path, *, magic: dict[str, int] | None = None) -> Path:
    """Full-size MNIST files (sparse zeros) with valid headers unless ``magic`` overrides one."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for images, labels, count in loaders.MNIST_FILES.values():
        for name, dims in ((images, (count, 28, 28)), (labels, (count,))):
            header = (magic or {}).get(name, 0x0800 + len(dims))
            data = header.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
            with open(raw / name, "wb") as f:
                f.write(data)
                f.truncate(len(data) + int(torch.tensor(dims).prod()))
    return raw


def test_bad_magic_in_data_dir_is_a_data_error(tmp_path: Path) -> None:
    # 0x0D: an idx file of float32 data, not uint8
    _fake_mnist(tmp_path, magic={"train-images-idx3-ubyte": 0x00000D03})
    with pytest.raises(loaders.DataError, match="train-images-idx3-ubyte is not an idx file"):
        mnist_capsnet.run(
            ["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=quiet
        )


def test_label_out_of_range_in_data_dir_is_a_data_error(tmp_path: Path) -> None:
    raw = _fake_mnist(tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte"
    with open(labels, "r+b") as f:
        f.seek(8 + 1234)
        f.write(bytes([10]))
    with pytest.raises(loaders.DataError, match="test labels out of range 0..9"):
        mnist_capsnet.run(
            ["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=quiet
        )


def test_full_mnist_files_load(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    data = loaders.load_mnist(tmp_path, download=False, log=quiet)
    assert data.train_images.shape == (60000, 28, 28) and data.test_labels.shape == (10000,)
    assert data.source == str(tmp_path / "MNIST" / "raw")


def test_read_idx(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (3, 2, 4), dtype=torch.uint8)
    raw = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (3, 2, 4))
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw + images.numpy().tobytes()))
    assert torch.equal(loaders.read_idx(tmp_path / "x-idx3-ubyte.gz", 3), images)
    (tmp_path / "short").write_bytes(raw + b"\x00" * 5)
    with pytest.raises(
        loaders.DataError, match=r"has 5 data bytes, its header \(3, 2, 4\) promises 24"
    ):
        loaders.read_idx(tmp_path / "short", 3)
    with pytest.raises(loaders.DataError, match="is not an idx file of 1-d uint8 data"):
        loaders.read_idx(tmp_path / "short", 1)
    with pytest.raises(loaders.DataError, match="cannot read"):
        loaders.read_idx(tmp_path / "missing", 3)


def test_test_set_only(tmp_path: Path) -> None:
    said: list[str] = []
    sample = loaders.load_mnist_test(None, log=said.append)
    assert sample.test_images.shape == (1000, 28, 28) and "embedded sample" in said[0]
    with pytest.raises(loaders.DataError, match="missing: t10k-images-idx3-ubyte, t10k-labels"):
        loaders.load_mnist_test(tmp_path, log=quiet)
    _fake_mnist(tmp_path)
    data = loaders.load_mnist_test(tmp_path, log=quiet)
    assert data.test_images.shape == (10000, 28, 28) and data.train_images.shape[0] == 0


def test_unknown_dataset() -> None:
    with pytest.raises(
        loaders.DataError,
        match=r"unknown dataset 'cifar'; choices: \['fashion-mnist', 'mnist', 'smallnorb'\]",
    ):
        loaders.load_dataset("cifar")


def _fake_fashion(directory: Path, compress: bool) -> None:
    """Full-size Fashion-MNIST files (the MNIST layout): image k is k % 251, label k % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    for images, labels, count in loaders.MNIST_FILES.values():
        pixels = (torch.arange(count) % 251).to(torch.uint8).repeat_interleave(784)
        for name, dims, body in (
            (images, (count, 28, 28), pixels.numpy().tobytes()),
            (labels, (count,), (torch.arange(count) % 10).to(torch.uint8).numpy().tobytes()),
        ):
            data = (0x0800 + len(dims)).to_bytes(4, "big")
            data += b"".join(d.to_bytes(4, "big") for d in dims) + body
            if compress:
                (directory / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=1))
            else:
                (directory / name).write_bytes(data)


@pytest.mark.parametrize("layout", ["debian_gz", "torchvision"])
def test_fashion_mnist_in_either_layout(tmp_path: Path, layout: str) -> None:
    if layout == "debian_gz":
        _fake_fashion(tmp_path, compress=True)
        where = tmp_path
    else:
        where = tmp_path / "FashionMNIST" / "raw"
        _fake_fashion(where, compress=False)
    data = loaders.load_dataset("fashion-mnist", tmp_path, download=False, log=quiet)
    assert data.train_images.shape == (60000, 28, 28) and data.test_labels.shape == (10000,)
    assert int(data.train_images[300, 0, 0]) == 300 % 251 and int(data.train_labels[13]) == 3
    assert data.source == str(where)


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(loaders.DataError, match="apt-get install dataset-fashion-mnist"):
        loaders.load_dataset("fashion-mnist", tmp_path, download=False, log=quiet)
    with pytest.raises(loaders.DataError, match="no embedded sample"):
        loaders.load_dataset("fashion-mnist", None, embedded_sample=True, log=quiet)
    _fake_fashion(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        (0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5)
    )
    with pytest.raises(loaders.DataError, match="do not match labels"):
        loaders.load_dataset("fashion-mnist", tmp_path, download=False, log=quiet)


def test_an_mnist_preset_trains_on_fashion_mnist_and_resumes_only_on_it(tmp_path: Path) -> None:
    data = tmp_path / "data"  # both datasets in torchvision's layout
    _fake_fashion(data / "FashionMNIST" / "raw", compress=True)
    _fake_mnist(data)
    common = ["--data-dir", str(data), "--no-download", "--quiet", "--max-train-samples", "32",
              "--batch-size", "16", "--max-steps", "1", "--max-test-samples", "16",
              "--no-reconstruction", "--out-dir", str(tmp_path / "run")]  # fmt: skip
    history = mnist_capsnet.run([*common, "--dataset", "fashion-mnist", "--epochs", "1"], log=quiet)
    assert history[0]["test_samples"] == 16
    with pytest.raises(
        Exception, match="trained on fashion-mnist, cannot resume it with --dataset mnist"
    ):
        mnist_capsnet.run([*common, "--epochs", "2", "--resume"], log=quiet)
