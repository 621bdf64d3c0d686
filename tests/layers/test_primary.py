"""torchcaps.layers.primary: Conv2dCaps, including its two convolutions (conv_impl) and the auto rule.

The per-tap matmul convolution itself is tested against torch's in test_tap_matmul.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

import torchcaps.layers._tap_matmul
import torchcaps.layers.primary
from _strategies import (
    MODULE_DTYPES,
    RAISED,
    bad_tensors,
    check_call,
    finite,
    names,
    positive_shape,
    real_tensors,
)
from reference import squash_ref
from torchcaps import Conv2dCaps, exp_squash, squash
from torchcaps.layers._tap_matmul import MIN_CHANNELS, MIN_TAPS, tap_matmul_conv2d


def test_primary_caps_shape_and_params() -> None:
    layer = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)
    u = layer(torch.randn(2, 256, 20, 20))
    assert u.shape == (2, 32, 6, 6, 8)
    assert sum(p.numel() for p in layer.parameters()) == 256 * 256 * 81 + 256


def test_conv_caps_groups_channels_per_position() -> None:
    # Channel n*D + d at (h, w) is dimension d of capsule n at (h, w): not a plain view.
    layer = Conv2dCaps(3, 4, 2, kernel_size=3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y = F.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)  # (2, 8, 5, 6)
    expected = torch.empty(2, 4, 5, 6, 2, dtype=torch.float64)
    for n in range(4):
        for h in range(5):
            for w in range(6):
                expected[:, n, h, w] = squash_ref(y[:, n * 2 : n * 2 + 2, h, w])
    torch.testing.assert_close(layer(x), expected)


def test_conv_caps_accepts_capsule_grid() -> None:
    layer = Conv2dCaps(12, 5, 4, kernel_size=3, dtype=torch.float64)
    grid = torch.randn(2, 3, 7, 7, 4, dtype=torch.float64)  # N=3 capsules of D=4 -> 12 channels
    as_channels = grid.permute(0, 1, 4, 2, 3).reshape(2, 12, 7, 7)
    torch.testing.assert_close(layer(grid), layer(as_channels))
    assert layer(grid).shape == (2, 5, 5, 5, 4)
    # stacking: a Conv2dCaps grid feeds the next Conv2dCaps directly
    nxt = Conv2dCaps(20, 2, 3, kernel_size=3, dtype=torch.float64)
    assert nxt(layer(grid)).shape == (2, 2, 3, 3, 3)


def test_conv_caps_channels_last_same_result() -> None:
    layer = Conv2dCaps(8, 4, 4, kernel_size=3, stride=2)
    x = torch.randn(2, 8, 9, 9)
    out = layer.to(memory_format=torch.channels_last)(
        x.contiguous(memory_format=torch.channels_last)
    )
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-4)


def test_conv_caps_gradcheck() -> None:
    layer = Conv2dCaps(2, 2, 3, kernel_size=2, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(layer, (x,))


def test_conv_caps_bad_input() -> None:
    layer = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)
    with pytest.raises(
        ValueError,
        match=r"Conv2dCaps expected input of shape \(B, 256, H, W\), got \(2, 255, 20, 20\)",
    ):
        layer(torch.randn(2, 255, 20, 20))
    with pytest.raises(
        ValueError, match=r"N\*D == in_channels == 256, got input of shape \(2, 32, 6, 6, 7\)"
    ):
        layer(torch.randn(2, 32, 6, 6, 7))
    with pytest.raises(
        ValueError,
        match=r"feature map \(B, 256, H, W\) or a capsule grid.*got input of shape \(256, 20\)",
    ):
        layer(torch.randn(256, 20))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(1, 256, 5, 5))
    with pytest.raises(TypeError, match="Conv2dCaps: input must be a real floating-point tensor"):
        layer(torch.ones(1, 256, 20, 20, dtype=torch.uint8))


def test_conv_caps_bad_config() -> None:
    with pytest.raises(ValueError, match="Conv2dCaps: out_capsules must be >= 1, got 0"):
        Conv2dCaps(3, 0, 8, 3)
    with pytest.raises(TypeError, match="Conv2dCaps: capsule_dim must be an int"):
        Conv2dCaps(3, 2, 8.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"padding must be >= 0, got -1"):
        Conv2dCaps(3, 2, 8, 3, padding=-1)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        Conv2dCaps(3, 2, 8, (3, 3, 3))  # type: ignore[arg-type]


def test_conv_caps_factory_kwargs_and_repr() -> None:
    layer = Conv2dCaps(4, 2, 3, 3, device="meta", dtype=torch.float64)
    assert layer.conv.weight.device.type == "meta" and layer.conv.weight.dtype == torch.float64
    assert "out_capsules=2, capsule_dim=3" in repr(layer)


def test_conv_caps_bf16_autocast_forward() -> None:
    layer = Conv2dCaps(8, 4, 4, kernel_size=3, stride=2)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = layer(x)
    assert u.dtype == torch.bfloat16 and bool(torch.isfinite(u).all())
    torch.testing.assert_close(u.float(), layer(x), atol=3e-2, rtol=3e-2)


def test_dtype_mismatch_is_a_type_error_outside_autocast() -> None:
    layer = Conv2dCaps(3, 2, 4, kernel_size=3)
    with pytest.raises(
        TypeError,
        match="Conv2dCaps: input has dtype torch.float64 but the parameters have torch.float32",
    ):
        layer(torch.rand(1, 3, 5, 5, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast reconciles the dtypes
        assert layer(torch.rand(1, 3, 5, 5, dtype=torch.bfloat16)).shape == (1, 2, 3, 3, 4)


# -- conv_impl: torch's convolution or per-tap matmuls, same results ------------------------------
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


def test_matmul_under_autocast_computes_in_bfloat16_with_float32_sums() -> None:
    layer = Conv2dCaps(4, 3, 2, kernel_size=3, conv_impl="matmul")
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    conv = layer.conv
    s = tap_matmul_conv2d(x, conv.weight, conv.bias, (1, 1), (0, 0), torch.bfloat16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, squash(s.unflatten(1, (3, 2)).permute(0, 1, 3, 4, 2)))


def test_bad_conv_impl() -> None:
    with pytest.raises(
        ValueError, match=r"conv_impl must be one of 'auto', 'native', 'matmul', got 'gemm'"
    ):
        Conv2dCaps(4, 2, 2, kernel_size=3, conv_impl="gemm")  # type: ignore[arg-type]


def test_conv_impl_in_repr() -> None:
    assert "conv_impl='matmul'" in repr(Conv2dCaps(4, 2, 2, kernel_size=3, conv_impl="matmul"))
    assert "conv_impl" not in repr(Conv2dCaps(4, 2, 2, kernel_size=3))


# -- the auto rule -----------------------------------------------------------------------------
class _Spy:
    def __init__(self) -> None:
        self.calls = 0
        self.dtypes: list[torch.dtype | None] = []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.dtypes.append(args[5] if len(args) > 5 else kwargs.get("compute_dtype"))
        return tap_matmul_conv2d(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    s = _Spy()
    monkeypatch.setattr(
        torchcaps.layers.primary, "tap_matmul_conv2d", s
    )  # where forward looks it up
    return s


def _wide(dtype: torch.dtype = torch.float32, **kwargs) -> Conv2dCaps:
    return Conv2dCaps(
        MIN_CHANNELS, MIN_CHANNELS // 8, 8, kernel_size=9, stride=2, dtype=dtype, **kwargs
    )


def test_auto_uses_matmul_for_wide_float32_cpu_layers(spy: _Spy) -> None:
    assert MIN_TAPS == 81
    _wide()(torch.randn(1, MIN_CHANNELS, 11, 11))
    assert spy.calls == 1 and spy.dtypes == [torch.float32]


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_auto_under_bfloat16_autocast(
    spy: _Spy, monkeypatch: pytest.MonkeyPatch, bf16_instructions: bool
) -> None:
    monkeypatch.setattr(
        torchcaps.layers._tap_matmul, "cpu_has_bf16_instructions", lambda: bf16_instructions
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = _wide()(torch.randn(1, MIN_CHANNELS, 11, 11).bfloat16())
    assert spy.dtypes == [torch.bfloat16 if bf16_instructions else torch.float32]
    assert u.dtype == torch.float32


@pytest.mark.parametrize(
    "case",
    ["native", "float64", "narrow-in", "narrow-out", "small-kernel", "fp16-autocast", "jit-trace"],
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
    if case == "fp16-autocast":
        with torch.autocast("cpu", dtype=torch.float16):
            layer(x)
    elif case == "jit-trace":
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), layer(x), atol=1e-5, rtol=1e-4)
        spy.calls -= 1  # the eager call for the comparison takes the matmul route
    else:
        layer(x)
    assert spy.calls == 0


# -- fuzz ----------------------------------------------------------------------------------------
@given(st.data())
def test_fuzz_conv2d_caps(data: st.DataObject) -> None:
    ctor = ["in_channels", "out_capsules", "capsule_dim", "kernel_size", "stride", "padding"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "x", "x"]), label="broken")
    args: dict[str, Any] = {
        "in_channels": data.draw(st.integers(1, 6)),
        "out_capsules": data.draw(st.integers(1, 3)),
        "capsule_dim": data.draw(st.integers(1, 4)),
        "kernel_size": data.draw(st.one_of(st.integers(1, 3), positive_shape(2, 3))),
        "stride": data.draw(st.one_of(st.integers(1, 2), positive_shape(2, 2))),
        "padding": data.draw(
            st.one_of(st.integers(0, 1), st.tuples(st.integers(0, 1), st.integers(0, 1)))
        ),
    }
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    kind = ""
    if broken in ctor:
        minimum = 0 if broken == "padding" else 1
        options: list[Any] = [minimum - 1, -7, 1.5, 2.0, True, None, "3"]
        if broken in ("kernel_size", "stride", "padding"):
            options += [(1, 2, 3), (1,), (), (minimum - 1, 1), (1, 1.5), [1, "1"]]
        bad = data.draw(st.sampled_from(options), label="bad")
        args[broken], kind = bad, repr(bad)
    layer = check_call(
        "Conv2dCaps",
        lambda: Conv2dCaps(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if layer is RAISED:
        return
    kh, kw = layer.kernel_size
    ph, pw = layer.padding
    b = data.draw(st.integers(0, 2), label="B")
    h = data.draw(st.integers(max(kh - 2 * ph, 1), 6), label="H")
    w = data.draw(st.integers(max(kw - 2 * pw, 1), 6), label="W")
    c = layer.in_channels
    grid = data.draw(st.booleans(), label="grid")
    if grid and c > 1 and c % 2 == 0:
        shape: tuple[int, ...] = (b, c // 2, h, w, 2)
    else:
        shape = (b, c, h, w)
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    x: Any = data.draw(real_tensors(shape, mdtype, nonfinite=nonfinite), label="x")
    if broken == "x":
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            x, kind = data.draw(bad_tensors(shape))
        elif choice == 1:
            bad_shape = data.draw(
                st.sampled_from([(b, c + 1, h, w), (c, h, w), (b, c, h, w, 1, 1)])
            )
            x, kind = torch.rand(bad_shape, dtype=mdtype), f"shape {bad_shape}"
        elif choice == 2 and kh - 2 * ph - 1 >= 0:  # spatially smaller than the kernel
            x = torch.rand(b, c, kh - 2 * ph - 1, w, dtype=mdtype)
            kind = f"spatial {tuple(x.shape)} < kernel"
        elif choice == 2:
            x, kind = torch.rand(c, h, w, dtype=mdtype), "rank 3"
        else:  # a dtype other than the parameters'
            other = torch.float64 if mdtype == torch.float32 else torch.float32
            x = data.draw(real_tensors(shape, data.draw(st.sampled_from([other, torch.float16]))))
            kind = "dtype mismatch"
    out = check_call(
        "Conv2dCaps",
        lambda: layer(x),
        "x" if broken == "x" else None,
        kind,
        nonfinite="x" if nonfinite else None,
    )
    if out is RAISED:
        return
    ho, wo = layer.output_size(h, w)
    assert out.shape == (b, layer.out_capsules, ho, wo, layer.capsule_dim)
    assert out.dtype == mdtype
    if not nonfinite:
        assert finite(out)
        assert bool((torch.linalg.vector_norm(out.double(), dim=-1) <= 1 + 1e-6).all())


# -- former gaps found by fuzzing, kept as regression tests ---------------------------------------
# Zero spatial size is an edge case the strategies do not draw.
@pytest.mark.parametrize("shape", [(3, 5, 5), (1, 2, 5, 5, 2)], ids=["rank3", "grid"])
def test_gap_conv2d_caps_shape_message_names_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as info:
        Conv2dCaps(3, 2, 4, kernel_size=3)(torch.rand(shape))
    assert names(str(info.value), "x"), str(info.value)


def test_gap_dtype_mismatch_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="input|v"):
        Conv2dCaps(3, 2, 4, kernel_size=3)(torch.rand(1, 3, 5, 5, dtype=torch.float64))


def test_gap_conv2d_caps_zero_spatial_size() -> None:
    with pytest.raises(ValueError, match="input"):
        Conv2dCaps(1, 1, 2, kernel_size=1, padding=1)(torch.rand(1, 1, 0, 3))


# -- groups and squash ---------------------------------------------------------------------------
def test_depthwise_primary_capsules_of_efficient_capsnet() -> None:
    layer = Conv2dCaps(128, 16, 8, kernel_size=9, groups=128, squash=exp_squash)
    assert sum(p.numel() for p in layer.parameters()) == 128 * 81 + 128  # 10,496
    x = torch.randn(2, 128, 9, 9)
    u = layer(x)
    assert u.shape == (2, 16, 1, 1, 8)
    # channel c of the output sees only input channel c; capsule n holds channels 8n..8n+7
    conv = torch.nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, groups=128)
    expected = exp_squash(conv.view(2, 16, 8, 1, 1).permute(0, 1, 3, 4, 2), dim=-1)
    torch.testing.assert_close(u, expected)
    assert "groups=128" in layer.extra_repr() and "squash=exp_squash" in layer.extra_repr()


@pytest.mark.parametrize("conv_impl", ["auto", "native"])
def test_groups_match_a_grouped_convolution(conv_impl: str) -> None:
    layer = Conv2dCaps(8, 4, 3, kernel_size=3, stride=2, padding=1, groups=2, conv_impl=conv_impl)
    x = torch.randn(3, 8, 7, 7, dtype=torch.float32)
    y = torch.nn.functional.conv2d(
        x, layer.conv.weight, layer.conv.bias, stride=2, padding=1, groups=2
    )
    expected = squash(y.view(3, 4, 3, 4, 4).permute(0, 1, 3, 4, 2), dim=-1)
    torch.testing.assert_close(layer(x), expected)


def test_custom_squash_is_called_on_the_capsule_dimension() -> None:
    seen: list[int] = []

    def halve(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
        seen.append(s.shape[dim])
        return s / 2

    layer = Conv2dCaps(4, 3, 5, kernel_size=3, squash=halve)
    x = torch.randn(2, 4, 6, 6)
    raw = layer.conv(x).view(2, 3, 5, 4, 4).permute(0, 1, 3, 4, 2)
    torch.testing.assert_close(layer(x), raw / 2)
    assert seen == [5]


def test_bad_groups_and_squash() -> None:
    with pytest.raises(ValueError, match=r"Conv2dCaps: groups=3 must divide in_channels=8"):
        Conv2dCaps(8, 4, 3, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match=r"Conv2dCaps: groups must be >= 1, got 0"):
        Conv2dCaps(8, 4, 2, kernel_size=3, groups=0)
    with pytest.raises(TypeError, match=r"Conv2dCaps: groups must be an int"):
        Conv2dCaps(8, 4, 2, kernel_size=3, groups=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"conv_impl='matmul' needs groups=1, got groups=2"):
        Conv2dCaps(8, 4, 2, kernel_size=3, groups=2, conv_impl="matmul")
    with pytest.raises(TypeError, match=r"Conv2dCaps: squash must be a callable, got str"):
        Conv2dCaps(8, 4, 2, kernel_size=3, squash="exp")  # type: ignore[arg-type]
