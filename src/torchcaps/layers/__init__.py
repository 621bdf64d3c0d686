"""Capsule layers: primary capsules from feature maps, and routed vector and matrix capsules."""

from torchcaps.layers.conv import ConvCaps2d
from torchcaps.layers.dense import DenseCaps
from torchcaps.layers.matrix import (
    ClassMatrixCaps,
    ConvMatrixCaps2d,
    MatrixCapsules,
    PrimaryMatrixCaps,
)
from torchcaps.layers.primary import Conv2dCaps

__all__ = [
    "ClassMatrixCaps",
    "Conv2dCaps",
    "ConvCaps2d",
    "ConvMatrixCaps2d",
    "DenseCaps",
    "MatrixCapsules",
    "PrimaryMatrixCaps",
]
