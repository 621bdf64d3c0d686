"""A 2-D convolution computed as matrix products over the kernel taps (CPU fast path).

For a kernel of ``KH x KW`` taps the convolution is the sum over taps ``(ky, kx)`` of a
``(B*H'*W', C) @ (C, O)`` product between the input pixels under that tap (a strided window
of the channels-last input) and the tap's weight slice; the input and weight gradients are
products of the same windows. In half precision the forward and the weight gradient group the
``KW`` taps of one kernel row into one product of depth ``KW * C`` (one copy of the row's
windows, one larger GEMM); in float32 each tap is its own product (:func:`_tap_group`). The
input gradient takes one product per tap in every dtype (:func:`_products_grad_input`). With
wide layers (the paper's PrimaryCaps: 256 -> 256 channels, 9x9, stride 2) these are large,
cache-friendly GEMMs, faster than oneDNN's direct convolution on the CPUs measured in
docs/performance.md.

The products run in a *compute* dtype, float32 or bfloat16: in bfloat16 each product
accumulates in float32 inside the GEMM and is rounded once to bfloat16, and the products are
summed in float32, so the result and the gradients are float32. A double backward
(``create_graph=True``) is computed through :func:`torch.nn.functional.conv2d` so higher-order
gradients stay exact.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import in_graph_capture, is_compiling_to_run, is_functorch_wrapped

__all__: list[str] = []

# The auto rule: both channel counts at least MIN_CHANNELS and at least MIN_TAPS kernel taps
# (where tap GEMMs beat oneDNN; measurements in docs/performance.md).
MIN_CHANNELS = 256
MIN_TAPS = 81

# Output rows (batch x output positions) per chunk: the paper's training batch (128 x 6 x 6)
# is one chunk; larger evaluation batches are split so that each tap's window stays in cache.
CHUNK_ROWS = 4608

_PLAIN = (Tensor, torch.nn.Parameter)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# the compute dtypes of the compile operator (its float32 weight: float32 results)
_OPERATOR_DTYPES = (torch.float32, *_LOW_PRECISION)


def _nhwc(x: Tensor, padding: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``x`` (B, C, H, W) as a contiguous, zero-padded (B, H + 2p, W + 2p, C) ``dtype`` tensor."""
    xn = x.permute(0, 2, 3, 1)
    if padding != (0, 0):
        xn = F.pad(xn, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    return _contiguous(xn, dtype)


def _taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight (O, C, KH, KW) as (KH, KW * C, O) tap matrices of ``dtype``.

    A view of a channels-last weight, or of its cast to ``dtype`` in the same layout (each
    tap's (C, O) matrix is then a transposed, BLAS-ready view; the cast is a plain elementwise
    copy, several times faster than one that also transposes); a contiguous copy otherwise.
    """
    cast = weight
    if weight.dtype != dtype and weight.is_contiguous(memory_format=torch.channels_last):
        cast = weight.to(dtype)  # keeps the channels-last strides
    if cast.dtype == dtype:
        view = _tap_matrices(cast)
        if view is not None:
            return view
    o, c, kh, kw = weight.shape
    return _contiguous(weight.permute(2, 3, 1, 0), dtype).view(kh, kw * c, o)


def _tap_matrices(t: Tensor) -> Tensor | None:
    """``t`` (O, C, KH, KW) viewed as (KH, KW * C, O), or ``None`` where its strides allow none."""
    o, c, kh, kw = t.shape
    try:
        return t.permute(2, 3, 1, 0).view(kh, kw * c, o)
    except RuntimeError:  # KW and C not adjacent in memory (e.g. a contiguous weight)
        return None


def _weight_grad(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A zero gradient (O, C, KH, KW) for ``weight`` and its (KH, KW * C, O) tap matrices (a view).

    In the weight's own layout when it is channels-last, so that autograd stores the gradient
    as it is instead of copying it into the parameter's layout; otherwise laid out as the taps.
    """
    o, c, kh, kw = weight.shape
    if weight.is_contiguous(memory_format=torch.channels_last):
        grad = torch.zeros_like(weight, dtype=dtype, memory_format=torch.channels_last)
        taps = _tap_matrices(grad)
        if taps is not None:
            return grad, taps
    taps = torch.zeros(kh, kw * c, o, dtype=dtype, device=weight.device)
    return taps.view(kh, kw, c, o).permute(3, 2, 0, 1), taps


def _contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of ``t`` in ``dtype``, cast and laid out in one pass."""
    if t.dtype == dtype:
        return t.contiguous()
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _products_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    compute: torch.dtype,
) -> Tensor:
    """The convolution (B, O, H', W'), a channels-last view, summed in the accumulation dtype."""
    b = x.shape[0]
    o, _, kh, kw = weight.shape
    acc = _accumulation_dtype(compute)
    xn = _nhwc(x, padding, compute)
    h_out = (xn.shape[1] - kh) // stride[0] + 1
    w_out = (xn.shape[2] - kw) // stride[1] + 1
    taps = _taps(weight, compute)
    group = _tap_group(compute, kw)
    out = torch.empty(b * h_out * w_out, o, dtype=acc, device=x.device)
    if bias is not None:
        out.copy_(bias.expand_as(out))
    else:
        out.zero_()
    scratch = _Scratch()
    for rows, xs in _batch_chunks(xn, h_out * w_out):
        out_rows = out[rows]
        for ky, taps_, cols in _tap_columns(xs, kh, kw, h_out, w_out, stride, scratch, group):
            _add_product(out_rows, cols, taps[ky, taps_], scratch)
    return out.view(b, h_out, w_out, o).permute(0, 3, 1, 2)


def _grad_rows(grad: Tensor) -> Tensor:
    """The output gradient (B, O, H', W') as (B * H' * W', O) rows."""
    b, o, h_out, w_out = grad.shape
    return grad.permute(0, 2, 3, 1).reshape(b * h_out * w_out, o)


def _products_grad_input(
    g: Tensor,
    out_hw: tuple[int, int],
    x_shape: tuple[int, ...],
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    compute: torch.dtype,
) -> Tensor:
    """The input gradient (B, C, H, W), a channels-last view, in the accumulation dtype.

    ``g``: the output gradient's rows (:func:`_grad_rows`) in ``compute``; ``out_hw``: (H', W').
    One (rows, O) @ (O, C) product per tap, added onto the tap's window (the taps' windows
    overlap, so one at a time). Unlike the other two passes the products are not grouped by
    kernel row in half precision: their depth is O either way, so a group would only widen the
    product, and its (rows, KW * C) result and float32 cast fall out of cache (measured on an
    AVX512-BF16 CPU, docs/performance.md).
    """
    b, c, h, w = x_shape
    _, _, kh, kw = weight.shape
    acc = _accumulation_dtype(compute)
    h_out, w_out = out_hw
    taps = _taps(weight, compute)
    gxn = torch.zeros(b, h + 2 * padding[0], w + 2 * padding[1], c, dtype=acc, device=g.device)
    scratch = _Scratch()
    for rows, gs in _batch_chunks(gxn, h_out * w_out):
        g_rows = g[rows]
        for ky, kx in itertools.product(range(kh), range(kw)):
            product = scratch.product(g_rows, taps[ky, _span(kx, 1, c)].t(), acc)
            _tap_window(gs, ky, kx, h_out, w_out, stride).add_(product.view(-1, h_out, w_out, c))
    gxn = gxn[:, padding[0] : padding[0] + h, padding[1] : padding[1] + w]
    return gxn.permute(0, 3, 1, 2)


def _products_grad_weight(
    g: Tensor,
    out_hw: tuple[int, int],
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    compute: torch.dtype,
) -> Tensor:
    """The weight gradient (O, C, KH, KW) in the accumulation dtype (layout: :func:`_weight_grad`).

    ``g``, ``out_hw``: as for :func:`_products_grad_input`; ``weight``: for its shape and layout.
    Each product is ``(O, rows) @ (rows, n * C)``, the gradient's rows transposed once per chunk
    times the windows as they are copied: faster than ``cols.t() @ g`` (a GEMM reading its
    first factor transposed), and its (O, n * C) result lands on the rows of a channels-last
    gradient's (O, C) tap slices instead of across them.
    """
    kh, kw = weight.shape[2:]
    acc = _accumulation_dtype(compute)
    h_out, w_out = out_hw
    group = _tap_group(compute, kw)
    xn = _nhwc(x, padding, compute)
    grad_w, gtaps = _weight_grad(weight, acc)
    scratch = _Scratch()
    for rows, xs in _batch_chunks(xn, h_out * w_out):
        g_t = g[rows].t().contiguous()
        for ky, taps_, cols in _tap_columns(xs, kh, kw, h_out, w_out, stride, scratch, group):
            _add_product(gtaps[ky, taps_].t(), g_t, cols, scratch)
    return grad_w


class _TapMatmulConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        compute: torch.dtype,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.stride, ctx.padding, ctx.compute = stride, padding, compute
        return _products_forward(x, weight, bias, stride, padding, compute)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        stride, padding, compute = ctx.stride, ctx.padding, ctx.compute
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None, None, None)
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the native convolution instead, so that the
            # returned gradients carry their own graph (double backward, gradient penalties).
            acc = grad.dtype
            inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            with torch.enable_grad():
                b_acc = bias.to(acc) if bias is not None else None
                y = F.conv2d(x.to(acc), weight.to(acc), b_acc, stride=stride, padding=padding)
                grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return tuple(next(grads) if need else None for need in (need_x, need_w, need_b)) + (
                nones
            )
        grad_x = grad_w = grad_b = None
        rows, out_hw = _grad_rows(grad), (grad.shape[2], grad.shape[3])
        g = rows.to(compute)
        if need_x:
            grad_x = _products_grad_input(g, out_hw, x.shape, weight, stride, padding, compute)
        if need_w:
            grad_w = _products_grad_weight(g, out_hw, x, weight, stride, padding, compute)
        if need_b:
            grad_b = rows.to(_accumulation_dtype(compute)).sum(0)
        return grad_x, grad_w, grad_b, *nones


# Under torch.compile (a float32 weight) the products run as one opaque operator each way:
# dynamo cannot trace the loops of the autograd.Function above, and inductor has nothing to fuse
# inside them. Not under export, whose graphs keep torch's convolution. ``compute`` is the
# products' dtype (float32, or bfloat16 / float16 with float32 sums, as for the function
# above); the result and the weight gradient are float32, the input gradient has x's dtype.
@torch.library.custom_op("torchcaps::tap_conv2d", mutates_args=())
def _tap_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    compute: torch.dtype,
) -> Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _products_forward(x, weight, bias, _pair(stride), _pair(padding), compute)


@_tap_conv2d_op.register_fake
def _tap_conv2d_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    compute: torch.dtype,
) -> Tensor:
    o, _, kh, kw = weight.shape
    h_out = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    acc = _accumulation_dtype(compute)
    return x.new_empty(x.shape[0], h_out, w_out, o, dtype=acc).permute(0, 3, 1, 2)


@torch.library.custom_op("torchcaps::tap_conv2d_backward", mutates_args=())
def _tap_conv2d_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    compute: torch.dtype,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor]:
    st, pad = _pair(stride), _pair(padding)
    g, out_hw = _grad_rows(grad).to(compute), (grad.shape[2], grad.shape[3])
    grad_x = grad_w = x.new_empty(0)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if need_x:
            grad_x = _products_grad_input(g, out_hw, x.shape, weight, st, pad, compute)
            if pad != (0, 0) or grad_x.dtype != x.dtype:  # the layout and dtype of the fake
                b, c, h, w = x.shape
                grad_x = x.new_empty(b, h, w, c).permute(0, 3, 1, 2).copy_(grad_x)
        if need_w:
            grad_w = _products_grad_weight(g, out_hw, x, weight, st, pad, compute)
    return grad_x, grad_w


@_tap_conv2d_backward_op.register_fake
def _tap_conv2d_backward_fake(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    compute: torch.dtype,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    acc = _accumulation_dtype(compute)
    grad_x = x.new_empty(b, h, w, c).permute(0, 3, 1, 2) if need_x else x.new_empty(0)
    grad_w = _weight_grad(weight, acc)[0] if need_w else x.new_empty(0)
    return grad_x, grad_w


def _tap_conv2d_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, stride, padding, compute = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding, ctx.compute, ctx.has_bias = stride, padding, compute, bias is not None


def _tap_conv2d_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x, grad_w = _tap_conv2d_backward_op(
        grad, x, weight, ctx.stride, ctx.padding, ctx.compute, need_x, need_w
    )
    grad_b = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    return grad_x if need_x else None, grad_w if need_w else None, grad_b, None, None, None


_tap_conv2d_op.register_autograd(_tap_conv2d_backward, setup_context=_tap_conv2d_setup)


def _pair(v: list[int] | tuple[int, ...]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _accumulation_dtype(compute: torch.dtype) -> torch.dtype:
    """Where products of ``compute`` dtype are summed: float32 for half precision."""
    return torch.float32 if compute in _LOW_PRECISION else compute


class _Scratch:
    """Buffers reused across the kernel rows of one pass.

    A fresh large tensor for every row would pay its page faults every time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor:
        """A (B, ...) buffer of ``shape`` and ``dtype``; a view of an earlier, larger one."""
        numel = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, device=like.device)
        return buf[:numel].view(shape)

    def product(self, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
        """``a @ b`` in a reused buffer, cast to ``dtype`` (in a second one) if it differs."""
        p = torch.mm(a, b, out=self.buffer("product", (a.shape[0], b.shape[1]), a, a.dtype))
        if dtype == p.dtype:
            return p
        return self.buffer("cast", p.shape, p, dtype).copy_(p)


def _add_product(out: Tensor, a: Tensor, b: Tensor, scratch: _Scratch) -> None:
    """``out += a @ b``, in place; ``out`` may have a wider dtype than ``a`` and ``b``."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += scratch.product(a, b, out.dtype)


def _batch_chunks(xn: Tensor, positions: int) -> Iterator[tuple[slice, Tensor]]:
    """Split ``xn`` (B, ...) into batch chunks of about :data:`CHUNK_ROWS` output rows.

    Yields ``(rows, chunk)``: the chunk's rows of the (B * positions, O) output and its slice
    of ``xn``. Chunks keep each tap's window and the output rows in cache at large batches.
    """
    per_chunk = max(1, CHUNK_ROWS // positions)
    for start in range(0, xn.shape[0], per_chunk):
        stop = min(start + per_chunk, xn.shape[0])
        yield slice(start * positions, stop * positions), xn[start:stop]


def _tap_group(compute: torch.dtype, kw: int) -> int:
    """Taps of a kernel row per product: all ``kw`` in half precision, one in float32.

    For the forward and the weight gradient (the input gradient's are one per tap). In
    bfloat16 one product of depth ``kw * C`` per row beat one per tap (measured on an
    AVX512-BF16 CPU, docs/performance.md); in float32 the per-tap products were the ones
    measured faster than oneDNN on the Xeon the rule was tuned on, and row groups were not.
    """
    return kw if compute in _LOW_PRECISION else 1


def _span(kx0: int, n: int, c: int) -> slice:
    """The rows of a (KW * C, O) row of taps that hold taps ``kx0 .. kx0 + n - 1``."""
    return slice(kx0 * c, (kx0 + n) * c)


def _tap_columns(
    xn: Tensor,
    kh: int,
    kw: int,
    h_out: int,
    w_out: int,
    stride: tuple[int, int],
    scratch: _Scratch,
    group: int,
) -> Iterator[tuple[int, slice, Tensor]]:
    """Yield ``(ky, span, cols)`` for each group of ``group`` neighbouring taps of a row.

    ``cols`` is the (B * H' * W', n * C) matrix of the group's windows side by side and ``span``
    the group's rows of the (KW * C, O) tap matrix of row ``ky``. ``xn`` is (B, H, W, C) with
    contiguous rows. Neighbouring taps' windows overlap (they share pixels), so each group is
    copied into a buffer reused for every group.
    """
    sb, sh, sw, sc = xn.stride()
    b, c = xn.shape[0], xn.shape[3]
    for ky, kx0 in itertools.product(range(kh), range(0, kw, group)):
        n = min(group, kw - kx0)
        size = (b, h_out, w_out, n, c)
        strides = (sb, sh * stride[0], sw * stride[1], sw, sc)
        cols = scratch.buffer("cols", size, xn, xn.dtype)
        cols.copy_(xn.as_strided(size, strides, xn.storage_offset() + ky * sh + kx0 * sw))
        yield ky, _span(kx0, n, c), cols.view(b * h_out * w_out, n * c)


def _tap_window(
    xn: Tensor, ky: int, kx: int, h_out: int, w_out: int, stride: tuple[int, int]
) -> Tensor:
    """The (B, H', W', C) window of ``xn`` (B, H, W, C) under tap ``(ky, kx)``, a view."""
    span_h = stride[0] * (h_out - 1) + 1
    span_w = stride[1] * (w_out - 1) + 1
    return xn[:, ky : ky + span_h : stride[0], kx : kx + span_w : stride[1], :]


def tap_matmul_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group) as tap GEMMs.

    ``compute_dtype``: the dtype of the matrix products. ``None``: the CPU autocast dtype
    where autocast is on for ``x``'s device (bfloat16 or float16), the weight's dtype
    otherwise. The result has channels-last strides; under autocast it is float32 when the
    products run in half precision (their sums are float32, like autocast's float32 ops),
    outside autocast it has the weight's dtype.
    """
    device = x.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    if (
        is_compiling_to_run()
        and weight.dtype == torch.float32
        and compute_dtype in _OPERATOR_DTYPES
    ):
        return _tap_conv2d_op(x, weight, bias, list(stride), list(padding), compute_dtype)
    if not autocast:
        return _TapMatmulConv2d.apply(x, weight, bias, stride, padding, compute_dtype).to(
            weight.dtype
        )
    with torch.autocast(device_type=device, enabled=False):
        return _TapMatmulConv2d.apply(x, weight, bias, stride, padding, compute_dtype)


@torch.compiler.assume_constant_result  # under torch.compile: called, not traced
def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16 on x86).

    Read from ``/proc/cpuinfo`` (Linux) once; ``False`` where it cannot be read. Without them
    bfloat16 matmuls are emulated and slower than float32 (docs/performance.md).
    """
    return _cpuinfo_has_bf16()


@functools.cache
def _cpuinfo_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def wide_enough(weight: Tensor) -> bool:
    """Whether the auto rule computes a convolution of this weight (O, C, KH, KW) as tap products.

    At least :data:`MIN_CHANNELS` channels each way and :data:`MIN_TAPS` kernel taps.
    """
    o, c, kh, kw = weight.shape
    return c >= MIN_CHANNELS and o >= MIN_CHANNELS and kh * kw >= MIN_TAPS


def auto_tap_matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The compute dtype ``conv_impl="auto"`` runs :func:`tap_matmul_conv2d` in, or ``None``.

    ``None`` (torch's convolution) except for a float32 weight of a wide layer (see
    :data:`MIN_CHANNELS`, :data:`MIN_TAPS`) on CPU, with plain eager tensors (not under
    tracing, export or functorch transforms) or under :func:`torch.compile` (not export), where
    the products run as the opaque operator ``torchcaps::tap_conv2d``. Outside autocast:
    float32, for a float32 input. Under CPU bfloat16 autocast: bfloat16 where the CPU has bf16
    instructions, float32 where bf16 would be emulated (slower than float32).
    """
    if is_compiling_to_run():
        plain = True  # dynamo traces with fake tensors; the operator runs on real ones
    elif in_graph_capture():
        return None
    else:
        plain = (
            type(x) in _PLAIN  # not a FakeTensor or another tensor subclass
            and type(weight) in _PLAIN
            and x.numel() > 0
            and not is_functorch_wrapped(x)
            and not is_functorch_wrapped(weight)
        )
    eligible = x.device.type == "cpu" and weight.dtype == torch.float32 and wide_enough(weight)
    if not (plain and eligible):
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (
        torch.float32,
        torch.bfloat16,
    ):
        return None
    return torch.bfloat16 if cpu_has_bf16_instructions() else torch.float32
