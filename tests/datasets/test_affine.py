"""torchcaps.datasets.affine: the affNIST-style set against a per-pixel float64 loop written
from its map, its ranges, that every digit stays on the canvas, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import bilinear_sample
from torchcaps.datasets import affine_mnist


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28, dtype=torch.float64)
    for k in range(n):  # a random blob of random size and place per digit
        top, left = (int(v) for v in torch.randint(2, 12, (2,), generator=g))
        hh, ww = (int(v) for v in torch.randint(6, 15, (2,), generator=g))
        x[k, top : top + hh, left : left + ww] = torch.rand(hh, ww, generator=g, dtype=x.dtype)
    return x


def _reference(img: torch.Tensor, angle: float, shear: float, sx: float, sy: float,
               tx: float, ty: float, canvas: int) -> torch.Tensor:  # fmt: skip
    """q = R Sh S (p - c_in) + c_out + t, inverted per canvas pixel, bilinear, zero outside."""
    h, w = img.shape
    t = math.radians(angle)
    # A = R Sh S with R = [[cos, sin], [-sin, cos]] (counter-clockwise on screen, y down)
    a11 = math.cos(t) * sx
    a12 = (math.cos(t) * shear + math.sin(t)) * sy
    a21 = -math.sin(t) * sx
    a22 = (-math.sin(t) * shear + math.cos(t)) * sy
    det = a11 * a22 - a12 * a21
    out = torch.zeros(canvas, canvas, dtype=torch.float64)
    c_in_x, c_in_y, c_out = (w - 1) / 2, (h - 1) / 2, (canvas - 1) / 2
    for qy in range(canvas):
        for qx in range(canvas):
            dx, dy = qx - c_out - tx, qy - c_out - ty
            px = (a22 * dx - a12 * dy) / det + c_in_x
            py = (-a21 * dx + a11 * dy) / det + c_in_y
            out[qy, qx] = bilinear_sample(img, px, py)
    return out


def test_images_are_the_map_of_their_parameters() -> None:
    x = _digits(3)
    out = affine_mnist(x, torch.tensor([0, 4, 9]), seed=11)
    assert out.images.shape == (3, 1, 40, 40) and out.images.dtype == torch.float64
    assert out.labels.tolist() == [0, 4, 9]
    for k in range(3):
        expected = _reference(
            x[k], float(out.angles[k]), float(out.shears[k]), float(out.scales[k, 0]),
            float(out.scales[k, 1]), float(out.translations[k, 0]),
            float(out.translations[k, 1]), 40,
        )  # fmt: skip
        torch.testing.assert_close(out.images[k, 0], expected, atol=1e-9, rtol=0)


def test_without_rotation_shear_or_scale_it_is_a_translation() -> None:
    centred = torch.zeros(1, 28, 28, dtype=torch.float64)
    centred[0, 10:18, 11:17] = torch.rand(8, 6, dtype=torch.float64)
    out = affine_mnist(centred, torch.tensor([1]), max_rotation=0.0, max_shear=0.0,
                       scale=(1.0, 1.0), canvas=28)  # fmt: skip
    t = out.translations[0]
    assert bool((t.abs() <= 10).all())
    shifted = _reference(centred[0], 0.0, 0.0, 1.0, 1.0, float(t[0]), float(t[1]), 28)
    torch.testing.assert_close(out.images[0, 0], shifted, atol=1e-9, rtol=0)
    # with zero translation range the identity map gives back the image itself
    full = torch.ones(1, 28, 28, dtype=torch.float64)
    same = affine_mnist(full, torch.tensor([1]), max_rotation=0.0, max_shear=0.0,
                        scale=(1.0, 1.0), canvas=28)  # fmt: skip
    torch.testing.assert_close(same.translations, torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(same.images[0], full)


def test_ranges_and_every_digit_stays_on_the_canvas() -> None:
    x = _digits(200, seed=1)
    out = affine_mnist(x, torch.zeros(200, dtype=torch.long), seed=2)
    assert float(out.angles.abs().max()) <= 20 and float(out.angles.abs().max()) > 15
    assert float(out.shears.abs().max()) <= 0.1 and float(out.shears.abs().max()) > 0.08
    assert float(out.scales.min()) >= 0.8 and float(out.scales.max()) <= 1.2
    assert float(out.translations.abs().max()) > 3  # translated, not only centred
    # the whole digit is on the canvas: its mass is the input's times the area factor |det A|
    det = out.scales.prod(dim=1)  # det R = det Sh = 1
    mass_in = x.sum(dim=(1, 2)) * det
    mass_out = out.images.sum(dim=(1, 2, 3))
    torch.testing.assert_close(mass_out, mass_in, rtol=0.03, atol=0.0)


def test_deterministic_in_the_seed_and_image_k_independent_of_the_rest() -> None:
    x = _digits(12, seed=3).float()
    y = torch.arange(12) % 10
    a, b = affine_mnist(x, y, seed=4), affine_mnist(x, y, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c = affine_mnist(x, y, seed=5)
    assert not torch.equal(a.angles, c.angles)
    head = affine_mnist(x[:5], y[:5], seed=4)
    assert torch.equal(head.angles, a.angles[:5]) and torch.equal(head.images, a.images[:5])
    as_uint8 = affine_mnist((x * 255).round().to(torch.uint8), y, seed=4)
    assert as_uint8.images.dtype == torch.float32 and as_uint8.images.shape == (12, 1, 40, 40)


def test_bad_input() -> None:
    x, y = torch.rand(2, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"scale must be a range \(low, high\)"):
        affine_mnist(x, y, scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="max_rotation must be >= 0"):
        affine_mnist(x, y, max_rotation=-1.0)
    with pytest.raises(ValueError, match=r"affine_mnist expected labels of shape \(2,\)"):
        affine_mnist(x, torch.tensor([1]))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        affine_mnist(x, y, seed=-1)
    with pytest.raises(TypeError, match="scale must be a float"):
        affine_mnist(x, y, scale=("a", "b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"scale must be a pair \(low, high\), got 1.0"):
        affine_mnist(x, y, scale=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be > 0"):
        affine_mnist(x, y, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="canvas 20 is smaller than the images, 28x28"):
        affine_mnist(x, y, canvas=20)
