"""Losses of capsule networks: margin, reconstruction and spread loss (and its margin schedule)."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from torchcaps._checks import check_choice, check_float, check_int
from torchcaps.functional import REDUCTIONS, margin_loss, reconstruction_loss, spread_loss

__all__ = ["MarginLoss", "ReconstructionLoss", "SpreadLoss", "spread_margin"]


class MarginLoss(nn.Module):
    r"""Margin loss on capsule lengths, equation 4 of the paper.

    See :func:`torchcaps.functional.margin_loss` and
    `Sabour et al. 2017 <https://arxiv.org/abs/1710.09829>`_.

    .. math::
        L = \sum_k T_k \max(0, m^+ - \ell_k)^2
            + \lambda (1 - T_k) \max(0, \ell_k - m^-)^2

    Args:
        m_pos: margin :math:`m^+` (0.9 in the paper).
        m_neg: margin :math:`m^-` (0.1 in the paper).
        lambda_: weight :math:`\lambda` of absent classes (0.5 in the paper).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.

    Shape:
        - lengths: :math:`(B, K)`.
        - target: :math:`(B,)` class indices, or :math:`(B, K)` multi-hot {0, 1}.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps import MarginLoss
        >>> loss = MarginLoss()
        >>> lengths = torch.tensor([[0.95, 0.05, 0.05], [0.2, 0.9, 0.1]])
        >>> loss(lengths, torch.tensor([0, 1]))  # only sample 2's class 0 costs: 0.5 * 0.1**2 / 2
        tensor(0.0025)
        >>> loss(lengths, torch.tensor([[1, 0, 0], [1, 1, 0]]))  # multi-hot: 0.7**2 / 2
        tensor(0.2450)
    """

    def __init__(
        self, m_pos: float = 0.9, m_neg: float = 0.1, lambda_: float = 0.5, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.m_pos = check_float("m_pos", m_pos, owner="MarginLoss")
        self.m_neg = check_float("m_neg", m_neg, owner="MarginLoss")
        self.lambda_ = check_float("lambda_", lambda_, minimum=0.0, owner="MarginLoss")
        self.reduction = check_choice("reduction", reduction, REDUCTIONS, owner="MarginLoss")

    def extra_repr(self) -> str:
        return (
            f"m_pos={self.m_pos}, m_neg={self.m_neg}, lambda_={self.lambda_}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, lengths: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of ``lengths`` against ``target``."""
        return margin_loss(lengths, target, self.m_pos, self.m_neg, self.lambda_, self.reduction)


class ReconstructionLoss(nn.Module):
    r"""Weighted per-image sum of squared errors (the paper's reconstruction loss).

    See :func:`torchcaps.functional.reconstruction_loss`.

    .. math::
        L_{rec} = w \sum_p (\hat{x}_p - x_p)^2

    Args:
        weight: :math:`w`; the paper's 0.0005 by default.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.

    Shape:
        - reconstruction: :math:`(B, *)`.
        - target: :math:`(B, *)`, same shape.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps import ReconstructionLoss
        >>> ReconstructionLoss()(torch.full((4, 1, 28, 28), 0.5), torch.zeros(4, 1, 28, 28))
        tensor(0.0980)
    """

    def __init__(self, weight: float = 0.0005, reduction: str = "mean") -> None:
        super().__init__()
        self.weight = check_float("weight", weight, minimum=0.0, owner="ReconstructionLoss")
        self.reduction = check_choice(
            "reduction", reduction, REDUCTIONS, owner="ReconstructionLoss"
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Compute the weighted reconstruction error."""
        return reconstruction_loss(reconstruction, target, self.weight, self.reduction)


class SpreadLoss(nn.Module):
    r"""Spread loss on class activations (Hinton et al. 2018), for matrix capsules.

    See :func:`torchcaps.functional.spread_loss`:

    .. math::
        L = \sum_{i \ne t} \max\big(0, m - (a_t - a_i)\big)^2

    ``margin`` is a plain attribute, to be raised during training (the paper: linearly from
    0.2 to 0.9), e.g. ``loss.margin = spread_margin(step, total_steps)``.

    Args:
        margin: :math:`m`.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.

    Shape:
        - activations: :math:`(B, K)`.
        - target: :math:`(B,)` class indices.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps import SpreadLoss, spread_margin
        >>> loss = SpreadLoss()
        >>> a = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.5, 0.4]])
        >>> loss(a, torch.tensor([0, 1]))  # (0.1**2 + 0.1**2) / 2
        tensor(0.0100)
        >>> loss.margin = spread_margin(500, total_steps=1000)  # halfway: 0.55
        >>> round(loss.margin, 2)
        0.55
    """

    def __init__(self, margin: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = check_float("margin", margin, owner="SpreadLoss")
        self.reduction = check_choice("reduction", reduction, REDUCTIONS, owner="SpreadLoss")

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"

    def forward(self, activations: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of ``activations`` against ``target`` at the current margin."""
        return spread_loss(activations, target, self.margin, self.reduction)


def spread_margin(
    step: int,
    total_steps: int | None = None,
    *,
    schedule: Literal["linear", "authors"] = "linear",
    start: float = 0.2,
    end: float = 0.9,
) -> float:
    r"""The spread loss margin after ``step`` training steps.

    - ``"linear"`` (the paper's text): from ``start`` to ``end`` over ``total_steps``, then held:
      :math:`m = m_0 + (m_1 - m_0) \min(1, \text{step} / \text{total})`.
    - ``"authors"`` (the authors' schedule, quoted in IBM's reproduction, for batches of 64):
      :math:`m = 0.2 + 0.79\, \operatorname{sigmoid}(\min(10, \text{step} / 50000 - 4))`;
      ``total_steps``, ``start`` and ``end`` are not used.

    Examples:
        >>> from torchcaps import spread_margin
        >>> spread_margin(0, 100), spread_margin(100, 100), spread_margin(300, 100)
        (0.2, 0.9, 0.9)
        >>> round(spread_margin(200_000, schedule="authors"), 3)
        0.595
    """
    owner = "spread_margin"
    step = check_int("step", step, minimum=0, owner=owner)
    check_choice("schedule", schedule, ("linear", "authors"), owner=owner)
    if schedule == "authors":
        return 0.2 + 0.79 / (1.0 + math.exp(-min(10.0, step / 50_000 - 4.0)))
    if total_steps is None:
        raise TypeError(f"{owner}: the linear schedule needs total_steps")
    total = check_int("total_steps", total_steps, owner=owner)
    start = check_float("start", start, owner=owner)
    end = check_float("end", end, owner=owner)
    f = min(1.0, step / total)
    return (1.0 - f) * start + f * end  # exactly start and end at the ends
