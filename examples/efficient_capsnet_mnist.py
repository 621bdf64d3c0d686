"""Train Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021) on MNIST, built from torchcaps parts.

    python examples/efficient_capsnet_mnist.py                      # the paper's recipe, 150 epochs
    python examples/efficient_capsnet_mnist.py --epochs 1 --quiet   # a quick look

The model is ``torchcaps.models.get_model("efficient_capsnet_mnist")``: four convolutions with
BatchNorm -> depthwise primary capsules (16 x 8D, ``exp_squash``) -> DenseCaps(16, 8, 10, 16,
SelfAttentionRouting with a learned prior) -> capsule lengths -> MarginLoss, plus
MaskedDecoder(10, 16, (1, 28, 28)) for the reconstruction loss. The recipe is the official
code's: Adam at 5e-4, multiplied by 0.97 after every epoch with a floor of 5e-5, batches of 16,
150 epochs, margin loss 0.9/0.1/0.5, 0.0005 x the per-image sum of squared pixel errors, and its
augmentation (``augment.EfficientCapsNetAugment``: rotation, shift within the free margin,
width squish, a 4x4 erase), batched on the training device. The official code keeps the epoch
with the best test accuracy; the number to report here is the final epoch's. The loop,
checkpoints and the shared flags are in ``train.py``, ``engine.py`` and ``runtime.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import train
from augment import EfficientCapsNetAugment
from presets import Recipe, add_reconstruction_arguments, capsule_loss


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``efficient_capsnet_mnist`` (stored in every checkpoint)."""
    return {"reconstruction": args.reconstruction}


RECIPE = Recipe(
    name="efficient_capsnet_mnist",
    description="Efficient-CapsNet (Mazzia et al. 2021) on MNIST with torchcaps.",
    model="efficient_capsnet_mnist",
    dataset="mnist",
    alt_datasets=("fashion-mnist",),
    model_kwargs=model_kwargs,
    loss=capsule_loss,
    add_arguments=add_reconstruction_arguments,
    augment=EfficientCapsNetAugment(),
    defaults={
        "epochs": 150,
        "batch_size": 16,
        "lr": 5e-4,
        "lr_schedule": "exponential",
        "lr_decay": 0.97,
        "lr_floor": 5e-5,
        "log_interval": 100,
    },
)


build_parser, parse_args, run, main = train.entry_points(RECIPE)


if __name__ == "__main__":
    sys.exit(main())
