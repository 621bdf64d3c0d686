"""torchcaps.layers._tap_matmul: the per-tap matmul convolution against torch's, and its auto rule.

Conv2dCaps(conv_impl=...), which uses it, is tested in test_primary.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torchcaps.layers._tap_matmul
from torchcaps.layers._tap_matmul import MIN_CHANNELS, auto_tap_matmul_dtype, tap_matmul_conv2d

CONFIGS = [
    # (B, C, O, H, W, k, stride, padding, bias)
    (2, 3, 4, 7, 7, (3, 3), (1, 1), (0, 0), True),
    (3, 5, 6, 11, 9, (3, 2), (2, 1), (1, 0), True),
    (1, 4, 2, 9, 10, (5, 5), (2, 3), (2, 1), False),
    (2, 2, 3, 6, 6, (1, 1), (1, 1), (0, 0), True),
    (2, 6, 4, 6, 8, (6, 8), (1, 1), (0, 0), True),  # kernel covers the whole input
]


def _inputs(
    config: tuple,
    dtype: torch.dtype = torch.float64,
    channels_last: bool = False,
    weight_channels_last: bool = False,
):
    b, c, o, h, w, k, _, _, bias = config
    x = torch.randn(b, c, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c, *k, dtype=dtype)
    if weight_channels_last:  # as model.to(memory_format=torch.channels_last) leaves it
        weight = weight.contiguous(memory_format=torch.channels_last)
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


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("compute", [torch.float64, torch.bfloat16])
def test_channels_last_weight_gets_its_gradient_in_its_layout(
    config: tuple, compute: torch.dtype
) -> None:
    # The tap matrices are read from the weight in place and the weight gradient is written in
    # the weight's layout, so autograd can store it in .grad without a copy.
    dtype = torch.float64 if compute == torch.float64 else torch.float32
    x, weight, bias = _inputs(config, dtype, channels_last=True, weight_channels_last=True)
    stride, padding = config[6], config[7]
    weight.requires_grad_()
    y = tap_matmul_conv2d(x.requires_grad_(), weight, bias, stride, padding, compute)
    g = torch.randn_like(y)
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), g)
    assert grad_w.is_contiguous(memory_format=torch.channels_last)
    # autograd's layout test: the same strides in every dimension of size > 1
    big = [d for d in range(4) if weight.shape[d] > 1]
    assert [grad_w.stride(d) for d in big] == [weight.stride(d) for d in big]
    expected_y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    expected = torch.autograd.grad(expected_y, (x, weight), g)
    tol = (
        {"atol": 1e-12, "rtol": 1e-10} if compute == torch.float64 else {"atol": 0.1, "rtol": 0.05}
    )
    torch.testing.assert_close(y, expected_y, **tol)
    torch.testing.assert_close(grad_x, expected[0], **tol)
    torch.testing.assert_close(grad_w, expected[1], **tol)


def test_gradients_only_for_what_requires_grad() -> None:
    x, weight, bias = _inputs(CONFIGS[0])
    weight.requires_grad_()
    tap_matmul_conv2d(x, weight, bias, (1, 1), (0, 0)).sum().backward()
    expected = torch.autograd.grad(F.conv2d(x, weight, bias).sum(), weight)[0]
    assert x.grad is None
    torch.testing.assert_close(weight.grad, expected, atol=1e-12, rtol=1e-10)


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


def test_auto_rule_excludes_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = torch.randn(MIN_CHANNELS, MIN_CHANNELS, 9, 9)
    assert auto_tap_matmul_dtype(torch.randn(1, MIN_CHANNELS, 9, 9), weight) == torch.float32
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(1, MIN_CHANNELS, 9, 9))
        assert auto_tap_matmul_dtype(fake, weight) is None


# -- bfloat16 products -----------------------------------------------------------------------
def _bf16_exact(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` rounded to bfloat16 and held in float64 (the products' exact inputs)."""
    return None if t is None else t.bfloat16().double()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("chunk_rows", [7, 10**9])
@pytest.mark.parametrize("weight_cl", [False, True], ids=["weight-nchw", "weight-nhwc"])
def test_bfloat16_products_sum_in_float32(
    monkeypatch: pytest.MonkeyPatch, config: tuple, chunk_rows: int, weight_cl: bool
) -> None:
    # Each GEMM accumulates in float32 and rounds its result once to bfloat16 (relative error
    # <= 2**-9); the results are summed in float32. So every error is within 2**-8 of the same
    # computation on absolute values (float32 sums in bfloat16 would exceed it: each of the
    # many roundings is relative to a running sum).
    # (a channels-last weight is cast to bfloat16 in its own layout, a contiguous one transposed)
    monkeypatch.setattr(torchcaps.layers._tap_matmul, "CHUNK_ROWS", chunk_rows)
    x, weight, bias = _inputs(
        config, torch.float32, channels_last=True, weight_channels_last=weight_cl
    )
    stride, padding = config[6], config[7]
    args = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = tap_matmul_conv2d(*args[:2], bias, stride, padding, torch.bfloat16)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, args, g)
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in got)

    xe, we, be = _bf16_exact(x.detach()), _bf16_exact(weight.detach()), _bf16_exact(bias)
    ge = _bf16_exact(g)
    inputs = [t.requires_grad_() for t in (xe, we, be) if t is not None]
    abs_inputs = [t.detach().abs().requires_grad_() for t in inputs]

    def conv(ts: list[torch.Tensor]) -> torch.Tensor:
        b = ts[2] if len(ts) > 2 else None
        return F.conv2d(ts[0], ts[1], b, stride=stride, padding=padding)

    exact_y = conv(inputs)
    exact = torch.autograd.grad(exact_y, inputs, ge)
    abs_y = conv(abs_inputs)
    bound = torch.autograd.grad(abs_y, abs_inputs, ge.abs())
    for name, a, e, m in zip(
        ("y", "x", "weight", "bias"), (y, *got), (exact_y, *exact), (abs_y, *bound)
    ):
        err = (a.double() - e).abs()
        assert bool((err <= 2**-8 * m + 1e-6).all()), name


def test_bfloat16_under_autocast_by_default() -> None:
    x, weight, bias = _inputs(CONFIGS[1], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tap_matmul_conv2d(x, weight, bias, (2, 1), (1, 0))
    assert y.dtype == torch.float32
    expected = tap_matmul_conv2d(x, weight, bias, (2, 1), (1, 0), torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    assert not torch.equal(y, tap_matmul_conv2d(x, weight, bias, (2, 1), (1, 0)))


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_auto_dtype_under_autocast(
    monkeypatch: pytest.MonkeyPatch, bf16_instructions: bool
) -> None:
    # Emulated bfloat16 (no AVX512-BF16/AMX) is slower than float32: auto keeps float32 there.
    monkeypatch.setattr(
        torchcaps.layers._tap_matmul, "cpu_has_bf16_instructions", lambda: bf16_instructions
    )
    weight = torch.randn(MIN_CHANNELS, MIN_CHANNELS, 9, 9)
    x = torch.randn(1, MIN_CHANNELS, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = auto_tap_matmul_dtype(x.bfloat16(), weight)
    assert got == (torch.bfloat16 if bf16_instructions else torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert auto_tap_matmul_dtype(x, weight) is None
    assert auto_tap_matmul_dtype(x.bfloat16(), weight) is None  # no autocast: mismatched dtypes


def test_cpu_has_bf16_instructions_reads_the_cpu_flags() -> None:
    from torchcaps.layers._tap_matmul import cpu_has_bf16_instructions

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        assert cpu_has_bf16_instructions() is False
        return
    assert cpu_has_bf16_instructions() == ("avx512_bf16" in flags or "amx_bf16" in flags)


# -- torch.compile: the opaque operator ---------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS[:3])
@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["weight", "weight-cl"])
@pytest.mark.parametrize(
    ("x_dtype", "compute"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "bf16"],
)
def test_the_compile_operator_passes_opcheck(
    config: tuple, weight_channels_last: bool, x_dtype: torch.dtype, compute: torch.dtype
) -> None:
    # schema, fake (meta) shapes, strides and dtypes, autograd registration, dynamic shapes;
    # bf16: the input as bf16 autocast leaves a convolution's output, the weight float32
    x, weight, bias = _inputs(config, torch.float32, True, weight_channels_last)
    x = x.to(x_dtype)
    stride, padding = list(config[6]), list(config[7])
    args = (x.requires_grad_(), weight.requires_grad_(), bias, stride, padding, compute)
    torch.library.opcheck(torch.ops.torchcaps.tap_conv2d.default, args)
    y = torch.ops.torchcaps.tap_conv2d(*args)
    assert y.dtype == torch.float32
    grad = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.torchcaps.tap_conv2d_backward.default,
        (grad, x.detach(), weight.detach(), stride, padding, compute, True, True),
    )
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), grad)
    assert grad_x.dtype == x_dtype and grad_w.dtype == torch.float32


@pytest.mark.parametrize("padding", [0, 2])
def test_compiled_wide_layer_runs_the_operator_and_matches_conv2d(padding: int) -> None:
    """Under torch.compile a wide float32 layer computes its convolution with
    torchcaps::tap_conv2d (no graph break), forward and backward as torch's convolution."""
    from torchcaps import Conv2dCaps

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Conv2dCaps(MIN_CHANNELS, 8, 32, 9, stride=2, padding=padding)
    x = torch.randn(2, MIN_CHANNELS, 11, 11).contiguous(memory_format=torch.channels_last)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    xr = x.clone().requires_grad_()
    y = compiled(xr)
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.torchcaps.tap_conv2d.default in targets, targets
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (xr, layer.conv.weight, layer.conv.bias), grad)

    native = Conv2dCaps(MIN_CHANNELS, 8, 32, 9, stride=2, padding=padding, conv_impl="native")
    native.load_state_dict(layer.state_dict())
    native = native.double()
    xd = x.double().requires_grad_()
    yd = native(xd)
    expected = torch.autograd.grad(yd, (xd, native.conv.weight, native.conv.bias), grad.double())
    torch.testing.assert_close(y.double(), yd, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16_instructions", [True, False, None], ids=["bf16", "no-bf16", "cpu"])
def test_compiled_layer_under_bf16_autocast_runs_the_operator_as_eager_mode_does(
    monkeypatch: pytest.MonkeyPatch, bf16_instructions: bool | None
) -> None:
    """Under bf16 autocast the compiled wide layer computes the same tap products as eager mode
    (bf16 products with float32 sums where the CPU has bf16 instructions, float32 where not),
    in one graph. ``None``: this machine's own answer, read while dynamo traces."""
    from torchcaps import Conv2dCaps

    if bf16_instructions is not None:
        monkeypatch.setattr(
            torchcaps.layers._tap_matmul, "cpu_has_bf16_instructions", lambda: bf16_instructions
        )
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Conv2dCaps(MIN_CHANNELS, 8, 32, 9, stride=2, padding=1)
    x = torch.randn(2, MIN_CHANNELS, 11, 11).contiguous(memory_format=torch.channels_last)
    x = x.bfloat16()  # as a bf16-autocast convolution before it leaves it
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    results = []
    for run in (compiled, layer):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(xr)
        grads = torch.autograd.grad(y, (xr, layer.conv.weight, layer.conv.bias), torch.ones_like(y))
        results.append((y, *grads))
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.torchcaps.tap_conv2d.default in targets, targets
    for got, expected in zip(*results, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_keeps_torchs_convolution() -> None:
    """Exported graphs (ONNX, other runtimes) hold aten convolutions, not the operator."""
    from torchcaps import Conv2dCaps

    layer = Conv2dCaps(MIN_CHANNELS, 8, 32, 9, stride=2).eval()
    program = torch.export.export(layer, (torch.randn(1, MIN_CHANNELS, 9, 9),))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("torchcaps" in t for t in targets), targets
    assert any("convolution" in t or "conv2d" in t for t in targets), targets


def test_inductor_compiles_around_the_operator() -> None:
    """The default backend (code generation around the opaque operator), forward and backward."""
    from torchcaps import Conv2dCaps

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Conv2dCaps(MIN_CHANNELS, 8, 32, 9, stride=2)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, MIN_CHANNELS, 11, 11)
    got_y = compiled(x.requires_grad_())
    grad = torch.randn_like(got_y)
    got = torch.autograd.grad(got_y, (x, layer.conv.weight), grad)
    expected_y = layer(x)
    expected = torch.autograd.grad(expected_y, (x, layer.conv.weight), grad)
    torch.testing.assert_close(got_y, expected_y, atol=1e-6, rtol=1e-5)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
