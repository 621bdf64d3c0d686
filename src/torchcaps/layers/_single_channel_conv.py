"""A convolution of a one-channel image under ``torch.compile`` with CPU autocast, as an operator.

With a single input channel, NCHW and channels-last strides both describe the input and the
weight. Eager mode casts them under autocast keeping their strides, and oneDNN runs the
convolution channels-last (the paper's first layer, 1 -> 256 channels, 9x9). Inductor lays
out its cast buffers as NCHW instead, so the compiled graph runs the convolution in NCHW and
changes the layout after it: 129 ms of self time per 1,000 MNIST images against 19.5 ms in
eager mode, on an Intel Xeon with AMX (docs/performance.md). Under compile, with CPU
half-precision autocast and a one-channel input, :func:`conv2d` therefore calls the opaque
operator ``torchcaps::single_channel_conv2d``, which runs the eager convolution, and its backward
``torchcaps::single_channel_conv2d_backward``. Elsewhere it is the module's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import is_compiling_to_run
from torchcaps.layers._common import output_size

__all__: list[str] = []

_HALF = (torch.bfloat16, torch.float16)


def conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``, as the operator where the compiled graph would run it in NCHW (see above)."""
    if not _as_operator(conv, x):
        return conv(x)
    dtype = torch.get_autocast_dtype("cpu")
    args = (list(conv.stride), list(conv.padding), conv.groups, dtype)
    return _forward_op(x, conv.weight, conv.bias, *args)


def _as_operator(conv: nn.Conv2d, x: Tensor) -> bool:
    return (
        is_compiling_to_run()
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") in _HALF
        and conv.in_channels == 1
        and x.dim() == 4
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.dilation == (1, 1)
        and conv.weight.dtype == torch.float32
        and x.dtype in (torch.float32, *_HALF)
    )


# The result in ``dtype``, channels-last, as eager autocast computes it.
@torch.library.custom_op("torchcaps::single_channel_conv2d", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    groups: int,
    dtype: torch.dtype,
) -> Tensor:
    with torch.autocast(device_type="cpu", enabled=False):
        b = bias.to(dtype) if bias is not None else None
        y = F.conv2d(x.to(dtype), weight.to(dtype), b, stride, padding, 1, groups)
    return y.contiguous(memory_format=torch.channels_last)


@_forward_op.register_fake
def _forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    groups: int,
    dtype: torch.dtype,
) -> Tensor:
    kernel = (weight.shape[2], weight.shape[3])
    h, w = output_size(
        x.shape[2], x.shape[3], kernel, (stride[0], stride[1]), (padding[0], padding[1])
    )
    shape = (x.shape[0], weight.shape[0], h, w)
    return x.new_empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


# The gradients of x, weight and bias in their own dtypes (contiguous), empty where not needed.
@torch.library.custom_op("torchcaps::single_channel_conv2d_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    groups: int,
    dtype: torch.dtype,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(device_type="cpu", enabled=False):
        grads = torch.ops.aten.convolution_backward(
            grad.to(dtype),
            x.to(dtype),
            weight.to(dtype),
            [weight.shape[0]] if need_bias else None,
            stride,
            padding,
            [1, 1],
            False,
            [0, 0],
            groups,
            [need_x, need_weight, need_bias],
        )
    like = (x, weight, weight.new_empty(weight.shape[0]))
    return tuple(  # type: ignore[return-value]
        g.to(t.dtype).contiguous() if need else t.new_empty(0)
        for g, t, need in zip(grads, like, (need_x, need_weight, need_bias), strict=True)
    )


@_backward_op.register_fake
def _backward_fake(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    groups: int,
    dtype: torch.dtype,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    like = (x, weight, weight.new_empty(weight.shape[0]))
    return tuple(  # type: ignore[return-value]
        t.new_empty(t.shape) if need else t.new_empty(0)
        for t, need in zip(like, (need_x, need_weight, need_bias), strict=True)
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, stride, padding, groups, dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, groups, dtype)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    grads = _backward_op(grad, x, weight, *ctx.args, need_x, need_w, need_b)
    needs = (need_x, need_w, need_b)
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True)) + (None,) * 4


_forward_op.register_autograd(_backward, setup_context=_setup)
