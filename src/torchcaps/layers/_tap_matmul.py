"""A 2-D convolution computed as one matrix product per kernel offset (CPU fast path).

For a kernel of ``KH x KW`` taps the convolution is the sum over taps ``(ky, kx)`` of a
``(B*H'*W', C) @ (C, O)`` product between the input pixels under that tap (a strided window
of the channels-last input) and the tap's weight slice. With wide layers (the paper's
PrimaryCaps: 256 -> 256 channels, 9x9, stride 2) each product is a large, cache-friendly GEMM,
and on CPUs the forward, input-gradient and weight-gradient passes all run faster than
oneDNN's direct convolution (docs/performance.md). The backward pass uses the same
per-tap products; a double backward (``create_graph=True``) is computed through
:func:`torch.nn.functional.conv2d` so higher-order gradients stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import in_graph_capture, is_functorch_wrapped

__all__: list[str] = []

# The auto rule: both channel counts at least MIN_CHANNELS and at least MIN_TAPS kernel taps
# (where per-tap GEMMs beat oneDNN; measurements in docs/performance.md).
MIN_CHANNELS = 256
MIN_TAPS = 81

# Output rows (batch x output positions) per chunk: the paper's training batch (128 x 6 x 6)
# is one chunk; larger evaluation batches are split so that each tap's window stays in cache.
CHUNK_ROWS = 4608

_PLAIN = (Tensor, torch.nn.Parameter)


def _nhwc(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """``x`` (B, C, H, W) as a contiguous, zero-padded (B, H + 2p, W + 2p, C) tensor."""
    xn = x.permute(0, 2, 3, 1)
    if padding != (0, 0):
        xn = F.pad(xn, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    return xn.contiguous()


class _TapMatmulConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> Tensor:
        b, c = x.shape[:2]
        o, _, kh, kw = weight.shape
        xn = _nhwc(x, padding)
        h_out = (xn.shape[1] - kh) // stride[0] + 1
        w_out = (xn.shape[2] - kw) // stride[1] + 1
        taps = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, C, O)
        out = torch.empty(b * h_out * w_out, o, dtype=x.dtype, device=x.device)
        if bias is not None:
            out.copy_(bias.expand_as(out))
        else:
            out.zero_()
        for rows, xs in _batch_chunks(xn, h_out * w_out):
            out_rows = out[rows]
            for ky, kx, window in _windows(xs, kh, kw, h_out, w_out, stride):
                out_rows.addmm_(window.reshape(-1, c), taps[ky, kx])
        ctx.save_for_backward(x, weight, bias)
        ctx.stride, ctx.padding = stride, padding
        return out.view(b, h_out, w_out, o).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the native convolution instead, so that the
            # returned gradients carry their own graph (double backward, gradient penalties).
            inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            with torch.enable_grad():
                y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
                grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return tuple(next(grads) if need else None for need in (need_x, need_w, need_b)) + (
                None,
                None,
            )
        b, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        h_out, w_out = grad.shape[2], grad.shape[3]
        g = grad.permute(0, 2, 3, 1).reshape(b * h_out * w_out, o)
        grad_x = grad_w = grad_b = None
        if need_x:
            taps = weight.permute(2, 3, 1, 0).contiguous()
            gxn = torch.zeros(
                b, h + 2 * padding[0], w + 2 * padding[1], c, dtype=grad.dtype, device=grad.device
            )
            for rows, gs in _batch_chunks(gxn, h_out * w_out):
                g_rows = g[rows]
                for ky, kx, window in _windows(gs, kh, kw, h_out, w_out, stride):
                    window += torch.mm(g_rows, taps[ky, kx].t()).view(-1, h_out, w_out, c)
            gxn = gxn[:, padding[0] : padding[0] + h, padding[1] : padding[1] + w]
            grad_x = gxn.permute(0, 3, 1, 2)
        if need_w:
            xn = _nhwc(x, padding)
            gtaps = torch.zeros(kh, kw, c, o, dtype=grad.dtype, device=grad.device)
            for rows, xs in _batch_chunks(xn, h_out * w_out):
                g_rows = g[rows]
                for ky, kx, window in _windows(xs, kh, kw, h_out, w_out, stride):
                    gtaps[ky, kx].addmm_(window.reshape(-1, c).t(), g_rows)
            grad_w = gtaps.permute(3, 2, 0, 1)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


def _batch_chunks(xn: Tensor, positions: int) -> Iterator[tuple[slice, Tensor]]:
    """Split ``xn`` (B, ...) into batch chunks of about :data:`CHUNK_ROWS` output rows.

    Yields ``(rows, chunk)``: the chunk's rows of the (B * positions, O) output and its slice
    of ``xn``. Chunks keep each tap's window and the output rows in cache at large batches.
    """
    per_chunk = max(1, CHUNK_ROWS // positions)
    for start in range(0, xn.shape[0], per_chunk):
        stop = min(start + per_chunk, xn.shape[0])
        yield slice(start * positions, stop * positions), xn[start:stop]


def _windows(
    xn: Tensor, kh: int, kw: int, h_out: int, w_out: int, stride: tuple[int, int]
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(ky, kx, view)``: the (B, H', W', C) window of ``xn`` under each kernel tap."""
    span_h = stride[0] * (h_out - 1) + 1
    span_w = stride[1] * (w_out - 1) + 1
    for ky in range(kh):
        for kx in range(kw):
            yield ky, kx, xn[:, ky : ky + span_h : stride[0], kx : kx + span_w : stride[1], :]


def tap_matmul_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group) as per-tap GEMMs.

    Runs in the dtype of ``x`` and ``weight`` with autocast disabled. The result has
    channels-last strides. Under autocast, ``x`` is cast to the weight's dtype.
    """
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if x.device.type in ("cpu", "cuda"):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _TapMatmulConv2d.apply(x, weight, bias, stride, padding)
    return _TapMatmulConv2d.apply(x, weight, bias, stride, padding)


def auto_prefers_tap_matmul(x: Tensor, weight: Tensor) -> bool:
    """Whether ``conv_impl="auto"`` computes this convolution with :func:`tap_matmul_conv2d`.

    Only plain eager float32 CPU tensors outside autocast, tracing, compilation, export and
    functorch transforms, for wide layers (see :data:`MIN_CHANNELS`, :data:`MIN_TAPS`).
    """
    if in_graph_capture():
        return False
    o, c, kh, kw = weight.shape
    return (
        type(x) in _PLAIN  # not a FakeTensor or another tensor subclass
        and type(weight) in _PLAIN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and c >= MIN_CHANNELS
        and o >= MIN_CHANNELS
        and kh * kw >= MIN_TAPS
        and not torch.is_autocast_enabled("cpu")
        and not is_functorch_wrapped(x)
        and not is_functorch_wrapped(weight)
    )
