"""Train the CapsNet of Sabour, Frosst & Hinton (2017) on MNIST, built from torchcaps parts.

    python examples/mnist_capsnet.py                       # the paper's best configuration
    python examples/mnist_capsnet.py --epochs 1 --quiet    # a quick look

The model is ``torchcaps.models.get_model("capsnet_mnist")``: Conv2d(1, 256, 9) + ReLU ->
Conv2dCaps(256, 32, 8, 9, stride 2) -> DenseCaps(1152, 8, 10, 16, DynamicRouting(3)) ->
capsule lengths -> MarginLoss, plus MaskedDecoder(10, 16, (1, 28, 28)) for the reconstruction
loss (0.0005 x per-image sum of squared errors). MNIST is held as one uint8 tensor on the
training device and augmented there (random shifts of up to 2 pixels, per sample, batched).
Without MNIST and without internet, the run falls back to a small embedded sample, loudly.
``torchrun --nproc_per_node=N examples/mnist_capsnet.py`` trains data-parallel. The loop,
checkpoints and the shared flags are in ``train.py``, ``engine.py`` and ``runtime.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import train
from augment import Shift
from presets import Recipe, add_flag, add_reconstruction_arguments, capsule_loss


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of this model: routing iterations, the decoder, PrimaryCaps' convolution."""
    add_flag(
        p,
        "--routing-iterations",
        type=int,
        default=3,
        help="routing iterations r of DynamicRouting (the paper's Procedure 1)",
    )
    add_reconstruction_arguments(p)
    add_flag(
        p,
        "--conv-impl",
        choices=("auto", "native", "matmul"),
        default="auto",
        help="how PrimaryCaps computes its convolution (Conv2dCaps conv_impl; auto: "
        "per-tap matmuls for float32 on CPU, torch's convolution otherwise)",
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``capsnet_mnist`` (stored in every checkpoint)."""
    if args.routing_iterations < 1:
        raise ValueError(f"--routing-iterations must be >= 1, got {args.routing_iterations}")
    return {"routing_iterations": args.routing_iterations, "reconstruction": args.reconstruction}


RECIPE = Recipe(
    name="mnist_capsnet",
    description="CapsNet (Sabour et al. 2017) on MNIST with torchcaps.",
    model="capsnet_mnist",
    dataset="mnist",
    alt_datasets=("fashion-mnist",),
    model_kwargs=model_kwargs,
    loss=capsule_loss,
    add_arguments=add_arguments,
    runtime_kwargs=lambda args: {"conv_impl": args.conv_impl},
    augment=Shift(2),
    defaults={"epochs": 15, "batch_size": 128, "lr": 0.001},
)


build_parser, parse_args, run, main = train.entry_points(RECIPE)


if __name__ == "__main__":
    sys.exit(main())
