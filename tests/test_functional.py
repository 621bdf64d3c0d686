from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

import torchcaps
from conftest import TOL
from reference import squash_ref
from torchcaps.functional import capsule_lengths, mask_capsules, reconstruction_loss, squash

finite = st.floats(-100, 100, allow_nan=False, width=64)


# -- squash ------------------------------------------------------------------------------------
def test_squash_hand_computed() -> None:
    # |s| = 5: |v| = 25/26, direction (0.6, 0.8)
    v = squash(torch.tensor([3.0, 4.0], dtype=torch.float64))
    expected = torch.tensor([0.6, 0.8], dtype=torch.float64) * 25 / 26
    torch.testing.assert_close(v, expected, atol=1e-12, rtol=1e-12)


def test_squash_matches_reference(dtype: torch.dtype) -> None:
    s = torch.randn(4, 7, 16, dtype=torch.float64) * 3
    atol, rtol = TOL[dtype]
    v = squash(s.to(dtype))
    assert v.dtype == dtype
    torch.testing.assert_close(v.double(), squash_ref(s), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_squash_dim(dim: int) -> None:
    s = torch.randn(5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(squash(s, dim=dim), squash_ref(s, dim=dim))


@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_squash_properties(rows: int, dim: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, dim, generator=g, dtype=torch.float64) * scale
    s = s + (s.norm(dim=-1, keepdim=True) == 0).double()  # no exact zero rows
    v = squash(s)
    n_s, n_v = s.norm(dim=-1), v.norm(dim=-1)
    # length follows |s|^2 / (1 + |s|^2) < 1 ...
    torch.testing.assert_close(n_v, n_s**2 / (1 + n_s**2), atol=1e-9, rtol=1e-7)
    assert bool((n_v < 1).all())
    # ... and the direction is kept
    cos = (v * s).sum(-1) / (n_v * n_s)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-9, rtol=0)
    # monotone in |s|: scaling s up never shortens v
    assert bool((squash(s * 1.5).norm(dim=-1) >= n_v).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-8, 1.0, 1e4, 1e18])
def test_squash_finite_values_and_gradients(dtype: torch.dtype, scale: float) -> None:
    s = (torch.randn(3, 8, dtype=dtype) * scale).requires_grad_(True)
    v = squash(s)
    (grad,) = torch.autograd.grad(v.sum(), s)
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(grad).all())
    assert bool((v.norm(dim=-1) <= 1).all())
    if scale == 0.0:
        assert bool((v == 0).all())


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_squash_half_precision_computes_in_float32(amp_dtype: torch.dtype) -> None:
    # 300^2 overflows float16 (max 65504): computed naively in half this would be inf/NaN.
    s = torch.full((2, 16), 300.0).to(amp_dtype)
    v = squash(s)
    assert v.dtype == amp_dtype
    assert bool(torch.isfinite(v).all())
    torch.testing.assert_close(v.float(), squash_ref(s.double()).float(), atol=4e-3, rtol=1e-2)


def test_squash_under_autocast_returns_input_dtype() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(4, 8) @ torch.randn(8, 16)  # bf16 under autocast
        assert x.dtype == torch.bfloat16
        v = squash(x)
    assert v.dtype == torch.bfloat16
    torch.testing.assert_close(v.double(), squash_ref(x.double()), atol=2e-2, rtol=2e-2)


def test_squash_gradcheck() -> None:
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(squash, (s,))
    assert gradcheck(lambda t: squash(t, dim=0), (s,))


def test_squash_bad_input() -> None:
    with pytest.raises(TypeError, match="squash: s must be a real floating-point tensor"):
        squash(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="squash: s must be a real floating-point"):
        squash(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="squash: s must be a torch.Tensor"):
        squash([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"squash: dim must be in \[-2, 1\].*\(3, 4\), got 2"):
        squash(torch.ones(3, 4), dim=2)
    with pytest.raises(ValueError, match="squash: eps must be > 0"):
        squash(torch.ones(3), eps=0.0)
    with pytest.raises(
        ValueError, match=r"squash: s must have at least 1 dimension, got shape \(\)"
    ):
        squash(torch.tensor(1.0))


def test_squash_exported_from_top_level() -> None:
    assert torchcaps.squash is squash


# -- capsule_lengths ---------------------------------------------------------------------------
def test_lengths_values_and_zero_gradient() -> None:
    v = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    lengths = capsule_lengths(v)
    torch.testing.assert_close(lengths, torch.tensor([[5.0, 0.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(lengths.sum(), v)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad[0, 0], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_lengths_gradcheck() -> None:
    v = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(capsule_lengths, (v,))


def test_lengths_bad_input() -> None:
    with pytest.raises(TypeError, match="capsule_lengths: v must be a real floating-point"):
        capsule_lengths(torch.ones(2, 3, dtype=torch.int32))


# -- mask_capsules -----------------------------------------------------------------------------
def test_mask_keeps_target_or_longest() -> None:
    v = torch.randn(6, 5, 4)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    m = mask_capsules(v, target)
    for b in range(6):
        for k in range(5):
            expected = v[b, k] if k == target[b] else torch.zeros(4)
            torch.testing.assert_close(m[b, k], expected)
    longest = v.norm(dim=-1).argmax(dim=-1)
    torch.testing.assert_close(mask_capsules(v), mask_capsules(v, longest))


def test_mask_bad_input() -> None:
    v = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"target must have shape \(2,\).*got \(3,\)"):
        mask_capsules(v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\], got values in \[0, 5\]"):
        mask_capsules(v, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        mask_capsules(v, torch.tensor([-1, 1]))
    with pytest.raises(TypeError, match="target of class indices must be an integer tensor"):
        mask_capsules(v, torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"v must have shape \(B, K, D\) with K >= 1 capsules, got \(2, 5\)"
    ):
        mask_capsules(torch.randn(2, 5))


# -- reconstruction_loss -----------------------------------------------------------------------
def test_reconstruction_loss_is_weighted_per_image_sum() -> None:
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    y = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    per_image = ((x - y) ** 2).flatten(1).sum(1) * 0.0005
    torch.testing.assert_close(reconstruction_loss(x, y, reduction="none"), per_image)
    torch.testing.assert_close(reconstruction_loss(x, y), per_image.mean())
    torch.testing.assert_close(reconstruction_loss(x, y, reduction="sum"), per_image.sum())
    # the paper's weight equals 0.392 x the per-pixel mean for 28x28 images
    pixel_mean = ((x - y) ** 2).mean()
    assert math.isclose(float(reconstruction_loss(x, y)), 0.392 * float(pixel_mean), rel_tol=1e-9)


def test_reconstruction_loss_gradcheck() -> None:
    x = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 4, dtype=torch.float64)
    assert gradcheck(lambda a: reconstruction_loss(a, y, weight=0.3), (x,))


def test_reconstruction_loss_bad_input() -> None:
    with pytest.raises(
        ValueError, match=r"target must have the shape of reconstruction \(2, 4\), got \(2, 5\)"
    ):
        reconstruction_loss(torch.rand(2, 4), torch.rand(2, 5))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        reconstruction_loss(torch.rand(2, 4), torch.rand(2, 4), weight=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        reconstruction_loss(torch.rand(2, 4), torch.rand(2, 4), reduction="avg")
