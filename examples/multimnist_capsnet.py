"""Train the CapsNet of Sabour, Frosst & Hinton (2017) on MultiMNIST (the paper's section 6).

    python examples/multimnist_capsnet.py                      # the preset
    python examples/multimnist_capsnet.py --epochs 1 --quiet   # a quick look

Every training step draws fresh pairs, as the paper's 60M: a first digit and a partner of
another class from the MNIST training split, each centred on a 36x36 canvas and shifted by up
to 4 pixels, summed and clipped (``torchcaps.datasets.MultiMNISTBatches``); an "epoch" is
as many pairs as there are training digits. The model is
``torchcaps.models.get_model("capsnet_multimnist")``, the MNIST CapsNet on 36x36 input. The
loss is the margin loss against the pair's two classes (multi-hot) plus 0.0005 x the sum of
squared pixel errors of both digits, each reconstructed from its own class capsule against
that digit alone. The test set is fixed: every MNIST test digit paired with ``--test-pairs``
others (``torchcaps.datasets.MultiMNIST``, seed ``--test-seed``; the paper pairs each with
1,000). A pair counts as correct when its two longest capsules are its two classes (the
paper's metric); ``test_accuracy`` is that fraction and ``test_loss`` the margin loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

import mnist_capsnet
import train
from engine import PerDataset, StepContext, autocast_context, evaluation_metrics
from presets import CapsuleLoss, Recipe, add_flag, capsule_loss
from torchcaps import MarginLoss
from torchcaps.datasets import MultiMNIST, MultiMNISTBatches
from torchcaps.models import CapsuleOutput

CANVAS = 36
MAX_SHIFT = 4


class PairTarget(NamedTuple):
    """The training target of a batch of pairs."""

    labels: Tensor  # (B, 2): the classes, first digit first
    multi_hot: Tensor  # (B, 10)
    components: Tensor  # (B, 2, 1, 36, 36): each digit alone, as placed in the pair


def top2_correct(scores: Tensor, labels: Tensor) -> Tensor:
    """(B,) bool: the two highest scores are exactly the two classes in ``labels`` (B, 2)."""
    top = scores.topk(2, dim=1).indices
    a, b = labels[:, :1], labels[:, 1:]
    return ((top == a).any(dim=1)) & ((top == b).any(dim=1))


class MultiMNISTTask:
    """Fresh training pairs every step; the fixed test pairs and the paper's metric."""

    def __init__(self, test_pairs: int = 1, test_seed: int = 0) -> None:
        self.test_pairs = test_pairs
        self.test_seed = test_seed
        self.margin = MarginLoss()
        self._train = PerDataset(partial(MultiMNISTBatches, canvas=CANVAS, max_shift=MAX_SHIFT))
        self.test_set = PerDataset(self._make_test_set)

    def train_batch(
        self,
        images: Tensor,
        labels: Tensor,
        index: Tensor,
        generator: torch.Generator,
        rank: int,
        world: int,
    ) -> tuple[Tensor, PairTarget]:
        b = index.shape[0]
        # pairs for the global batch, this rank's slice (as the examples' augmentations)
        pairs = self._train(images, labels).sample(b * world, generator)
        part = slice(rank * b, (rank + 1) * b)
        target = PairTarget(pairs.labels[part], pairs.target[part], pairs.components[part])
        return pairs.image[part], target

    def model_target(self, target: PairTarget) -> Tensor:
        return target.labels

    def _make_test_set(self, images: Tensor, labels: Tensor) -> MultiMNIST:
        return MultiMNIST(
            images,
            labels,
            canvas=CANVAS,
            max_shift=MAX_SHIFT,
            seed=self.test_seed,
            length=self.test_pairs * images.shape[0],
        )

    @torch.no_grad()
    def evaluate(
        self,
        ctx: StepContext,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        memory_format: torch.memory_format,
    ) -> dict[str, float]:
        ctx.model.eval()
        pairs = self.test_set(images, labels)
        n = len(pairs)
        total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        correct = torch.zeros((), device=ctx.device, dtype=torch.long)
        start = time.perf_counter()
        for s in range(0, n, batch_size):
            batch = pairs.batch(list(range(s, min(s + batch_size, n))))
            x = batch.image.contiguous(memory_format=memory_format)
            with autocast_context(ctx.amp, ctx.device):
                out = ctx.model(x)
            total_loss += self.margin(out.scores.float(), batch.target).double() * x.shape[0]
            correct += top2_correct(out.scores, batch.labels).sum()
        return evaluation_metrics(total_loss, correct, n, time.perf_counter() - start)


class PairLoss:
    """The MNIST recipe's loss on a pair: the margin loss on the multi-hot target plus the
    weighted reconstruction loss of both digits, each against its own component (per pair, the
    sum over both digits' pixels: the reconstructions are (B, 2, 1, 36, 36))."""

    def __init__(self, recon_weight: float = 0.0005) -> None:
        self.loss = CapsuleLoss(recon_weight)

    def __call__(self, out: CapsuleOutput, images: Tensor, target: PairTarget) -> Tensor:
        return self.loss(out, target.components, target.multi_hot)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The MNIST recipe's flags, and the test set's size and seed."""
    mnist_capsnet.add_arguments(p)
    add_flag(
        p,
        "--test-pairs",
        type=int,
        default=1,
        help="partners per test digit: the test set has this many x 10,000 pairs (the paper: "
        "1,000)",
    )
    add_flag(p, "--test-seed", type=int, default=0, help="seed of the fixed test pairs")


def pair_loss(args: argparse.Namespace) -> PairLoss:
    """The margin loss plus ``--recon-weight`` x both digits' reconstruction loss."""
    return PairLoss(capsule_loss(args).recon.weight)


def task(args: argparse.Namespace) -> MultiMNISTTask:
    """The pairs, from ``--test-pairs`` and ``--test-seed``."""
    if args.test_pairs < 1:
        raise ValueError(f"--test-pairs must be >= 1, got {args.test_pairs}")
    if not 0 <= args.test_seed < 2**31:
        raise ValueError(f"--test-seed must be in [0, 2**31), got {args.test_seed}")
    return MultiMNISTTask(args.test_pairs, args.test_seed)


RECIPE = Recipe(
    name="multimnist_capsnet",
    description="CapsNet (Sabour et al. 2017) on MultiMNIST pairs with torchcaps.",
    model="capsnet_multimnist",
    dataset="mnist",
    model_kwargs=mnist_capsnet.model_kwargs,
    loss=pair_loss,
    add_arguments=add_arguments,
    runtime_kwargs=mnist_capsnet.RECIPE.runtime_kwargs,
    task=task,
    defaults={"epochs": 15, "batch_size": 128, "lr": 0.001},
)


build_parser, parse_args, run, main = train.entry_points(RECIPE)


if __name__ == "__main__":
    sys.exit(main())
