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

import sys

import train
from presets import Recipe, add_em_arguments, em_model_kwargs, scheduled_spread_loss

MODELS = {"small": "matrix_capsnet_small_mnist", "large": "matrix_capsnet_mnist"}


RECIPE = Recipe(
    name="em_capsnet_mnist",
    description="Matrix capsules with EM routing (Hinton et al. 2018) on MNIST with torchcaps.",
    model=lambda args: MODELS[args.model],
    dataset="mnist",
    alt_datasets=("fashion-mnist",),
    model_kwargs=em_model_kwargs,
    loss=scheduled_spread_loss,
    add_arguments=lambda p: add_em_arguments(p, MODELS, iterations=2, margin_epochs=5.0),
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
