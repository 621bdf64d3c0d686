"""Primary capsules: :class:`Conv2dCaps`, a convolution whose channels are grouped into capsules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from torchcaps._checks import (
    IntPair,
    check_int,
    check_pair,
    check_param_dtype,
    check_shape,
    check_tensor,
    shape_str,
)
from torchcaps.errors import ShapeError
from torchcaps.functional import squash
from torchcaps.layers._common import output_size
from torchcaps.layers._tap_matmul import auto_tap_matmul_dtype, tap_matmul_conv2d

__all__ = ["Conv2dCaps"]

_CONV_IMPLS = ("auto", "native", "matmul")


class Conv2dCaps(nn.Module):
    r"""Convolutional capsule layer: the paper's PrimaryCaps.

    A 2-D convolution with ``out_capsules * capsule_dim`` output channels whose channels are
    grouped into ``out_capsules`` capsule types of ``capsule_dim`` dimensions at each position
    (channel ``n * capsule_dim + d`` is dimension ``d`` of capsule type ``n``), then squashed:

    .. math::
        u_{n,h,w} = \operatorname{squash}\big(\operatorname{conv}(x)_{n,:,h,w}\big)

    The input is either a feature map or a capsule grid from a previous capsule layer, whose
    ``N`` capsules of ``D`` dimensions are read as ``N * D`` channels in the same order.
    The paper's PrimaryCaps is ``Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)``;
    Efficient-CapsNet's is depthwise, ``Conv2dCaps(128, 16, 8, kernel_size=9, groups=128,
    squash=exp_squash)``. There is no routing here; :class:`DenseCaps` is the routed layer.

    Args:
        in_channels: input channels ``C`` (or ``N * D`` for a capsule grid).
        out_capsules: number of capsule types ``N'`` per position.
        capsule_dim: dimension ``D'`` of each output capsule.
        kernel_size: convolution kernel size.
        stride: convolution stride.
        padding: zero padding on each side.
        bias: whether the convolution has a bias (the paper's does).
        groups: groups of the convolution, as for :class:`torch.nn.Conv2d` (``in_channels``
            for a depthwise convolution); both ``in_channels`` and ``out_capsules *
            capsule_dim`` must be divisible by it.
        squash: the non-linearity applied to each capsule vector, a callable ``f(s, dim=-1)``:
            :func:`~torchcaps.functional.squash` (default) or
            :func:`~torchcaps.functional.exp_squash`.
        conv_impl: how the convolution is computed; the result is the same up to float
            rounding. ``"native"``: :class:`torch.nn.Conv2d` (oneDNN, cuDNN, ...).
            ``"matmul"``: matrix products over the kernel taps of the channels-last input, in
            the parameters' dtype, or under autocast in the autocast dtype with float32 sums
            (the capsules are then float32). ``"auto"`` (default): ``"matmul"`` where it is
            faster (CPU float32 parameters, wide layers with large kernels such as the
            paper's PrimaryCaps; under bfloat16 autocast in bfloat16 where the CPU has bf16
            instructions, in float32 where bf16 would be emulated; under :func:`torch.compile`
            in float32 outside autocast, as the operator ``torchcaps::tap_conv2d``),
            ``"native"`` otherwise and under export;
            the rule and its measurements are on the :doc:`Performance </performance>` page.
            Double backward works with every choice. ``"matmul"`` needs ``groups=1``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :math:`(B, C, H, W)` with :math:`C` = ``in_channels``, or a capsule grid
          :math:`(B, N, H, W, D)` with :math:`N D` = ``in_channels``.
        - Output: :math:`(B, N', H', W', D')` with :math:`N'` = ``out_capsules``,
          :math:`D'` = ``capsule_dim`` and :math:`H', W'` as for :class:`torch.nn.Conv2d`.

    Examples:
        >>> import torch
        >>> from torchcaps import Conv2dCaps
        >>> primary = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)
        >>> u = primary(torch.randn(2, 256, 20, 20))
        >>> u.shape
        torch.Size([2, 32, 6, 6, 8])
        >>> bool((u.norm(dim=-1) < 1).all())
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_capsules: int,
        capsule_dim: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        *,
        bias: bool = True,
        conv_impl: Literal["auto", "native", "matmul"] = "auto",
        groups: int = 1,
        squash: Callable[..., Tensor] = squash,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "Conv2dCaps"
        if conv_impl not in _CONV_IMPLS:
            raise ValueError(
                f"{owner}: conv_impl must be one of {', '.join(map(repr, _CONV_IMPLS))}, "
                f"got {conv_impl!r}"
            )
        self.conv_impl = conv_impl
        self.in_channels = check_int("in_channels", in_channels, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        self.capsule_dim = check_int("capsule_dim", capsule_dim, owner=owner)
        self.kernel_size = check_pair("kernel_size", kernel_size, minimum=1, owner=owner)
        self.stride = check_pair("stride", stride, minimum=1, owner=owner)
        self.padding = check_pair("padding", padding, minimum=0, owner=owner)
        self.groups = check_int("groups", groups, owner=owner)
        channels = self.out_capsules * self.capsule_dim
        if self.in_channels % self.groups or channels % self.groups:
            raise ValueError(
                f"{owner}: groups={self.groups} must divide in_channels={self.in_channels} and "
                f"out_capsules * capsule_dim={channels}"
            )
        if conv_impl == "matmul" and self.groups != 1:
            raise ValueError(f"{owner}: conv_impl='matmul' needs groups=1, got groups={groups}")
        if not callable(squash):
            raise TypeError(f"{owner}: squash must be a callable, got {type(squash).__name__}")
        self.squash = squash
        self.conv = nn.Conv2d(
            in_channels,
            channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def reset_parameters(self) -> None:
        """Re-initialise the convolution as :class:`torch.nn.Conv2d` does."""
        self.conv.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_capsules={self.out_capsules}, "
            f"capsule_dim={self.capsule_dim}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
            + (f", conv_impl={self.conv_impl!r}" if self.conv_impl != "auto" else "")
            + (f", groups={self.groups}" if self.groups != 1 else "")
            + (
                f", squash={getattr(self.squash, '__name__', self.squash)}"
                if self.squash is not squash
                else ""
            )
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size :math:`(H', W')` of the output grid for an input of ``height x width``."""
        return output_size(height, width, self.kernel_size, self.stride, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve, group channels into capsules and squash them."""
        owner = "Conv2dCaps"
        check_tensor("input", x, owner=owner)
        if x.dim() == 5:
            b, n, h, w, d = x.shape
            if n * d != self.in_channels:
                raise ShapeError(
                    f"{owner} expected a capsule grid (B, N, H, W, D) with N*D == in_channels "
                    f"== {self.in_channels}, got input of shape {shape_str(x.shape)} "
                    f"(N*D == {n * d})"
                )
            x = x.permute(0, 1, 4, 2, 3).reshape(b, n * d, h, w)
        elif x.dim() == 4:
            check_shape(
                x,
                "B C H W",
                name="input",
                owner=owner,
                empty_ok=("B", "H", "W"),
                C=self.in_channels,
            )
        else:
            raise ShapeError(
                f"{owner} expected a feature map (B, {self.in_channels}, H, W) or a capsule grid "
                f"(B, N, H, W, D) with N*D == {self.in_channels}, got input of shape "
                f"{shape_str(x.shape)}"
            )
        check_param_dtype("input", x, self.conv.weight, owner=owner)
        h_out, w_out = self.output_size(x.shape[2], x.shape[3])
        if h_out < 1 or w_out < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ShapeError(
                f"{owner}: input of spatial size {x.shape[2]}x{x.shape[3]} is smaller than the "
                f"kernel {self.kernel_size} (padding {self.padding}); got input "
                f"{shape_str(x.shape)}"
            )
        conv = self.conv
        compute = None
        if self.conv_impl == "auto" and self.groups == 1:
            compute = auto_tap_matmul_dtype(x, conv.weight)
        if self.conv_impl == "matmul" or compute is not None:
            y = tap_matmul_conv2d(x, conv.weight, conv.bias, self.stride, self.padding, compute)
        else:
            y = conv(x)  # (B, N*D, H', W'), any memory format
        y = y.unflatten(1, (self.out_capsules, self.capsule_dim)).permute(0, 1, 3, 4, 2)
        return self.squash(y, dim=-1)
