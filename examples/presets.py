"""What differs between the examples: recipes (model, data, loss, augmentation, schedule), and
the flags and losses that several recipes share.

A :class:`Recipe` is one example script's preset: which registered model it trains on which
dataset, with which loss and augmentation (``augment.py``), default hyperparameters and flags of
its own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from augment import Augment, Shift
from torchcaps import MarginLoss, ReconstructionLoss, SpreadLoss, spread_margin
from torchcaps.models import CapsuleOutput

# (output, images, labels) -> scalar loss
LossFn = Callable[[CapsuleOutput, Tensor, Any], Tensor]


class Task(Protocol):
    """A recipe's own batches and evaluation, where they are not plain classification.

    Without a task the harness trains on ``(augment(images[index]), labels[index])`` and
    evaluates the argmax accuracy. A task builds each training batch itself as ``(x, target)``
    (``target`` any object; the loss receives it as ``labels``), says what the model's
    ``forward(x, target)`` receives in training, and evaluates the test split.
    """

    def train_batch(
        self,
        images: Tensor,
        labels: Tensor,
        index: Tensor,
        generator: torch.Generator,
        rank: int,
        world: int,
    ) -> tuple[Tensor, Any]:
        """Training batch ``index`` of the uint8 split: the model's float input and target."""
        ...

    def model_target(self, target: Any) -> Tensor:
        """What the model's ``forward`` receives as ``target`` in training."""
        ...

    def evaluate(
        self,
        ctx: Any,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        memory_format: torch.memory_format,
    ) -> dict[str, float]:
        """``test_loss``, ``test_accuracy``, ``test_errors``, ``test_samples`` and
        ``test_images_per_second`` of the model ``ctx.model`` on the uint8 test split."""
        ...


@dataclass(frozen=True)
class Recipe:
    """One example's preset: what ``train.py`` trains and the defaults of its command line.

    ``add_arguments`` adds the example's own flags to the shared parser; ``model_kwargs`` and
    ``loss`` turn the parsed command line into the model's keyword arguments (stored in every
    checkpoint) and the loss; ``model`` is a registered model name, or a function of the
    command line that returns one; ``augment`` transforms every training batch (on the device)
    into the model's input, ``eval_transform`` (if any) every test batch; ``alt_datasets``
    are the other datasets of the same image shape that ``--dataset`` may pick; ``runtime_kwargs``
    turns the command line into model arguments that change how it
    computes but not its weights (not stored, free to change on ``--resume``); ``task``
    (if any) turns the command line into the :class:`Task` that makes the batches and
    evaluates, in place of ``augment`` and ``eval_transform``.
    """

    name: str
    description: str
    model: str | Callable[[argparse.Namespace], str]
    dataset: str
    model_kwargs: Callable[[argparse.Namespace], dict[str, Any]]
    loss: Callable[[argparse.Namespace], LossFn]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    runtime_kwargs: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    augment: Augment = field(default_factory=lambda: Shift(2))
    eval_transform: Callable[[Tensor], Tensor] | None = None
    alt_datasets: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    task: Callable[[argparse.Namespace], Task] | None = None


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


def add_flag(parser: argparse.ArgumentParser | Any, flag: str, **kwargs: Any) -> None:
    """Add ``--some-flag`` together with its ``--some_flag`` spelling."""
    names = [flag]
    if "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    parser.add_argument(*names, **kwargs)


def add_reconstruction_arguments(p: argparse.ArgumentParser) -> None:
    """``--with-reconstruction``/``--no-reconstruction`` and ``--recon-weight``.

    Shared by the recipes whose model has the masked decoder (``reconstruction`` keyword).
    """
    recon = p.add_mutually_exclusive_group()
    add_flag(
        recon,
        "--with-reconstruction",
        dest="reconstruction",
        action="store_true",
        default=True,
        help="train with the reconstruction decoder (the default)",
    )
    add_flag(
        recon,
        "--no-reconstruction",
        dest="reconstruction",
        action="store_false",
        help="train without the decoder",
    )
    add_flag(
        p,
        "--recon-weight",
        type=float,
        default=0.0005,
        help="weight of the per-image sum of squared pixel errors (the paper's 0.0005)",
    )


def capsule_loss(args: argparse.Namespace) -> CapsuleLoss:
    """Margin loss plus ``--recon-weight`` x the reconstruction loss."""
    if not (args.recon_weight >= 0 and math.isfinite(args.recon_weight)):
        raise ValueError(f"--recon-weight must be >= 0, got {args.recon_weight}")
    return CapsuleLoss(args.recon_weight)


class ScheduledSpreadLoss:
    """The spread loss on the class activations, its margin set from the step number.

    ``schedule="linear"``: from 0.2 to 0.9 over ``ramp_epochs`` epochs, then 0.9;
    ``"authors"``: the authors' sigmoid in the step number. Shared by the EM recipes.
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


def add_em_arguments(
    p: argparse.ArgumentParser, models: dict[str, str], iterations: int, margin_epochs: float
) -> None:
    """``--model`` (a key of ``models``), ``--iterations``, ``--margin-schedule`` and
    ``--margin-epochs``: the flags of the EM recipes, with their defaults."""
    p.add_argument("--model", choices=sorted(models), default="small", help="model size")
    p.add_argument(
        "--iterations", type=int, default=iterations, help="EM iterations in every layer"
    )
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
        default=margin_epochs,
        help="with --margin-schedule linear: epochs over which the margin rises to 0.9",
    )
    add_flag(
        p,
        "--coordinates",
        choices=("receptive_field", "grid"),
        default="receptive_field",
        help="coordinate addition: the children's receptive-field centres (the paper's) or "
        "their grid cells' centres (the runs before 2026-12-07)",
    )


def em_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EM recipes' model arguments (stored in every checkpoint)."""
    return {"routing_iterations": args.iterations, "coordinates": args.coordinates}


def scheduled_spread_loss(args: argparse.Namespace) -> ScheduledSpreadLoss:
    """The EM recipes' loss, from ``--margin-schedule`` and ``--margin-epochs``."""
    return ScheduledSpreadLoss(args.margin_schedule, args.margin_epochs)
