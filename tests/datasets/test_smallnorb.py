"""torchcaps.datasets.smallnorb: the reader on small files written by the tests in the official
binary matrix format (smallNORB itself cannot be downloaded here), and the paper's
preprocessing against hand-computed values and per-image loops."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from _helpers import NORB_PREFIX as PREFIX
from _helpers import fake_smallnorb_split as fake_split
from _helpers import write_norb_matrix as write_matrix
from torchcaps.datasets import (
    SmallNORB,
    center_crop,
    crop_brightness_contrast,
    preprocess_smallnorb,
    random_crop_brightness_contrast,
    random_crop_parameters,
    read_norb_matrix,
    smallnorb_downsample,
    standardize_images,
)


@pytest.mark.parametrize("compress", [False, True])
def test_reads_what_was_written_in_the_official_format(tmp_path: Path, compress: bool) -> None:
    train = fake_split(tmp_path, "train", 5, seed=0, compress=compress)
    test = fake_split(tmp_path, "test", 3, seed=1, compress=compress)
    for split, data in (("train", train), ("test", test)):
        ds = SmallNORB(tmp_path, split)
        assert len(ds) == data["dat"].shape[0]
        assert torch.equal(ds.images, data["dat"])
        assert torch.equal(ds.labels, data["cat"].long()) and ds.labels.dtype == torch.int64
        assert torch.equal(ds.info, data["info"].long())
        image, label = ds[1]
        assert torch.equal(image, data["dat"][1]) and int(label) == int(data["cat"][1])
    flipped = SmallNORB(tmp_path, "test", transform=lambda x: x.flip(-1))
    assert torch.equal(flipped[0][0], test["dat"][0].flip(-1))


def test_files_may_sit_in_a_smallnorb_subdirectory(tmp_path: Path) -> None:
    (tmp_path / "smallnorb").mkdir()
    data = fake_split(tmp_path / "smallnorb", "test", 2, seed=2)
    assert torch.equal(SmallNORB(tmp_path, "test").images, data["dat"])


def test_matrix_types_dimensions_and_padding(tmp_path: Path) -> None:
    cases = {
        "f32": torch.randn(2, 3),
        "f64": torch.randn(4, dtype=torch.float64),
        "i16": torch.arange(24, dtype=torch.int16).view(2, 3, 4),
        "u8_5d": torch.randint(0, 255, (1, 2, 3, 2, 2), dtype=torch.uint8),  # no padding slot
    }
    for name, t in cases.items():
        assert torch.equal(read_norb_matrix(write_matrix(tmp_path / f"{name}.mat", t)), t)
    # a 1-D int matrix: 3 size slots, the two unused ones padding
    raw = struct.pack("<5i", 0x1E3D4C54, 1, 2, 7, 7) + struct.pack("<2i", -5, 9)
    (tmp_path / "pad.mat").write_bytes(raw)
    assert read_norb_matrix(tmp_path / "pad.mat").tolist() == [-5, 9]


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mat"
    bad.write_bytes(struct.pack("<5i", 0x12345678, 1, 2, 1, 1) + bytes(8))
    with pytest.raises(ValueError, match="magic number 0x12345678 is not a NORB matrix"):
        read_norb_matrix(bad)
    bad.write_bytes(struct.pack("<5i", 0x1E3D4C55, 2, 3, 4, 1) + bytes(11))
    with pytest.raises(ValueError, match=r"shape \(3, 4\) \(12 bytes of data\), the file has 11"):
        read_norb_matrix(bad)
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no header"):
        read_norb_matrix(bad)
    with pytest.raises(FileNotFoundError, match="training-dat.mat"):
        SmallNORB(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        SmallNORB(tmp_path, "validation")  # type: ignore[arg-type]
    data = fake_split(tmp_path, "train", 4, seed=3)
    write_matrix(tmp_path / f"{PREFIX['train']}-cat.mat", data["cat"][:3])
    with pytest.raises(ValueError, match=r"labels torch.int32 \(3,\), expected int32 \(4,\)"):
        SmallNORB(tmp_path, "train")
    write_matrix(tmp_path / f"{PREFIX['train']}-cat.mat", data["cat"] + 5)
    with pytest.raises(ValueError, match="labels outside 0-4"):
        SmallNORB(tmp_path, "train")


def test_downsample_and_standardize() -> None:
    x = torch.randint(0, 256, (3, 2, 96, 96), dtype=torch.uint8)
    small = smallnorb_downsample(x)
    assert small.shape == (3, 2, 48, 48) and small.dtype == torch.float32
    # uint8 is scaled to [0, 1]: a constant image stays that constant
    const = smallnorb_downsample(torch.full((1, 2, 96, 96), 51, dtype=torch.uint8))
    torch.testing.assert_close(const, torch.full((1, 2, 48, 48), 0.2))
    # the antialiasing filter is symmetric: away from the border a linear ramp j is sampled at
    # the centre of each output pixel, 2 i + 0.5
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    torch.testing.assert_close(
        smallnorb_downsample(ramp, 8)[0, 0, 4, 2:6], 2 * torch.arange(2.0, 6.0) + 0.5
    )
    s = standardize_images(small)
    for image, source in zip(s, small.double(), strict=True):  # per image, both cameras
        values = source.flatten().tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        expected = (source - mean) / (var + 1e-5) ** 0.5
        torch.testing.assert_close(image.double(), expected, atol=1e-5, rtol=1e-5)
        assert abs(float(image.mean())) < 1e-5
    assert torch.equal(standardize_images(torch.full((1, 2, 4, 4), 7.0)), torch.zeros(1, 2, 4, 4))


def test_center_crop_against_hand_computed_windows() -> None:
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    assert torch.equal(center_crop(x, 3), x[:, :, 1:4, 1:4])
    assert torch.equal(center_crop(x, 5), x[:, :, 0:5, 0:5])
    with pytest.raises(ValueError, match=r"crop size 6 is larger than the images, \(1, 2, 5, 6\)"):
        center_crop(x, 6)


def test_random_crops_are_windows_with_brightness_and_contrast() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 10, 9)
    plain = random_crop_brightness_contrast(
        x, 4, max_brightness=0.0, contrast=(1.0, 1.0), generator=g
    )
    offsets = set()
    for n in range(16):  # every crop is a window of its own image, the same for both cameras
        hits = [
            (t, left)
            for t in range(7)
            for left in range(6)
            if torch.allclose(plain[n], x[n, :, t : t + 4, left : left + 4], atol=1e-6)
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 8  # random, not one place
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = random_crop_brightness_contrast(x, 4, generator=g1)
    assert torch.equal(a, random_crop_brightness_contrast(x, 4, generator=g2))
    # the same windows (same draws) with contrast c and brightness b: (w - mean) c + mean + b
    g3 = torch.Generator().manual_seed(5)
    windows = random_crop_brightness_contrast(
        x, 4, max_brightness=0.0, contrast=(1.0, 1.0), generator=g3
    )
    centred = windows - windows.mean(dim=(1, 2, 3), keepdim=True)
    factor = (a - a.mean(dim=(1, 2, 3), keepdim=True)).flatten(1) / centred.flatten(1)
    assert bool(((factor.min(1).values - factor.max(1).values).abs() < 1e-4).all())
    assert bool(((factor[:, 0] >= 0.5) & (factor[:, 0] <= 1.5)).all())
    shift = (a.mean(dim=(1, 2, 3)) - windows.mean(dim=(1, 2, 3))).abs()
    assert bool((shift <= 0.25 + 1e-6).all())
    with pytest.raises(TypeError, match="floating point"):
        random_crop_brightness_contrast(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="contrast"):
        random_crop_brightness_contrast(x, 4, contrast=(1.5, 0.5))


def test_the_papers_preprocessing_on_synthetic_files(tmp_path: Path) -> None:
    """The full preset on files in the official format (the only smallNORB data here)."""
    fake_split(tmp_path, "train", 6, seed=4)
    fake_split(tmp_path, "test", 6, seed=5)
    train, test = SmallNORB(tmp_path, "train"), SmallNORB(tmp_path, "test")
    g = torch.Generator().manual_seed(0)
    xtr = preprocess_smallnorb(train.images, train=True, generator=g)
    xte = preprocess_smallnorb(test.images, train=False)
    assert xtr.shape == xte.shape == (6, 2, 32, 32)
    expected = center_crop(standardize_images(smallnorb_downsample(test.images)), 32)
    assert torch.equal(xte, expected)
    assert bool(torch.isfinite(xtr).all())


def test_crop_brightness_contrast_against_a_per_image_loop() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 9, 11, dtype=torch.float64, generator=g)
    top = torch.tensor([0, 5, 2, 3, 1, 5])
    left = torch.tensor([7, 0, 3, 1, 7, 4])
    contrast = torch.tensor([1.0, 0.5, 1.5, 0.0, 1.2, 0.9])
    brightness = torch.tensor([0.0, -0.25, 0.1, 0.25, -0.1, 0.0])
    out = crop_brightness_contrast(x, top, left, contrast, brightness, size=4)
    for k in range(6):
        window = x[k, :, int(top[k]) : int(top[k]) + 4, int(left[k]) : int(left[k]) + 4]
        total = 0.0
        for value in window.flatten().tolist():
            total += value
        mean = total / window.numel()
        expected = (window - mean) * float(contrast[k]) + mean + float(brightness[k])
        torch.testing.assert_close(out[k], expected)
    assert out.dtype == torch.float64


def test_random_crops_are_their_drawn_parameters_applied() -> None:
    x = torch.randn(7, 2, 12, 10)
    drawn = random_crop_parameters(
        7, (12, 10), 5, max_brightness=0.3, contrast=(0.2, 0.4),
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    top, left, contrast, brightness = drawn
    assert bool(((top >= 0) & (top <= 7) & (left >= 0) & (left <= 5)).all())
    assert bool(((contrast >= 0.2) & (contrast <= 0.4)).all())
    assert bool((brightness.abs() <= 0.3).all())
    random = random_crop_brightness_contrast(
        x, 5, max_brightness=0.3, contrast=(0.2, 0.4), generator=torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(random, crop_brightness_contrast(x, *drawn, size=5))


def test_crop_parameters_bad_input() -> None:
    x = torch.randn(2, 1, 8, 8)
    ok = (torch.zeros(2, dtype=torch.long),) * 2 + (torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"top must have shape \(N,\) = \(2,\).*got \(3,\)"):
        crop_brightness_contrast(x, torch.zeros(3, dtype=torch.long), *ok[1:], size=4)
    with pytest.raises(TypeError, match="left must be an integer tensor"):
        crop_brightness_contrast(x, ok[0], torch.zeros(2), *ok[2:], size=4)
    with pytest.raises(TypeError, match="contrast must be a tensor"):
        crop_brightness_contrast(x, ok[0], ok[1], 1.0, ok[3], size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"top in \[0, 4\]"):
        crop_brightness_contrast(x, torch.tensor([0, 5]), *ok[1:], size=4)
    with pytest.raises(TypeError, match="floating point"):
        crop_brightness_contrast(x.to(torch.uint8), *ok, size=4)
    with pytest.raises(ValueError, match="larger than the images"):
        random_crop_parameters(2, (8, 8), 9)
    with pytest.raises(TypeError, match="image_size must be a pair"):
        random_crop_parameters(2, (8,), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be >= 0"):
        random_crop_parameters(-1, (8, 8), 4)
