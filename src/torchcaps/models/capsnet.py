"""The CapsNet of Sabour, Frosst & Hinton (2017), assembled from torchcaps layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import check_int
from torchcaps.decoders import MaskedDecoder
from torchcaps.functional import capsule_lengths
from torchcaps.layers import Conv2dCaps, DenseCaps
from torchcaps.layers._single_channel_conv import conv2d as single_channel_conv2d
from torchcaps.models._api import (
    CapsuleOutput,
    check_image_model_args,
    check_images,
    register_model,
)
from torchcaps.routing import DynamicRouting

__all__ = ["CapsNet", "capsnet_mnist", "capsnet_multimnist"]


class CapsNet(nn.Module):
    r"""The paper's CapsNet: Conv2d, primary capsules, routed class capsules, masked decoder.

    From `Sabour et al. 2017 <https://arxiv.org/abs/1710.09829>`_ (section 4):

    1. ``conv1``: :class:`torch.nn.Conv2d` (``conv_channels``, ``conv_kernel`` x
       ``conv_kernel``, stride 1) and a ReLU;
    2. ``primary``: :class:`~torchcaps.Conv2dCaps` (``primary_capsules`` types of
       ``primary_dim`` dimensions, ``primary_kernel``, stride ``primary_stride``), squashed;
    3. ``digits``: :class:`~torchcaps.DenseCaps` from every primary capsule to ``num_classes``
       capsules of ``class_dim`` dimensions, routed by :class:`~torchcaps.DynamicRouting` with
       ``routing_iterations`` rounds (the paper's DigitCaps);
    4. ``decoder`` (with ``reconstruction=True``): :class:`~torchcaps.MaskedDecoder` from the
       class capsules back to an image of ``in_shape``, masked by ``target`` when given and
       by the longest capsule (the prediction) otherwise; a :math:`(B, M)` ``target`` gives
       :math:`M` reconstructions per image, each from its own class capsule.

    The class scores are the capsule lengths. The defaults are the paper's MNIST model
    (8,215,568 parameters; 6,804,224 without the decoder), registered as ``"capsnet_mnist"``.

    Args:
        in_shape: shape ``(C, H, W)`` of one input image.
        num_classes: number of class capsules :math:`K`.
        conv_channels: channels of ``conv1``.
        conv_kernel: kernel size of ``conv1``.
        primary_capsules: capsule types of the primary layer.
        primary_dim: dimension of a primary capsule.
        primary_kernel: kernel size of the primary layer.
        primary_stride: stride of the primary layer.
        class_dim: dimension :math:`D` of a class capsule.
        routing_iterations: rounds of dynamic routing.
        reconstruction: whether the model has the decoder.
        decoder_hidden: hidden layer sizes of the decoder.
        conv_impl: ``conv_impl`` of the primary layer (see :class:`~torchcaps.Conv2dCaps`).
        batch_chunk: ``batch_chunk`` of the class capsule layer (see
            :class:`~torchcaps.DenseCaps`).

    Shape:
        - x: :math:`(B, C, H, W)` = ``(B, *in_shape)``.
        - target: :math:`(B,)` or :math:`(B, M)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, K)`,
          ``capsules`` :math:`(B, K, D)` and ``reconstruction`` :math:`(B, C, H, W)`,
          :math:`(B, M, C, H, W)` for a :math:`(B, M)` ``target`` (or ``None`` without the
          decoder).

    Examples:
        >>> import torch
        >>> from torchcaps.models import CapsNet
        >>> model = CapsNet()  # the paper's MNIST model
        >>> out = model(torch.rand(2, 1, 28, 28), torch.tensor([3, 7]))
        >>> out.scores.shape, out.capsules.shape, out.reconstruction.shape
        (torch.Size([2, 10]), torch.Size([2, 10, 16]), torch.Size([2, 1, 28, 28]))
        >>> small = CapsNet((3, 24, 24), 5, conv_channels=32, primary_capsules=8, class_dim=8)
        >>> small(torch.rand(4, 3, 24, 24)).capsules.shape
        torch.Size([4, 5, 8])
    """

    decoder: MaskedDecoder | None

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_capsules: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        class_dim: int = 16,
        routing_iterations: int = 3,
        reconstruction: bool = True,
        decoder_hidden: Sequence[int] = (512, 1024),
        conv_impl: Literal["auto", "native", "matmul"] = "auto",
        batch_chunk: int | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__()
        owner = "CapsNet"
        self.in_shape, self.num_classes = check_image_model_args(
            owner, in_shape, num_classes, reconstruction
        )
        sizes = {
            "conv_channels": conv_channels,
            "conv_kernel": conv_kernel,
            "primary_capsules": primary_capsules,
            "primary_dim": primary_dim,
            "primary_kernel": primary_kernel,
            "primary_stride": primary_stride,
            "class_dim": class_dim,
            "routing_iterations": routing_iterations,
        }
        for key, value in sizes.items():  # named here, not by the layer that receives them
            check_int(key, value, owner=owner)
        channels, height, width = self.in_shape
        self.conv1 = nn.Conv2d(channels, conv_channels, kernel_size=conv_kernel)
        self.primary = Conv2dCaps(
            conv_channels,
            primary_capsules,
            primary_dim,
            kernel_size=primary_kernel,
            stride=primary_stride,
            conv_impl=conv_impl,
        )
        grid_h, grid_w = self.primary.output_size(height - conv_kernel + 1, width - conv_kernel + 1)
        if min(height, width) < conv_kernel or grid_h < 1 or grid_w < 1:
            raise ValueError(
                f"{owner}: in_shape {self.in_shape} is too small for conv1 ({conv_kernel}x"
                f"{conv_kernel}) followed by the primary layer ({primary_kernel}x{primary_kernel},"
                f" stride {primary_stride})"
            )
        self.digits = DenseCaps(
            primary_capsules * grid_h * grid_w,
            primary_dim,
            self.num_classes,
            class_dim,
            routing=DynamicRouting(routing_iterations),
            batch_chunk=batch_chunk,
        )
        self.decoder = (
            MaskedDecoder(self.num_classes, class_dim, self.in_shape, decoder_hidden)
            if reconstruction
            else None
        )

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        """Class scores, class capsules and (with the decoder) the reconstruction."""
        check_images(x, self.in_shape, "CapsNet")
        v = self.digits(self.primary(F.relu(single_channel_conv2d(self.conv1, x))))
        recon = self.decoder(v, target) if self.decoder is not None else None
        return CapsuleOutput(capsule_lengths(v), v, recon)


@register_model("capsnet_mnist")
def capsnet_mnist(**kwargs: Any) -> CapsNet:
    """The paper's MNIST CapsNet: 28x28 digits, 10 classes, 3 routing iterations, decoder.

    8,215,568 parameters (6,804,224 with ``reconstruction=False``). Keyword arguments override
    the defaults of :class:`CapsNet`.

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: :math:`(B,)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)`,
          ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` :math:`(B, 1, 28, 28)` (or
          ``None`` with ``reconstruction=False``).

    Examples:
        >>> from torchcaps.models import capsnet_mnist
        >>> sum(p.numel() for p in capsnet_mnist().parameters())
        8215568
    """
    return CapsNet(**{"in_shape": (1, 28, 28), "num_classes": 10, **kwargs})


@register_model("capsnet_multimnist")
def capsnet_multimnist(**kwargs: Any) -> CapsNet:
    """The paper's MultiMNIST CapsNet (section 6): the MNIST architecture on 36x36 pairs.

    The primary capsule grid is 10x10 (3,200 capsules); the decoder reconstructs 36x36 from
    one class capsule: with a :math:`(B, 2)` ``target`` (a pair's two classes) the model
    reconstructs both digits, each masked by its own class (the paper's training).
    11,361,808 parameters (9,425,664 with ``reconstruction=False``). Keyword
    arguments override the defaults of :class:`CapsNet`.

    Shape:
        - x: :math:`(B, 1, 36, 36)`.
        - target: :math:`(B,)` or :math:`(B, 2)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)`,
          ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` :math:`(B, 1, 36, 36)`,
          :math:`(B, 2, 1, 36, 36)` for a :math:`(B, 2)` ``target`` (or ``None`` with
          ``reconstruction=False``).

    Examples:
        >>> import torch
        >>> from torchcaps.models import capsnet_multimnist
        >>> model = capsnet_multimnist()
        >>> sum(p.numel() for p in model.parameters())
        11361808
        >>> out = model(torch.rand(2, 1, 36, 36), torch.tensor([[3, 8], [5, 1]]))
        >>> out.reconstruction.shape  # both digits of each pair
        torch.Size([2, 2, 1, 36, 36])
    """
    return CapsNet(**{"in_shape": (1, 36, 36), "num_classes": 10, **kwargs})
