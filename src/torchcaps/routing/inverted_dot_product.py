"""Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov 2020)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import check_float, check_int, check_shape, float32_compute, no_autocast
from torchcaps.routing.base import Routing

__all__ = ["InvertedDotProductRouting"]


class InvertedDotProductRouting(Routing):
    r"""Inverted dot-product attention routing: parents compete for each child, layer-normed.

    From `Tsai et al. 2020 <https://arxiv.org/abs/2002.04764>`_ (Procedure 1, with the
    :math:`1/\sqrt{D}` scale of the official code). The first round couples uniformly,

    .. math::
        r_{ij} = \frac{1}{N_{out}}, \qquad
        p_j = \operatorname{LN}\Big(\sum_i r_{ij} \hat{u}_{j|i}\Big),

    and each further round computes

    .. math::
        a_{ij} = \frac{\langle p_j, \hat{u}_{j|i} \rangle}{\sqrt{D}}, \qquad
        r_{ij} = \operatorname{softmax}_j(a_{ij}), \qquad
        p_j = \operatorname{LN}\Big(\sum_i r_{ij} \hat{u}_{j|i}\Big).

    :math:`\operatorname{LN}` is one learned :class:`torch.nn.LayerNorm` over the ``out_dim``
    dimensions (affine, weight 1 and bias 0 at initialisation), shared by all parents. The
    outputs :math:`p_j` are not squashed (see :attr:`squashes_output`): their lengths are not
    probabilities, so a classifier on top needs its own head (the paper uses a linear layer and
    cross-entropy). ``iterations=1`` is uniform routing. ``return_coupling=True`` returns the
    :math:`r` of the last round. Routing runs in float32 for half-precision input and returns
    the input's dtype.

    Args:
        out_dim: capsule dimension :math:`D` of the predictions (the layer norm's size).
        iterations: rounds :math:`\geq 1`, the first one uniform.
        eps: ``eps`` of the layer norm.
        device: device of the layer norm's parameters.
        dtype: dtype of the layer norm's parameters.

    Shape:
        - u_hat: :math:`(B, N_{in}, N_{out}, D)` with :math:`D` = ``out_dim``.
        - Output ``p``: :math:`(B, N_{out}, D)`.
        - Output ``r`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import InvertedDotProductRouting
        >>> routing = InvertedDotProductRouting(16, iterations=2)
        >>> p, r = routing(torch.randn(2, 32, 10, 16), return_coupling=True)
        >>> p.shape, r.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 32, 10]))
        >>> bool(torch.allclose(p.mean(dim=-1), torch.zeros(2, 10), atol=1e-5))  # layer-normed
        True
    """

    squashes_output = False

    def __init__(
        self,
        out_dim: int,
        iterations: int = 2,
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "InvertedDotProductRouting"
        self.out_dim = check_int("out_dim", out_dim, owner=owner)
        self.iterations = check_int("iterations", iterations, minimum=1, owner=owner)
        self.eps = check_float("eps", eps, minimum=0.0, strict_min=True, owner=owner)
        self.norm = nn.LayerNorm(out_dim, eps=self.eps, device=device, dtype=dtype)

    @classmethod
    def contract_kwargs(cls, in_capsules: int, out_capsules: int, dim: int) -> dict[str, Any]:
        return {"out_dim": dim}

    def reset_parameters(self) -> None:
        """Reset the layer norm to weight 1, bias 0."""
        self.norm.reset_parameters()

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, iterations={self.iterations}, eps={self.eps}"

    def check_input(self, u_hat: Tensor) -> None:
        super().check_input(u_hat)
        check_shape(
            u_hat, "B N_in N_out D", name="u_hat", owner="InvertedDotProductRouting", D=self.out_dim
        )

    def _layer_norm(self, s: Tensor) -> Tensor:
        weight, bias = self.norm.weight, self.norm.bias
        return F.layer_norm(s, (self.out_dim,), weight.to(s.dtype), bias.to(s.dtype), eps=self.eps)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        x = float32_compute(u_hat)
        with no_autocast(x.device):
            batch, n_in, n_out, dim = x.shape
            r = x.new_full((batch, n_in, n_out), 1.0 / n_out)
            p = self._layer_norm(x.sum(dim=1) * (1.0 / n_out))  # (B, N_out, D)
            for _ in range(self.iterations - 1):
                agreement = (x * p.unsqueeze(1)).sum(dim=-1) * (1.0 / math.sqrt(dim))
                r = torch.softmax(agreement, dim=2)  # over the parents j
                p = self._layer_norm((r.unsqueeze(-1) * x).sum(dim=1))
        return p.to(u_hat.dtype), r.to(u_hat.dtype)
