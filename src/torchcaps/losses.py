"""Losses of capsule networks: :class:`MarginLoss` and :class:`ReconstructionLoss`."""

from __future__ import annotations

from torch import Tensor, nn

from torchcaps._checks import check_choice, check_float
from torchcaps.functional import REDUCTIONS, margin_loss, reconstruction_loss

__all__ = ["MarginLoss", "ReconstructionLoss"]


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
