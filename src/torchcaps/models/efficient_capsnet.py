"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021), assembled from torchcaps layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchcaps.decoders import MaskedDecoder
from torchcaps.functional import capsule_lengths, exp_squash
from torchcaps.layers import Conv2dCaps, DenseCaps
from torchcaps.models._api import (
    CapsuleOutput,
    check_image_model_args,
    check_images,
    register_model,
)
from torchcaps.routing import SelfAttentionRouting

__all__ = ["EfficientCapsNet", "efficient_capsnet_mnist"]

# Keras' he_normal: a normal truncated at 2 standard deviations, rescaled so that the truncated
# distribution has the standard deviation sqrt(2 / fan_in).
_TRUNCATED_STD = 0.87962566103423978


def _he_normal_(weight: Tensor, fan_in: int) -> None:
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_STD
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class EfficientCapsNet(nn.Module):
    r"""Efficient-CapsNet: four convolutions, depthwise primary capsules, self-attention routing.

    From `Mazzia et al. 2021 <https://arxiv.org/abs/2101.12491>`_ (the MNIST model of the
    official code):

    1. ``features``: Conv 32 5x5, Conv 64 3x3, Conv 64 3x3, Conv 128 3x3 stride 2, each followed
       by ReLU and :class:`torch.nn.BatchNorm2d` (with Keras' defaults, ``eps=1e-3`` and a
       running-average momentum of 0.01), no padding (a 9x9 grid for 28x28 input);
    2. ``primary``: :class:`~torchcaps.Conv2dCaps` ``(128, 16, 8, kernel_size=9, groups=128,
       squash=exp_squash)``, a depthwise convolution over the whole grid: each channel becomes
       one number, regrouped into 16 capsules of 8 dimensions;
    3. ``digits``: :class:`~torchcaps.DenseCaps` ``(16, 8, num_classes, 16)`` routed by
       :class:`~torchcaps.SelfAttentionRouting` with a learned prior of shape
       ``(16, num_classes)``;
    4. ``decoder`` (with ``reconstruction=True``): :class:`~torchcaps.MaskedDecoder`, the
       regulariser, masked by ``target`` when given and by the prediction otherwise.

    The class scores are the capsule lengths. The MNIST model has 161,824 trainable parameters
    without the decoder, the paper's count (1,573,168 with it). The weights start as in the
    official code: Keras' ``he_normal`` for the convolutions and the capsule weights (with
    Keras' fan-in of the ``(N_out, N_in, D_in, D_out)`` weight tensor, ``N_out * N_in * D_in``),
    zero biases and a zero prior; the decoder keeps PyTorch's default.

    Args:
        in_shape: shape ``(C, H, W)`` of one input image; the primary capsules' kernel covers
            the whole feature grid (9x9 for 28x28 input).
        num_classes: number of class capsules :math:`K`.
        reconstruction: whether the model has the decoder.
        decoder_hidden: hidden layer sizes of the decoder.

    Shape:
        - x: :math:`(B, C, H, W)` = ``(B, *in_shape)``.
        - target: :math:`(B,)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, K)`,
          ``capsules`` :math:`(B, K, 16)` and ``reconstruction`` :math:`(B, C, H, W)` (or
          ``None`` without the decoder).

    Examples:
        >>> import torch
        >>> from torchcaps.models import EfficientCapsNet
        >>> model = EfficientCapsNet(reconstruction=False)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        161824
        >>> out = model(torch.rand(4, 1, 28, 28))
        >>> out.scores.shape, out.capsules.shape, out.reconstruction
        (torch.Size([4, 10]), torch.Size([4, 10, 16]), None)
    """

    decoder: MaskedDecoder | None

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        reconstruction: bool = True,
        decoder_hidden: Sequence[int] = (512, 1024),
    ) -> None:
        super().__init__()
        owner = "EfficientCapsNet"
        self.in_shape, self.num_classes = check_image_model_args(
            owner, in_shape, num_classes, reconstruction
        )
        channels, height, width = self.in_shape
        grid_h, grid_w = (height - 8 - 3) // 2 + 1, (width - 8 - 3) // 2 + 1
        if min(height, width) < 11 or grid_h != grid_w:
            raise ValueError(
                f"{owner}: in_shape {self.in_shape} must be square and at least 11x11 (the four "
                "convolutions need 11x11; the primary capsules need a square grid)"
            )
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in (
            (channels, 32, 5, 1),
            (32, 64, 3, 1),
            (64, 64, 3, 1),
            (64, 128, 3, 2),
        ):
            layers += [
                nn.Conv2d(c_in, c_out, k, stride=s),
                nn.ReLU(inplace=True),
                # Keras' BatchNormalization defaults, as in the official code
                nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
            ]
        self.features = nn.Sequential(*layers)
        self.primary = Conv2dCaps(128, 16, 8, kernel_size=grid_h, groups=128, squash=exp_squash)
        self.digits = DenseCaps(
            16,
            8,
            self.num_classes,
            16,
            routing=SelfAttentionRouting(learned_prior=(16, self.num_classes)),
        )
        self.decoder = (
            MaskedDecoder(self.num_classes, 16, self.in_shape, decoder_hidden)
            if reconstruction
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the official code does (see the class documentation)."""
        for m in [*self.features, self.primary.conv]:
            if isinstance(m, nn.Conv2d):
                _he_normal_(m.weight, m.weight[0].numel())
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        d = self.digits
        with torch.no_grad():
            _he_normal_(d.weight, d.out_capsules * d.in_capsules * d.in_dim)
        if isinstance(d.routing, SelfAttentionRouting):
            d.routing.reset_parameters()  # the prior: zero
        if self.decoder is not None:
            self.decoder.reset_parameters()

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        """Class scores, class capsules and (with the decoder) the reconstruction."""
        check_images(x, self.in_shape, "EfficientCapsNet")
        v = self.digits(self.primary(self.features(x)))
        recon = self.decoder(v, target) if self.decoder is not None else None
        return CapsuleOutput(capsule_lengths(v), v, recon)


@register_model("efficient_capsnet_mnist")
def efficient_capsnet_mnist(**kwargs: Any) -> EfficientCapsNet:
    """Efficient-CapsNet's MNIST model: 28x28 digits, 10 classes, decoder as regulariser.

    161,824 trainable parameters with ``reconstruction=False`` (the paper's count). Keyword
    arguments override the defaults of :class:`EfficientCapsNet`.

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: :math:`(B,)` class indices, or ``None``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)`,
          ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` :math:`(B, 1, 28, 28)` (or
          ``None`` with ``reconstruction=False``).

    Examples:
        >>> from torchcaps.models import efficient_capsnet_mnist
        >>> sum(p.numel() for p in efficient_capsnet_mnist(reconstruction=False).parameters())
        161824
    """
    return EfficientCapsNet(**{"in_shape": (1, 28, 28), "num_classes": 10, **kwargs})
