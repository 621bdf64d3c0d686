"""Conv2dCaps(conv_impl=...): the per-tap matmul convolution against torch's, and the auto rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torchcaps.layers._tap_matmul
import torchcaps.layers
from torchcaps import Conv2dCaps
from torchcaps.layers._tap_matmul import MIN_CHANNELS, MIN_TAPS, auto_prefers_tap_matmul, tap_matmul_conv2d

CONFIGS = [
    # (B, C, O, H, W, k, stride, padding, bias)
    (2, 3, 4, 7, 7, (3, 3), (1, 1), (0, 0), True),
    (3, 5, 6, 11, 9, (3, 2), (2, 1), (1, 0), True),
    (1, 4, 2, 9, 10, (5, 5), (2, 3), (2, 1), False),
    (2, 2, 3, 6, 6, (1, 1), (1, 1), (0, 0), True),
    (2, 6, 4, 6, 8, (6, 8), (1, 1), (0, 0), True),  # kernel covers the whole input
]


def _inputs(config: tuple, dtype: torch.dtype = torch.float64, channels_last: bool = False):
    b, c, o, h, w, k, _, _, bias = config
    x = torch.randn(b, c, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c, *k, dtype=dtype)
    return x, weight, (torch.randn(o, dtype=dtype) if bias else None)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_conv2d_in_float64(config: tuple, channels_last: bool) -> None:
    x, weight, bias = _inputs(config, channels_last=channels_last)
    stride, padding = config[6], config[7]
    expected = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    got = tap_matmul_conv2d(x, weight, bias, stride, padding)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("config", CONFIGS)
def test_gradcheck(config: tuple) -> None:
    x, weight, bias = _inputs(config)
    stride, padding = config[6], config[7]
    args = [t.requires_grad_() for t in (x, weight, bias) if t is not None]

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        b = ts[2] if bias is not None else None
        return tap_matmul_conv2d(ts[0], ts[1], b, stride, padding)

    assert gradcheck(fn, tuple(args))


def test_double_backward_is_exact() -> None:
    # create_graph=True takes the native route inside backward, so second derivatives exist.
    x, weight, bias = _inputs((1, 2, 2, 5, 4, (3, 2), (2, 1), (1, 0), True))
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return tap_matmul_conv2d(x, w, b, (2, 1), (1, 0))

    assert gradgradcheck(fn, args)


def test_gradients_only_for_what_requires_grad() -> None:
    x, weight, bias = _inputs(CONFIGS[0])
    weight.requires_grad_()
    tap_matmul_conv2d(x, weight, bias, (1, 1), (0, 0)).sum().backward()
    expected = torch.autograd.grad(F.conv2d(x, weight, bias).sum(), weight)[0]
    assert x.grad is None
    torch.testing.assert_close(weight.grad, expected, atol=1e-12, rtol=1e-10)


def _layer_pair(*args: Any, **kwargs: Any) -> tuple[Conv2dCaps, Conv2dCaps]:
    """``Conv2dCaps(*args, **kwargs)`` with conv_impl "native" and "matmul", same weights."""
    native = Conv2dCaps(*args, conv_impl="native", **kwargs)
    matmul = Conv2dCaps(*args, conv_impl="matmul", **kwargs)
    matmul.load_state_dict(native.state_dict())
    return native, matmul


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 5),
    o=st.integers(1, 5),
    size=st.integers(1, 9),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_layer_impls_agree(
    b: int, c: int, o: int, size: int, k: int, stride: int, padding: int, seed: int
) -> None:
    if size + 2 * padding < k:
        return  # no output position; both implementations reject it with the same ShapeError
    torch.manual_seed(seed)
    native, matmul = _layer_pair(
        c, o, 2, kernel_size=k, stride=stride, padding=padding, dtype=torch.float64
    )
    x = torch.randn(b, c, size, size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = native(x1), matmul(x2)
    torch.testing.assert_close(y2, y1, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=1e-10)
    for p1, p2 in zip(native.parameters(), matmul.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-12, rtol=1e-10)


def test_paper_primary_caps_float32_agrees() -> None:
    native, matmul = _layer_pair(256, 32, 8, kernel_size=9, stride=2)
    x = torch.randn(2, 256, 20, 20).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(matmul(x), native(x), atol=1e-5, rtol=1e-4)


def test_matmul_under_autocast_computes_in_the_weight_dtype() -> None:
    layer = Conv2dCaps(4, 3, 2, kernel_size=3, conv_impl="matmul")
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    expected = Conv2dCaps(4, 3, 2, kernel_size=3, conv_impl="native")
    expected.load_state_dict(layer.state_dict())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected(x.bfloat16().float()), atol=1e-5, rtol=1e-4)


# -- the auto rule -----------------------------------------------------------------------------
class _Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return tap_matmul_conv2d(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    s = _Spy()
    monkeypatch.setattr(torchcaps.layers, "tap_matmul_conv2d", s)
    return s


def _wide(dtype: torch.dtype = torch.float32, **kwargs) -> Conv2dCaps:
    return Conv2dCaps(
        MIN_CHANNELS, MIN_CHANNELS // 8, 8, kernel_size=9, stride=2, dtype=dtype, **kwargs
    )


def test_auto_uses_matmul_for_wide_float32_cpu_layers(spy: _Spy) -> None:
    assert MIN_TAPS == 81
    _wide()(torch.randn(1, MIN_CHANNELS, 11, 11))
    assert spy.calls == 1


@pytest.mark.parametrize(
    "case",
    ["native", "float64", "narrow-in", "narrow-out", "small-kernel", "autocast", "jit-trace"],
)
def test_auto_falls_back_to_native(spy: _Spy, case: str) -> None:
    c = MIN_CHANNELS
    x = torch.randn(1, c, 11, 11)
    if case == "native":
        layer = _wide(conv_impl="native")
    elif case == "float64":
        layer, x = _wide(torch.float64), x.double()
    elif case == "narrow-in":
        layer, x = Conv2dCaps(c - 1, c // 8, 8, kernel_size=9), x[:, 1:]
    elif case == "narrow-out":
        layer = Conv2dCaps(c, c // 8 - 1, 8, kernel_size=9)
    elif case == "small-kernel":
        layer = Conv2dCaps(c, c // 8, 8, kernel_size=(9, 8))
    else:
        layer = _wide()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    elif case == "jit-trace":
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), layer(x), atol=1e-5, rtol=1e-4)
        spy.calls -= 1  # the eager call for the comparison takes the matmul route
    else:
        layer(x)
    assert spy.calls == 0


def test_auto_rule_excludes_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = torch.randn(MIN_CHANNELS, MIN_CHANNELS, 9, 9)
    assert auto_prefers_tap_matmul(torch.randn(1, MIN_CHANNELS, 9, 9), weight)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(1, MIN_CHANNELS, 9, 9))
        assert not auto_prefers_tap_matmul(fake, weight)


def test_bad_conv_impl() -> None:
    with pytest.raises(
        ValueError, match=r"conv_impl must be one of 'auto', 'native', 'matmul', got 'gemm'"
    ):
        Conv2dCaps(4, 2, 2, kernel_size=3, conv_impl="gemm")  # type: ignore[arg-type]


def test_conv_impl_in_repr() -> None:
    assert "conv_impl='matmul'" in repr(Conv2dCaps(4, 2, 2, kernel_size=3, conv_impl="matmul"))
    assert "conv_impl" not in repr(Conv2dCaps(4, 2, 2, kernel_size=3))


@pytest.mark.parametrize("chunk_rows", [1, 30, 10**9])
def test_batch_chunks_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    # 7 images of 3x5 output positions: chunks of 1, 2 (+ a remainder of 1) and 7 images.
    monkeypatch.setattr(torchcaps.layers._tap_matmul, "CHUNK_ROWS", chunk_rows)
    x, weight, bias = _inputs((7, 3, 4, 7, 11, (3, 3), (2, 2), (0, 0), True))
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    y = tap_matmul_conv2d(*args, (2, 2), (0, 0))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, args, g)
    expected_y = F.conv2d(*args, stride=2)
    expected = torch.autograd.grad(expected_y, args, g)
    torch.testing.assert_close(y, expected_y, atol=1e-12, rtol=1e-10)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
