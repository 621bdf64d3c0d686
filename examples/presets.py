"""What differs between the examples: recipes (model, data, loss, schedule) and the augmentation.

A :class:`Recipe` is one example script's preset: which registered model it trains on which
dataset, with which loss, default hyperparameters and flags of its own. The augmentation works
on uint8 batches on the training device (no per-sample Python loop).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps import MarginLoss, ReconstructionLoss
from torchcaps.models import CapsuleOutput

# (output, images, labels) -> scalar loss
LossFn = Callable[[CapsuleOutput, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Recipe:
    """One example's preset: what ``train.py`` trains and the defaults of its command line.

    ``add_arguments`` adds the example's own flags to the shared parser; ``model_kwargs`` and
    ``loss`` turn the parsed command line into the model's keyword arguments (stored in every
    checkpoint) and the loss; ``runtime_kwargs`` into model arguments that change how it
    computes but not its weights (not stored, free to change on ``--resume``).
    """

    name: str
    description: str
    model: str
    dataset: str
    model_kwargs: Callable[[argparse.Namespace], dict[str, Any]]
    loss: Callable[[argparse.Namespace], LossFn]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    runtime_kwargs: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    max_shift: int = 2
    defaults: dict[str, Any] = field(default_factory=dict)


class CapsuleLoss:
    """Margin loss on the class scores plus the weighted reconstruction loss (the paper's)."""

    def __init__(self, recon_weight: float = 0.0005) -> None:
        self.margin = MarginLoss()
        self.recon = ReconstructionLoss(recon_weight)

    def __call__(self, out: CapsuleOutput, images: Tensor, labels: Tensor) -> Tensor:
        loss = self.margin(out.scores.float(), labels)
        if out.reconstruction is not None:
            loss = loss + self.recon(out.reconstruction.float(), images.float())
        return loss


def random_shift(
    images: Tensor, max_shift: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> Tensor:
    """Shift each image independently by up to ``max_shift`` pixels in x and y, zero padded.

    Batched on the images' device: pad, then gather one (H, W) window per sample.
    ``images``: (B, H, W) uint8 -> (B, H, W) uint8. Under data parallelism ``images`` is this
    rank's shard of a global batch of ``world * B`` images: the offsets are drawn for the whole
    global batch (the same draw on every rank) and the rank's slice is used, so every image gets
    the shift it would get in a single-process run with the same seed.
    """
    b, h, w = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, b * world), generator=generator, device=generator.device
    )[:, rank * b : (rank + 1) * b].to(images.device)
    rows = (offsets[0].unsqueeze(1) + torch.arange(h, device=images.device)).unsqueeze(2)
    cols = (offsets[1].unsqueeze(1) + torch.arange(w, device=images.device)).unsqueeze(1)
    batch_index = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded[batch_index, rows, cols]
