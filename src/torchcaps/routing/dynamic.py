"""Routing by agreement: Procedure 1 of the CapsNet paper (Sabour, Frosst & Hinton 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchcaps._checks import (
    check_float,
    check_int,
    float32_compute,
    in_graph_capture,
    is_functorch_wrapped,
    no_autocast,
)
from torchcaps.functional import squash
from torchcaps.routing.base import Routing

__all__ = ["DynamicRouting"]


class DynamicRouting(Routing):
    r"""Dynamic routing by agreement, exactly as Procedure 1 of the paper.

    From `Sabour et al. 2017 <https://arxiv.org/abs/1710.09829>`_.

    The routing logits start at :math:`b_{ij} = 0` for every example; each of the
    ``iterations`` rounds computes

    .. math::
        c_{ij} = \frac{\exp b_{ij}}{\sum_k \exp b_{ik}}, \qquad
        s_j = \sum_i c_{ij} \hat{u}_{j|i}, \qquad
        v_j = \operatorname{squash}(s_j),

    and, between rounds, :math:`b_{ij} \leftarrow b_{ij} + \hat{u}_{j|i} \cdot v_j`. The softmax
    runs over the *parents* :math:`j`, so each child distributes its output among the parents.
    ``iterations=1`` therefore means uniform coupling :math:`c_{ij} = 1/N_{out}` and no update;
    the paper's best MNIST model uses 3.

    **Gradients.** By default (``stop_gradient=False``, as in the paper's official code)
    gradients flow through every round: through the coupling coefficients into
    :math:`\hat{u}` as well as through the final weighted sum. With ``stop_gradient=True`` the
    rounds before the last see :math:`\hat{u}` detached, so the coupling coefficients are
    treated as constants and gradients reach :math:`\hat{u}` only through the final
    :math:`s_j`, a choice several reimplementations make silently.

    **Learned priors.** ``learned_prior=(N_in, N_out)`` adds a learned parameter ``log_prior``
    (initialised to zero) that the logits start from instead of zero, shared across the batch.
    Some implementations learn such initial logits; the paper does not, so it is off by default.

    Routing runs in float32 (autocast disabled) for half-precision inputs and returns the
    input's dtype.

    Args:
        iterations: number of routing rounds :math:`r \geq 1`.
        stop_gradient: detach :math:`\hat{u}` in the rounds before the last.
        learned_prior: ``(in_capsules, out_capsules)`` to learn the initial logits, or ``None``.
        eps: ``eps`` of :func:`~torchcaps.squash`.
        device: device of ``log_prior``.
        dtype: dtype of ``log_prior``.

    Shape:
        - u_hat: :math:`(B, N_{in}, N_{out}, D_{out})`.
        - Output ``v``: :math:`(B, N_{out}, D_{out})`.
        - Output ``c`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import DynamicRouting
        >>> routing = DynamicRouting(iterations=3)
        >>> v, c = routing(torch.randn(2, 1152, 10, 16), return_coupling=True)
        >>> v.shape, c.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 1152, 10]))
        >>> bool(torch.allclose(c.sum(dim=-1), torch.ones(2, 1152)))
        True
        >>> c1 = DynamicRouting(iterations=1)(torch.randn(2, 6, 4, 8), return_coupling=True)[1]
        >>> bool((c1 == 0.25).all())
        True
    """

    log_prior: Tensor | None

    def __init__(
        self,
        iterations: int = 3,
        *,
        stop_gradient: bool = False,
        learned_prior: tuple[int, int] | None = None,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.iterations = check_int("iterations", iterations, minimum=1, owner="DynamicRouting")
        if not isinstance(stop_gradient, bool):
            raise TypeError(
                f"DynamicRouting: stop_gradient must be a bool, got {type(stop_gradient).__name__}"
            )
        self.stop_gradient = stop_gradient
        self.eps = check_float("eps", eps, minimum=0.0, strict_min=True, owner="DynamicRouting")
        self.log_prior = self._prior_parameter(learned_prior, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset the learned log-prior (if any) to zero, i.e. uniform initial coupling."""
        if self.log_prior is not None:
            nn.init.zeros_(self.log_prior)

    def extra_repr(self) -> str:
        s = f"iterations={self.iterations}"
        if self.stop_gradient:
            s += ", stop_gradient=True"
        if self.log_prior is not None:
            s += f", learned_prior={tuple(self.log_prior.shape)}"
        return s

    def check_input(self, u_hat: Tensor) -> None:
        super().check_input(u_hat)
        self._check_prior_shape(u_hat, self.log_prior)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        x = float32_compute(u_hat)
        with no_autocast(x.device):
            # Work in a (B, N_out, N_in, D) layout: both routing contractions are then plain
            # batched matmuls over contiguous memory. DenseCaps produces u_hat in this memory
            # layout already, so the transpose + contiguous is free there.
            u = x.transpose(1, 2).contiguous()
            v, c = self._route(u)
        return v.to(u_hat.dtype), c.transpose(1, 2).to(u_hat.dtype)

    def _route(self, u: Tensor) -> tuple[Tensor, Tensor]:
        batch, n_out, n_in, dim = u.shape
        # Flatten (B, N_out) into one batch dimension: both contractions become torch.bmm
        # calls on views, with no broadcast/expand in the autograd graph.
        u3 = u.view(batch * n_out, n_in, dim)
        u3_inner = u3.detach() if self.stop_gradient else u3
        weighted_sum, agreement_of = _contractions(u3)
        b: Tensor | None = None  # routing logits, laid out (B, N_out, N_in)
        if self.log_prior is not None:
            prior = self.log_prior.to(u.dtype).t()  # (N_out, N_in)
            b = prior.unsqueeze(0).expand(batch, n_out, n_in)
        c: Tensor | None = None
        v = u.new_empty(0)
        for r in range(self.iterations):
            last = r == self.iterations - 1
            uu = u3 if last else u3_inner
            if b is None:
                c = None  # uniform coupling 1 / N_out: a scaled sum over the children
                s = uu.sum(dim=1) * (1.0 / n_out)  # (B*N_out, D)
            else:
                c = torch.softmax(b, dim=1)  # over the parents j
                s = weighted_sum(c.reshape(batch * n_out, n_in), uu)
            v = squash(s, dim=-1, eps=self.eps)
            if not last:
                agreement = agreement_of(uu, v).view(batch, n_out, n_in)
                b = agreement if b is None else b + agreement
        if c is None:
            c = u.new_full((batch, n_out, n_in), 1.0 / n_out)
        return v.view(batch, n_out, dim), c


# The two contractions of a round, on (M, N, D) predictions u: s = sum_i c_i u_i (c (M, N)) and
# a_i = <u_i, v> (v (M, D)). Both are batched matrix-vector products; torch.bmm's backward
# computes their gradient for u as M outer products (K = 1 matmuls, several times slower than
# the memory traffic they need), so the eager path has its own backward with a broadcast
# product instead. Graph capture and functorch transforms get the plain bmm.
def _bmm_weighted_sum(c: Tensor, u: Tensor) -> Tensor:
    return torch.bmm(c.unsqueeze(1), u).squeeze(1)


def _bmm_agreement(u: Tensor, v: Tensor) -> Tensor:
    return torch.bmm(u, v.unsqueeze(-1)).squeeze(-1)


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, c: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(c, u)
        return _bmm_weighted_sum(c, u)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        c, u = ctx.saved_tensors
        grad_c = _bmm_agreement(u, grad) if ctx.needs_input_grad[0] else None
        grad_u = c.unsqueeze(-1) * grad.unsqueeze(1) if ctx.needs_input_grad[1] else None
        return grad_c, grad_u


class _Agreement(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, u: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(u, v)
        return _bmm_agreement(u, v)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        u, v = ctx.saved_tensors
        grad_u = grad.unsqueeze(-1) * v.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_v = _bmm_weighted_sum(grad, u) if ctx.needs_input_grad[1] else None
        return grad_u, grad_v


def _contractions(u: Tensor) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The (weighted sum, agreement) pair for predictions ``u``: eager or capturable."""
    if in_graph_capture() or is_functorch_wrapped(u) or not torch.is_grad_enabled():
        return _bmm_weighted_sum, _bmm_agreement
    return _WeightedSum.apply, _Agreement.apply
