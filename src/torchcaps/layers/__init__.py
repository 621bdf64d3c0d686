"""Capsule layers: primary capsules from feature maps, and routed capsule layers."""

from torchcaps.layers.conv import ConvCaps2d
from torchcaps.layers.dense import DenseCaps
from torchcaps.layers.primary import Conv2dCaps

__all__ = ["Conv2dCaps", "ConvCaps2d", "DenseCaps"]
