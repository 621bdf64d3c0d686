"""A small capsule network with a routed convolutional capsule layer between two capsule grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import check_int
from torchcaps.decoders import MaskedDecoder
from torchcaps.functional import capsule_lengths
from torchcaps.layers import Conv2dCaps, ConvCaps2d, DenseCaps
from torchcaps.models._api import (
    CapsuleOutput,
    check_image_model_args,
    check_images,
    register_model,
)
from torchcaps.routing import Routing, routing_class

__all__ = ["ConvCapsNet", "convcaps_mnist"]


class ConvCapsNet(nn.Module):
    r"""Conv2d, primary capsules, a routed :class:`~torchcaps.ConvCaps2d` layer, class capsules.

    A capsule network one routed layer deeper than the paper's CapsNet:

    1. ``conv1``: :class:`torch.nn.Conv2d` (``conv_channels``, 5x5, stride 2) and a ReLU;
    2. ``primary``: :class:`~torchcaps.Conv2dCaps` (``primary_capsules`` types of
       ``primary_dim`` dimensions, 3x3, stride 2), squashed: a capsule grid;
    3. ``convcaps``: :class:`~torchcaps.ConvCaps2d` (3x3, stride 1, no padding) to
       ``conv_capsules`` types of ``conv_dim`` dimensions, routed at every position;
    4. ``digits``: :class:`~torchcaps.DenseCaps` from every capsule of that grid to
       ``num_classes`` capsules of ``class_dim`` dimensions;
    5. ``decoder`` (with ``reconstruction=True``): :class:`~torchcaps.MaskedDecoder`, masked by
       ``target`` when given and by the prediction otherwise.

    Both routed layers use ``routing`` (a name such as ``"dynamic"``, ``"self_attention"`` or
    ``"inverted_dot_product"``, with ``routing_kwargs``; each layer gets its own instance).
    The class scores are the capsule lengths (the routing's outputs; for a routing that does
    not squash, such as inverted dot-product, they are not bounded by 1). For 28x28 input the
    grids are 12x12 (``conv1``), 5x5 (``primary``) and 3x3 (``convcaps``); the defaults have
    407,296 parameters without the decoder (1,818,640 with it).

    Args:
        in_shape: shape ``(C, H, W)`` of one input image, at least 17x17.
        num_classes: number of class capsules :math:`K`.
        conv_channels: channels of ``conv1``.
        primary_capsules: capsule types of the primary layer.
        primary_dim: dimension of a primary capsule.
        conv_capsules: capsule types of the routed convolutional layer.
        conv_dim: dimension of its capsules.
        class_dim: dimension :math:`D` of a class capsule.
        routing: name of the routing of both routed layers (see
            :func:`~torchcaps.routing.routing_choices`).
        routing_kwargs: its constructor arguments, on top of those its class needs for each
            layer's sizes (:meth:`~torchcaps.routing.Routing.contract_kwargs`, such as
            inverted dot-product's ``out_dim``).
        reconstruction: whether the model has the decoder.
        decoder_hidden: hidden layer sizes of the decoder.

    Shape:
        - x: :math:`(B, C, H, W)` = ``(B, *in_shape)``.
        - target: :math:`(B,)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, K)`,
          ``capsules`` :math:`(B, K, D)` and ``reconstruction`` :math:`(B, C, H, W)` (or
          ``None`` without the decoder).

    Examples:
        >>> import torch
        >>> from torchcaps.models import ConvCapsNet
        >>> model = ConvCapsNet(reconstruction=False)
        >>> out = model(torch.rand(2, 1, 28, 28))
        >>> out.scores.shape, out.capsules.shape
        (torch.Size([2, 10]), torch.Size([2, 10, 16]))
        >>> ConvCapsNet(routing="self_attention").convcaps.routing
        SelfAttentionRouting()
    """

    decoder: MaskedDecoder | None

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        conv_channels: int = 64,
        primary_capsules: int = 16,
        primary_dim: int = 8,
        conv_capsules: int = 16,
        conv_dim: int = 8,
        class_dim: int = 16,
        routing: str = "dynamic",
        routing_kwargs: dict[str, Any] | None = None,
        reconstruction: bool = True,
        decoder_hidden: Sequence[int] = (512, 1024),
    ) -> None:
        super().__init__()
        owner = "ConvCapsNet"
        self.in_shape, self.num_classes = check_image_model_args(
            owner, in_shape, num_classes, reconstruction
        )
        sizes = {
            "conv_channels": conv_channels,
            "primary_capsules": primary_capsules,
            "primary_dim": primary_dim,
            "conv_capsules": conv_capsules,
            "conv_dim": conv_dim,
            "class_dim": class_dim,
        }
        for name, value in sizes.items():
            check_int(name, value, owner=owner)
        if not isinstance(routing, str):
            raise TypeError(
                f"{owner}: routing must be a routing name (str), got {type(routing).__name__}; "
                "a model builds one instance per routed layer"
            )
        channels, height, width = self.in_shape
        if min(height, width) < 17:
            raise ValueError(
                f"{owner}: in_shape {self.in_shape} must be at least 17x17 (two stride-2 "
                "layers and a 3x3 routed layer need a 3x3 primary grid)"
            )
        self.conv1 = nn.Conv2d(channels, conv_channels, 5, stride=2)
        self.primary = Conv2dCaps(conv_channels, primary_capsules, primary_dim, 3, stride=2)
        self.convcaps = ConvCaps2d(
            primary_capsules,
            primary_dim,
            conv_capsules,
            conv_dim,
            3,
            routing=self._routing(
                routing, routing_kwargs, 9 * primary_capsules, conv_capsules, conv_dim
            ),
        )
        grid_h, grid_w = self.convcaps.output_size(
            *self.primary.output_size((height - 5) // 2 + 1, (width - 5) // 2 + 1)
        )
        n_grid = conv_capsules * grid_h * grid_w
        self.digits = DenseCaps(
            n_grid,
            conv_dim,
            self.num_classes,
            class_dim,
            routing=self._routing(routing, routing_kwargs, n_grid, self.num_classes, class_dim),
        )
        self.decoder = (
            MaskedDecoder(self.num_classes, class_dim, self.in_shape, decoder_hidden)
            if reconstruction
            else None
        )

    @staticmethod
    def _routing(
        name: str, kwargs: dict[str, Any] | None, n_in: int, n_out: int, dim: int
    ) -> Routing:
        """A new ``name`` routing for ``n_in -> n_out`` capsules of ``dim`` dimensions.

        Built with the arguments its class needs for these sizes (``contract_kwargs``), then
        ``kwargs``.
        """
        cls = routing_class(name)
        return cls(**{**cls.contract_kwargs(n_in, n_out, dim), **(kwargs or {})})

    @property
    def routings(self) -> tuple[Routing, Routing]:
        """The routings of ``convcaps`` and ``digits``."""
        return self.convcaps.routing, self.digits.routing

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        """Class scores, class capsules and (with the decoder) the reconstruction."""
        check_images(x, self.in_shape, "ConvCapsNet")
        grid = self.convcaps(self.primary(F.relu(self.conv1(x))))  # (B, N, H', W', D)
        v = self.digits(grid.flatten(1, 3))
        recon = self.decoder(v, target) if self.decoder is not None else None
        return CapsuleOutput(capsule_lengths(v), v, recon)


@register_model("convcaps_mnist")
def convcaps_mnist(**kwargs: Any) -> ConvCapsNet:
    """A :class:`ConvCapsNet` for 28x28 digits and 10 classes (dynamic routing, decoder).

    Keyword arguments override the defaults of :class:`ConvCapsNet`.

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: :math:`(B,)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)`,
          ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` :math:`(B, 1, 28, 28)` (or
          ``None`` with ``reconstruction=False``).

    Examples:
        >>> from torchcaps.models import convcaps_mnist
        >>> convcaps_mnist(routing="inverted_dot_product").digits.routing.out_dim
        16
    """
    return ConvCapsNet(**{"in_shape": (1, 28, 28), "num_classes": 10, **kwargs})
