"""Reference capsule models, built by name from a registry.

Every registered model's ``forward(x, target=None)`` returns a :class:`CapsuleOutput`.

Examples:
    >>> import torch
    >>> from torchcaps.models import get_model, list_models
    >>> "capsnet_mnist" in list_models()
    True
    >>> out = get_model("capsnet_mnist")(torch.rand(2, 1, 28, 28))
    >>> out.scores.argmax(dim=1).shape
    torch.Size([2])
"""

from torchcaps.models._api import (
    CapsuleOutput,
    get_model,
    get_model_builder,
    list_models,
    register_model,
)
from torchcaps.models.baseline_cnn import BaselineCNN, baseline_cnn_mnist
from torchcaps.models.capsnet import CapsNet, capsnet_mnist, capsnet_multimnist
from torchcaps.models.convcaps import ConvCapsNet, convcaps_mnist
from torchcaps.models.efficient_capsnet import EfficientCapsNet, efficient_capsnet_mnist
from torchcaps.models.matrix_capsnet import (
    MatrixCapsNet,
    matrix_capsnet_mnist,
    matrix_capsnet_small_mnist,
    matrix_capsnet_small_smallnorb,
    matrix_capsnet_smallnorb,
)

__all__ = [
    "BaselineCNN",
    "CapsNet",
    "CapsuleOutput",
    "ConvCapsNet",
    "EfficientCapsNet",
    "MatrixCapsNet",
    "baseline_cnn_mnist",
    "capsnet_mnist",
    "capsnet_multimnist",
    "convcaps_mnist",
    "efficient_capsnet_mnist",
    "get_model",
    "get_model_builder",
    "list_models",
    "matrix_capsnet_mnist",
    "matrix_capsnet_small_mnist",
    "matrix_capsnet_small_smallnorb",
    "matrix_capsnet_smallnorb",
    "register_model",
]
