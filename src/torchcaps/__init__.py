"""torchcaps: capsule networks for PyTorch.

Composable modules for capsule networks (`Sabour et al. 2017
<https://arxiv.org/abs/1710.09829>`_): :func:`squash`, :class:`Conv2dCaps`, :class:`DenseCaps`
with a pluggable :class:`Routing` algorithm (:class:`DynamicRouting`), :class:`MarginLoss`,
:class:`ReconstructionLoss` and :class:`MaskedDecoder`. Functional forms live in
:mod:`torchcaps.functional`, reference models (built by name) in :mod:`torchcaps.models`, test
helpers in :mod:`torchcaps.testing`, dataset readers and preprocessing in
:mod:`torchcaps.datasets`.
"""

from torchcaps import datasets, errors, functional, layers, models, routing, testing
from torchcaps._version import __version__
from torchcaps.decoders import MaskedDecoder
from torchcaps.errors import ShapeError
from torchcaps.functional import capsule_lengths, exp_squash, spread_loss, squash
from torchcaps.layers import (
    ClassMatrixCaps,
    Conv2dCaps,
    ConvCaps2d,
    ConvMatrixCaps2d,
    DenseCaps,
    MatrixCapsules,
    PrimaryMatrixCaps,
)
from torchcaps.losses import MarginLoss, ReconstructionLoss, SpreadLoss, spread_margin
from torchcaps.routing import (
    DynamicRouting,
    EMRouting,
    InvertedDotProductRouting,
    MatrixRouting,
    Routing,
    SelfAttentionRouting,
    resolve_routing,
)

__all__ = [
    "ClassMatrixCaps",
    "Conv2dCaps",
    "ConvCaps2d",
    "ConvMatrixCaps2d",
    "DenseCaps",
    "DynamicRouting",
    "EMRouting",
    "InvertedDotProductRouting",
    "MarginLoss",
    "MaskedDecoder",
    "MatrixCapsules",
    "MatrixRouting",
    "PrimaryMatrixCaps",
    "ReconstructionLoss",
    "Routing",
    "SelfAttentionRouting",
    "ShapeError",
    "SpreadLoss",
    "__version__",
    "capsule_lengths",
    "datasets",
    "errors",
    "exp_squash",
    "functional",
    "layers",
    "models",
    "resolve_routing",
    "routing",
    "spread_loss",
    "spread_margin",
    "squash",
    "testing",
]
