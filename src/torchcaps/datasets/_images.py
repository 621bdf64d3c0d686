"""The image batches that the dataset generators take: checked and brought to one form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchcaps._checks import check_shape, shape_str


def image_batch(images: Any, owner: str, name: str = "images") -> Tensor:
    """``images`` as a float batch (N, C, H, W) in [0, 1].

    Accepts float (N, C, H, W) or (N, H, W) (one channel), and uint8, which is scaled to
    [0, 1] as float32; float input keeps its dtype.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise TypeError(
            f"{owner}: {name} must be a float tensor in [0, 1] or uint8, got dtype {images.dtype}"
        )
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(
            f"{owner}: {name} must have shape (N, C, H, W) or (N, H, W), got "
            f"{shape_str(images.shape)}"
        )
    return images


def label_vector(labels: Any, n: int, owner: str, num_classes: int = 10) -> Tensor:
    """``labels`` as an int64 vector (n,) of class indices in [0, num_classes)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{owner}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{owner}: labels must be an integer tensor, got dtype {labels.dtype}")
    check_shape(labels, "N", name="labels", owner=owner, N=n, note=f" (one per image, {n})")
    labels = labels.long()
    if n and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"{owner}: labels must be class indices in [0, {num_classes}), got values "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return labels
