"""Train matrix capsules with EM routing (Hinton, Sabour & Frosst 2018) on MNIST.

    python examples/em_capsnet_mnist.py                 # the preset: small model, 2 iterations
    python examples/em_capsnet_mnist.py --model large --epochs 1 --quiet

The model is ``torchcaps.models.get_model("matrix_capsnet_small_mnist")`` (A=64, B=8, C=D=16;
``--model large`` for A=B=C=D=32): a ReLU 5x5 stride-2 convolution -> PrimaryMatrixCaps ->
ConvMatrixCaps2d (K=3, stride 2) -> ConvMatrixCaps2d (K=3, stride 1) -> ClassMatrixCaps with
coordinate addition, EM routing in every routed layer; the class activations are the scores.
The loss is the spread loss, its margin raised linearly from 0.2 to 0.9 over the first
``--margin-epochs`` epochs, step by step (the paper's linear schedule; ``--margin-schedule
authors`` for the authors' sigmoid). Adam at 3e-3 (the authors' rate, quoted by IBM's
reproduction), multiplied by 0.9 after every epoch; batches of 32; random shifts of up to 2
pixels. The number to report is the final epoch's.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import train
from presets import Recipe, add_flag
from torchcaps import SpreadLoss, spread_margin
from torchcaps.models import CapsuleOutput

if TYPE_CHECKING:
    from torch import Tensor

MODELS = {"small": "matrix_capsnet_small_mnist", "large": "matrix_capsnet_mnist"}


class ScheduledSpreadLoss:
    """The spread loss on the class activations, its margin set from the step number.

    ``schedule="linear"``: from 0.2 to 0.9 over ``ramp_epochs`` epochs, then 0.9;
    ``"authors"``: the authors' sigmoid in the step number.
    """

    def __init__(self, schedule: str = "linear", ramp_epochs: float = 5.0) -> None:
        self.loss = SpreadLoss(margin=0.2)
        self.schedule = schedule
        self.ramp_epochs = ramp_epochs

    def set_step(self, step: int, steps_per_epoch: int) -> None:
        """Called by the harness before every training step."""
        if self.schedule == "authors":
            self.loss.margin = spread_margin(step, schedule="authors")
        else:
            total = max(1, round(self.ramp_epochs * steps_per_epoch))
            self.loss.margin = spread_margin(step, total)

    def __call__(self, out: CapsuleOutput, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss(out.scores.float(), labels)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="model size")
    p.add_argument("--iterations", type=int, default=2, help="EM iterations in every layer")
    add_flag(
        p,
        "--margin-schedule",
        choices=("linear", "authors"),
        default="linear",
        help="the spread loss margin's schedule",
    )
    add_flag(
        p,
        "--margin-epochs",
        type=float,
        default=5.0,
        help="with --margin-schedule linear: epochs over which the margin rises to 0.9",
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the model (stored in every checkpoint)."""
    return {"routing_iterations": args.iterations}


def loss(args: argparse.Namespace) -> ScheduledSpreadLoss:
    return ScheduledSpreadLoss(args.margin_schedule, args.margin_epochs)


RECIPE = Recipe(
    name="em_capsnet_mnist",
    description="Matrix capsules with EM routing (Hinton et al. 2018) on MNIST with torchcaps.",
    model=lambda args: MODELS[args.model],
    dataset="mnist",
    model_kwargs=model_kwargs,
    loss=loss,
    add_arguments=add_arguments,
    defaults={
        "epochs": 10,
        "batch_size": 32,
        "lr": 3e-3,
        "lr_schedule": "exponential",
        "lr_decay": 0.9,
        "log_interval": 100,
    },
)


build_parser, parse_args, run, main = train.entry_points(RECIPE)


if __name__ == "__main__":
    sys.exit(main())
