"""Routing by agreement: Procedure 1 of the CapsNet paper (Sabour, Frosst & Hinton 2017)."""

from __future__ import annotations

from collections.abc import Sequence
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
        prior = None if self.log_prior is None else self.log_prior.to(u.dtype).t()
        args = (self.iterations, self.eps, self.stop_gradient)
        if _fused_backward_pays(u, prior):
            v, c = _RoutingRounds.apply(u, prior, *args)
        else:
            v, c = _rounds(u, prior, *args)
        if c is None:
            c = u.new_full(u.shape[:3], 1.0 / u.shape[1])
        return v, c


def _weighted_sum(c: Tensor, u: Tensor) -> Tensor:
    """``s[m] = sum_i c[m, i] u[m, i]``: c (M, N), u (M, N, D) -> (M, D)."""
    return torch.bmm(c.unsqueeze(1), u).squeeze(1)


def _agreement(u: Tensor, v: Tensor) -> Tensor:
    """``a[m, i] = <u[m, i], v[m]>``: u (M, N, D), v (M, D) -> (M, N)."""
    # (M, 1, D) @ (M, D, N): 4.6x faster on CPU than (M, N, D) @ (M, D, 1) for the paper's
    # DigitCaps chunks (N = 1152, D = 16), same values up to rounding.
    return torch.bmm(v.unsqueeze(1), u.transpose(1, 2)).squeeze(1)


# one round's coupling (B, N_out, N_in) or None (uniform), s and v (B * N_out, D)
_Round = tuple[Tensor | None, Tensor, Tensor]


def _rounds(
    u: Tensor,
    prior: Tensor | None,
    iterations: int,
    eps: float,
    stop_gradient: bool,
    trace: list[_Round] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Procedure 1 on ``u`` (B, N_out, N_in, D) with logits starting at ``prior`` (N_out, N_in).

    Returns v (B, N_out, D) and the last round's coupling (B, N_out, N_in), ``None`` when it
    is uniform (one round, no prior). Differentiable by autograd. ``trace``, if given,
    receives every round's ``(c, s, v)`` (what :class:`_RoutingRounds` saves for backward).
    """
    batch, n_out, n_in, dim = u.shape
    # Flatten (B, N_out) into one batch dimension: both contractions become torch.bmm calls
    # on views, with no broadcast/expand in the autograd graph.
    u3 = u.view(batch * n_out, n_in, dim)
    u3_inner = u3.detach() if stop_gradient else u3
    b = None if prior is None else prior.unsqueeze(0).expand(batch, n_out, n_in)
    c: Tensor | None = None
    v = u.new_empty(0)
    for r in range(iterations):
        last = r == iterations - 1
        uu = u3 if last else u3_inner
        if b is None:
            c = None  # uniform coupling 1 / N_out: a scaled sum over the children
            s = uu.sum(dim=1) * (1.0 / n_out)  # (B*N_out, D)
        else:
            c = torch.softmax(b, dim=1)  # over the parents j
            s = _weighted_sum(c.reshape(batch * n_out, n_in), uu)
        v = squash(s, dim=-1, eps=eps)
        if trace is not None:
            trace.append((c, s, v))
        if not last:
            agreement = _agreement(uu, v).view(batch, n_out, n_in)
            b = agreement if b is None else b + agreement
    return v.view(batch, n_out, dim), c


def _fused_backward_pays(u: Tensor, prior: Tensor | None) -> bool:
    """Whether to route through :class:`_RoutingRounds` (eager code that will be differentiated)."""
    needs_grad = u.requires_grad or (prior is not None and prior.requires_grad)
    return (
        needs_grad
        and torch.is_grad_enabled()
        and not in_graph_capture()
        and not is_functorch_wrapped(u)
        and not (prior is not None and is_functorch_wrapped(prior))
    )


class _RoutingRounds(torch.autograd.Function):
    """:func:`_rounds` with one hand-written backward pass.

    Autograd's backward of the rounds writes one gradient tensor of the size of ``u`` per
    contraction (each as B * N_out outer products) and adds them up. Here the gradient of
    every round's weighted sum and agreement is first reduced to a coefficient per child and
    a vector per parent, and ``grad_u`` is written once, as one batched product of depth
    ``2 * iterations - 1``. A double backward (``create_graph=True``) differentiates
    :func:`_rounds` instead, so higher-order gradients stay exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        prior: Tensor | None,
        iterations: int,
        eps: float,
        stop_gradient: bool,
    ) -> tuple[Tensor, Tensor | None]:
        trace: list[_Round] = []
        v, c = _rounds(u, prior, iterations, eps, stop_gradient, trace)
        cs, ss, vs = zip(*trace, strict=True)
        ctx.set_materialize_grads(False)
        ctx.uniform_first = cs[0] is None
        couplings = [k for k in cs if k is not None]
        ctx.save_for_backward(u, prior, *couplings, *ss, *vs)
        ctx.options = (iterations, eps, stop_gradient)
        return v, c

    @staticmethod
    def backward(
        ctx: Any, grad_v: Tensor | None, grad_c: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        iterations = ctx.options[0]
        u, prior, *rest = ctx.saved_tensors
        nones = (None, None, None)
        if grad_v is None and grad_c is None:
            return (None, None, *nones)
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain rounds
            return _double_backward(u, prior, ctx.options, grad_v, grad_c) + nones
        k = iterations - int(ctx.uniform_first)
        cs: list[Tensor | None] = [None] * int(ctx.uniform_first) + list(rest[:k])
        ss, vs = rest[k : k + iterations], rest[k + iterations :]
        grad_u, grad_b = _rounds_backward(
            u, cs, ss, vs, ctx.options, grad_v, grad_c, need_u=ctx.needs_input_grad[0]
        )
        grad_prior = None
        if ctx.needs_input_grad[1] and grad_b is not None:
            grad_prior = grad_b.sum(dim=0)
        return (grad_u, grad_prior, *nones)


def _rounds_backward(
    u: Tensor,
    cs: list[Tensor | None],
    ss: Sequence[Tensor],
    vs: Sequence[Tensor],
    options: tuple[int, float, bool],
    grad_v: Tensor | None,
    grad_c: Tensor | None,
    *,
    need_u: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The hand-written backward of :func:`_rounds` (see :class:`_RoutingRounds`).

    ``u`` (B, N_out, N_in, D); ``cs``, ``ss``, ``vs``: every round's coupling (B, N_out, N_in)
    or ``None`` (uniform), ``s`` and ``v`` (B * N_out, D), as :func:`_rounds` traces them;
    ``options``: ``(iterations, eps, stop_gradient)``. Returns ``grad_u`` (``None`` unless
    ``need_u``) and the gradient of the first round's logits (B, N_out, N_in), ``None`` when
    no round has a softmax.
    """
    iterations, eps, stop_gradient = options
    batch, n_out, n_in, dim = u.shape
    u3 = u.view(batch * n_out, n_in, dim)
    # grad_u = sum over the terms of (coefficient per child) x (vector per parent).
    child_terms: list[Tensor] = []
    parent_terms: list[Tensor] = []
    grad_b: Tensor | None = None  # total gradient of the next round's logits
    gv = (
        grad_v.reshape(batch * n_out, dim)
        if grad_v is not None
        else u.new_zeros(batch * n_out, dim)
    )
    for r in reversed(range(iterations)):
        last = r == iterations - 1
        inner_grad = last or not stop_gradient
        if not last:
            # b_{r+1} = b_r + a_r with a_r = <u, v_r>: a_r's gradient is grad_b.
            if grad_b is None:
                gv = u.new_zeros(batch * n_out, dim)
            else:
                ga = grad_b.reshape(batch * n_out, n_in)
                if inner_grad:
                    child_terms.append(ga)
                    parent_terms.append(vs[r])
                gv = _weighted_sum(ga, u3)
        gs = _squash_backward(ss[r], gv, eps)
        c = cs[r]
        if inner_grad:
            child_terms.append(
                c.reshape(batch * n_out, n_in)
                if c is not None
                else u.new_full((batch * n_out, n_in), 1.0 / n_out)
            )
            parent_terms.append(gs)
        if c is not None:
            gc = _agreement(u3, gs).view(batch, n_out, n_in)
            if last and grad_c is not None:
                gc = gc + grad_c
            gb = c * (gc - (c * gc).sum(dim=1, keepdim=True))  # softmax over the parents
            grad_b = gb if grad_b is None else gb + grad_b
    grad_u = None
    if need_u:
        coeff = torch.stack(child_terms, dim=-1)  # (B*N_out, N_in, K)
        vecs = torch.stack(parent_terms, dim=1)  # (B*N_out, K, D)
        grad_u = torch.bmm(coeff, vecs).view(batch, n_out, n_in, dim)
    return grad_u, grad_b


def _squash_backward(s: Tensor, grad: Tensor, eps: float) -> Tensor:
    """The gradient of :func:`~torchcaps.squash` (last dim) at ``s`` given the output gradient.

    Written out, not taken from autograd, so that it also runs where autograd records nothing
    (inside the compile operator's backward). It follows squash's own steps backwards, in the
    order autograd takes them, so that it stays finite wherever squash's gradient is (huge
    norms included): ``v = s / d`` with ``d = n + 1 / n`` and ``n = sqrt(|s|^2 + eps)``, ``n``
    constant where squash clamps it.
    """
    n2 = s.square().sum(dim=-1, keepdim=True) + eps
    tiny = torch.finfo(s.dtype).tiny
    n = torch.sqrt(n2.clamp_min(tiny))
    d = n + 1.0 / n
    grad_d = -(grad * s).sum(dim=-1, keepdim=True) / (d * d)
    grad_n = grad_d * (1.0 - 1.0 / (n * n))
    grad_n2 = torch.where(n2 >= tiny, grad_n / (2.0 * n), 0.0)
    return grad / d + s * (2.0 * grad_n2)


def _double_backward(
    u: Tensor,
    prior: Tensor | None,
    options: tuple[int, float, bool],
    grad_v: Tensor | None,
    grad_c: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    inputs = [t for t in (u, prior) if t is not None and t.requires_grad]
    with torch.enable_grad():
        v, c = _rounds(u, prior, *options)
        outs, grads = [v], [grad_v if grad_v is not None else torch.zeros_like(v)]
        if c is not None and c.requires_grad and grad_c is not None:
            outs.append(c)
            grads.append(grad_c)
        got = iter(torch.autograd.grad(outs, inputs, grads, create_graph=True, allow_unused=True))
    grad_u = next(got) if u.requires_grad else None
    grad_prior = next(got) if prior is not None and prior.requires_grad else None
    return grad_u, grad_prior
