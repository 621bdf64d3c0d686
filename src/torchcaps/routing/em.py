"""EM routing between matrix capsules (Hinton, Sabour & Frosst 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torchcaps._checks import (
    autocast_dtype_out,
    check_float,
    check_int,
    check_shape,
    float32_compute,
    no_autocast,
)
from torchcaps.routing.matrix import MatrixRouting

__all__ = ["EMRouting"]

_LOG_2PI = math.log(2 * math.pi)


class EMRouting(MatrixRouting):
    r"""EM routing: each parent a Gaussian over its children's votes, fitted by EM.

    From `Hinton, Sabour & Frosst 2018 <https://openreview.net/forum?id=HJWLfGWRb>`_ (Matrix
    capsules with EM routing), Procedure 1. With votes :math:`V_{ij}` (:math:`P` components
    :math:`h`), child activations :math:`a_i`, start from :math:`R_{ij} = 1/N_{out}`; for
    :math:`t = 1, \dots, T` with :math:`\lambda_t = \lambda (1 - 0.95^t)`:

    M-step, for every parent :math:`j`:

    .. math::
        R'_{ij} = R_{ij} a_i, \qquad
        \mu_j^h = \frac{\sum_i R'_{ij} V_{ij}^h}{\sum_i R'_{ij}}, \qquad
        (\sigma_j^h)^2 = \frac{\sum_i R'_{ij} (V_{ij}^h - \mu_j^h)^2}{\sum_i R'_{ij}}
        + \epsilon,

    .. math::
        \mathrm{cost}_j^h = (\beta_u + \log \sigma_j^h)\, m_j, \qquad
        a_j = \operatorname{sigmoid}\big(\lambda_t (\beta_a - \textstyle\sum_h
        \mathrm{cost}_j^h)\big);

    E-step (:math:`t < T`), for every child :math:`i`:

    .. math::
        \ln p_{ij} = -\sum_h \frac{(V_{ij}^h - \mu_j^h)^2}{2 (\sigma_j^h)^2}
        - \frac{1}{2} \sum_h \ln\big(2\pi (\sigma_j^h)^2\big), \qquad
        R_{ij} = \operatorname{softmax}_j(\ln a_j + \ln p_{ij}),

    computed in log space. The poses are :math:`\mu_j`, the activations :math:`a_j` of the last
    M-step; ``return_coupling=True`` also returns the :math:`R` that this M-step used, so the
    poses are the :math:`R a`-weighted means of the votes. Gradients flow through every
    iteration. :math:`\beta_u` and :math:`\beta_a` are learned, one value per parent
    (``out_capsules``), zero-initialised.

    The data mass :math:`m_j` in the cost is where this implementation deviates by default:

    - ``mass_scale=100.0`` (default): :math:`m_j = \sum_i R'_{ij} \cdot 100 N_{out} / N_{in}`,
      the mass as if every parent had 100 children on average. The paper's unscaled mass
      grows with the number of children per parent (9 per parent in a 3x3 convolutional layer,
      dozens in a class layer), so with the paper's :math:`\lambda` the sigmoid saturates in
      some layers and stays near 1/2 in others; working reproductions normalise it (IBM's,
      which reaches 95.4% on smallNORB, by this factor; the official code by a per-layer
      :math:`\lambda`).
    - ``mass_scale=None``: :math:`m_j = \sum_i R'_{ij}`, the paper's equation.

    ``beta_a_scale`` :math:`s` reparametrises :math:`\beta_a`: the logit is
    :math:`\lambda_t (s \beta_a - \sum_h \mathrm{cost}_j^h)`. The default, 1, is the paper's
    equation. Because :math:`\lambda_t` is small (about :math:`10^{-3}`), a unit of
    :math:`\beta_a` moves the logit by only :math:`\lambda_t`, so an optimiser's steps barely
    move it; yet it is the only term that sets the activation of a parent that receives no
    mass (:math:`\operatorname{sigmoid}(\lambda_t s \beta_a)`, 1/2 at initialisation). The
    authors' code multiplies its activation bias by 5000 for this reason.

    Degenerate input stays finite, values and gradients: :math:`\epsilon` keeps the variance of
    a parent with identical votes or a single child positive, a parent that receives no mass
    (all children inactive) gets the unweighted mean of its votes, and :math:`\ln a_j` is
    computed as a log-sigmoid.

    Every pass over the votes is one batched matrix product over a buffer that holds, per
    parent, its votes centred on their unweighted mean and their squares: the M-step's means
    and variances are its weighted first and second moments, the E-step's squared distances
    their expansion. When a graph is recorded (and the code is not being compiled), EM runs
    as one autograd function that keeps only that buffer for the backward, which replays the
    iterations on the small tensors and forms the votes' gradient in one product; compiled
    code traces the same iterations as plain operations (double backward is not supported).

    Routing runs in float32 for half-precision input (and with autocast off); the outputs have
    the votes' dtype (float32 under autocast). Activations are not checked to lie in [0, 1]
    (that would synchronise with the device).

    Args:
        out_capsules: number of parents :math:`N_{out}` (the size of :math:`\beta_u, \beta_a`).
        iterations: EM iterations :math:`T`; ``1`` is one M-step from uniform assignments.
        final_lambda: :math:`\lambda`, the inverse temperature the schedule approaches
            (0.01, the authors' value).
        eps: :math:`\epsilon` added to every variance (1e-4: a parent with identical votes or
            a single child has a standard deviation of 0.01, not 0).
        mass_scale: the children per parent that the cost's mass is normalised to, or
            ``None`` for the paper's unnormalised mass (see above).
        beta_a_scale: the factor :math:`s` on :math:`\beta_a` in the logit (see above); 1 is
            the paper's equation.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - votes: :math:`(B, N_{in}, N_{out}, P)`.
        - activations: :math:`(B, N_{in})`.
        - Output ``poses``: :math:`(B, N_{out}, P)`; ``activations``: :math:`(B, N_{out})`.
        - Output ``R`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import EMRouting
        >>> routing = EMRouting(out_capsules=5, iterations=3)
        >>> poses, a, r = routing(torch.randn(2, 32, 5, 16), torch.rand(2, 32), True)
        >>> poses.shape, a.shape, r.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5]), torch.Size([2, 32, 5]))
        >>> bool(((a > 0) & (a < 1)).all()), torch.allclose(r.sum(dim=2), torch.ones(2, 32))
        (True, True)
    """

    def __init__(
        self,
        out_capsules: int,
        iterations: int = 3,
        *,
        final_lambda: float = 0.01,
        eps: float = 1e-4,
        mass_scale: float | None = 100.0,
        beta_a_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "EMRouting"
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        self.iterations = check_int("iterations", iterations, owner=owner)
        self.final_lambda = check_float(
            "final_lambda", final_lambda, minimum=0.0, strict_min=True, owner=owner
        )
        self.eps = check_float("eps", eps, minimum=0.0, strict_min=True, owner=owner)
        self.mass_scale = (
            None
            if mass_scale is None
            else check_float("mass_scale", mass_scale, minimum=0.0, strict_min=True, owner=owner)
        )
        self.beta_a_scale = check_float(
            "beta_a_scale", beta_a_scale, minimum=0.0, strict_min=True, owner=owner
        )
        self.beta_u = nn.Parameter(torch.empty(self.out_capsules, device=device, dtype=dtype))
        self.beta_a = nn.Parameter(torch.empty(self.out_capsules, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def contract_kwargs(cls, in_capsules: int, out_capsules: int, pose_dim: int) -> dict[str, Any]:
        return {"out_capsules": out_capsules}

    def reset_parameters(self) -> None:
        r"""Zero :math:`\beta_u` and :math:`\beta_a`."""
        nn.init.zeros_(self.beta_u)
        nn.init.zeros_(self.beta_a)

    def extra_repr(self) -> str:
        return (
            f"out_capsules={self.out_capsules}, iterations={self.iterations}, "
            f"final_lambda={self.final_lambda}, eps={self.eps}, mass_scale={self.mass_scale}, "
            f"beta_a_scale={self.beta_a_scale}"
        )

    def inverse_temperature(self, t: int) -> float:
        r""":math:`\lambda_t = \lambda (1 - 0.95^t)` of iteration ``t`` (1-based)."""
        return self.final_lambda * (1.0 - 0.95**t)

    def check_input(self, votes: Tensor, activations: Tensor) -> None:
        super().check_input(votes, activations)
        check_shape(
            votes,
            "B N_in N_out P",
            name="votes",
            owner=f"EMRouting(out_capsules={self.out_capsules})",
            N_out=self.out_capsules,
        )

    def route(
        self,
        votes: Tensor,
        activations: Tensor,
        log_normalize: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """EM on validated input; return ``(poses, activations, R)``.

        ``log_normalize`` replaces the E-step's normalisation (a log-softmax over the parents,
        dim 2, of the ``(B, N_in, N_out)`` log posteriors): layers whose children are seen by
        parents at several positions pass one that normalises over all of them.
        """
        out_dtype = autocast_dtype_out(votes)
        with no_autocast(votes.device):
            v = float32_compute(votes)
            a_in = float32_compute(activations).to(v.dtype)
            beta_u, beta_a = self.beta_u.to(v.dtype), self.beta_a.to(v.dtype)
            tracked = torch.is_grad_enabled() and any(
                t.requires_grad for t in (v, a_in, beta_u, beta_a)
            )
            compiling = torch.compiler.is_compiling()
            if tracked and not compiling:
                mu, a_out, r = _EMFunction.apply(v, a_in, beta_u, beta_a, self, log_normalize)
            else:  # no graph, or one that a compiler traces: plain differentiable operations
                x, center = _stacked_votes(v, in_place=not (tracked or compiling))
                mu, a_out, r = self._em(_Passes(x), a_in, beta_u, beta_a, log_normalize)
                mu = mu + center
        return mu.to(out_dtype), a_out.to(out_dtype), r.transpose(1, 2).to(out_dtype)

    def _em(
        self,
        passes: _Passes,
        a_in: Tensor,
        beta_u: Tensor,
        beta_a: Tensor,
        log_normalize: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The iterations on small tensors; every pass over the votes goes through ``passes``.

        Returns the centred means (B, N_out, P), the activations (B, N_out) and R transposed,
        (B, N_out, N_in).
        """
        b, n_in = a_in.shape
        n_out, p = self.out_capsules, passes.pose_dim
        g = b * n_out
        cost_scale = 1.0 if self.mass_scale is None else self.mass_scale * n_out / n_in
        r = a_in.new_full((b, n_out, n_in), 1.0 / n_out)
        m1 = a_out = a_in.new_empty(0)
        for t in range(1, self.iterations + 1):
            weighted = r * a_in.unsqueeze(1)  # R'_ij, transposed
            mass = weighted.sum(dim=2)  # (B, N_out)
            # A parent without mass gets weights 0 (mean 0, its votes' centre), not 0/0.
            coeff = weighted / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(2)
            moments = passes.over_children(coeff.reshape(g, 1, n_in)).view(b, n_out, 2 * p)
            m1, m2 = moments[..., :p], moments[..., p:]
            var = (m2 - m1.square()).clamp_min(0) + self.eps
            log_var = torch.log(var)
            cost = (beta_u.view(1, n_out, 1) + 0.5 * log_var).sum(dim=2) * (mass * cost_scale)
            logit = self.inverse_temperature(t) * (self.beta_a_scale * beta_a.unsqueeze(0) - cost)
            a_out = torch.sigmoid(logit)
            if t == self.iterations:
                break
            # ln p_ij = -sum_h (x - m)^2 w - 1/2 sum_h ln(2 pi var), w = 1 / (2 var): the
            # square expands into one pass with coefficients (-2 m w, w) on (x, x^2).
            w = 0.5 / var
            coeffs = torch.cat([-2.0 * m1 * w, w], dim=2).reshape(g, 1, 2 * p)
            quad = passes.over_components(coeffs).view(b, n_out, n_in)
            const = (m1.square() * w).sum(dim=2) + 0.5 * (log_var + _LOG_2PI).sum(dim=2)
            logits = F.logsigmoid(logit).unsqueeze(2) - quad - const.unsqueeze(2)
            if log_normalize is None:
                r = torch.softmax(logits, dim=1)
            else:
                r = torch.exp(log_normalize(logits.transpose(1, 2))).transpose(1, 2)
        return m1, a_out, r


def _stacked_votes(votes: Tensor, in_place: bool) -> tuple[Tensor, Tensor]:
    """``(X, centre)``: the votes centred per parent and their squares, and the centre.

    ``votes`` (B, N_in, N_out, ...) with any strides, the pose in the trailing dimensions.
    X (2, B * N_out, N_in, P) holds, per parent, its votes centred on their unweighted mean
    (``X[0]``) and their squares (``X[1]``); the centre is that mean, (B, N_out, P).

    Centring keeps the moments small, so E[x^2] - E[x]^2 loses little to cancellation even for
    votes of 1e4; the means, variances and log-densities do not depend on the shift.
    """
    b, n_in, n_out = votes.shape[:3]
    pose = votes.shape[3:]
    p = math.prod(pose)
    vt = votes.transpose(1, 2)  # (B, N_out, N_in, ...), a view
    center = vt.mean(dim=2)
    if in_place:  # one buffer, no intermediate (not differentiable, not traceable)
        stacked = votes.new_empty(2, b, n_out, n_in, p)
        torch.sub(vt, center.unsqueeze(2), out=stacked[0].view(b, n_out, n_in, *pose))
        torch.mul(stacked[0], stacked[0], out=stacked[1])
    else:
        x = (vt - center.unsqueeze(2)).reshape(b, n_out, n_in, p)
        stacked = torch.stack([x, x.square()])
    return stacked.view(2, b * n_out, n_in, p), center.reshape(b, n_out, p)


class _Passes:
    """The two passes of EM over the stacked votes X (2, G, N_in, P), as batched products.

    ``over_children(c)``: (G, 1, N_in) weights -> (G, 1, 2P), the weighted sums of the votes
    and of their squares; ``over_components(s)``: (G, 1, 2P) -> (G, 1, N_in), a weighted sum of
    every vote's components and squared components. Each is one product over both halves.
    """

    def __init__(self, stacked: Tensor) -> None:
        self.x = stacked
        self.pose_dim = stacked.shape[3]

    def over_children(self, c: Tensor) -> Tensor:
        return _children_product(c, self.x)

    def over_components(self, s: Tensor) -> Tensor:
        _, g, n, p = self.x.shape
        halves = s.view(g, 1, 2, p).permute(2, 0, 1, 3).reshape(2 * g, 1, p)
        y = torch.bmm(halves, self.x.view(2 * g, n, p).transpose(1, 2)).view(2, g, 1, n)
        return y[0] + y[1]


def _children_product(c: Tensor, x: Tensor) -> Tensor:
    """``[c X[0], c X[1]]``: (G, 1, N) weights on the two halves of ``x`` -> (G, 1, 2P)."""
    _, g, n, p = x.shape
    y = torch.bmm(c.expand(2, g, 1, n).reshape(2 * g, 1, n), x.view(2 * g, n, p))
    return y.view(2, g, 1, p).permute(1, 2, 0, 3).reshape(g, 1, 2 * p)


class _RecordedPasses(_Passes):
    """Passes that keep their results, for :class:`_EMFunction`'s backward to replay."""

    def __init__(self, stacked: Tensor) -> None:
        super().__init__(stacked)
        self.results: list[Tensor] = []

    def over_children(self, c: Tensor) -> Tensor:
        self.results.append(super().over_children(c))
        return self.results[-1]

    def over_components(self, s: Tensor) -> Tensor:
        self.results.append(super().over_components(s))
        return self.results[-1]


class _ReplayedPasses(_Passes):
    """The recorded results again, as autograd nodes of their small operands.

    The backward of each passes over X once for its small operand's gradient and leaves X's
    share as an outer product ``column (G, N_in, 1) row (G, 1, 2P)``; :meth:`grad_votes` sums
    them in one batched product.
    """

    def __init__(self, stacked: Tensor, results: list[Tensor]) -> None:
        super().__init__(stacked)
        self.results = iter(results)
        self.columns: list[Tensor] = []
        self.rows: list[Tensor] = []

    def over_children(self, c: Tensor) -> Tensor:
        return _Pass.apply(c, self, True, next(self.results))

    def over_components(self, s: Tensor) -> Tensor:
        return _Pass.apply(s, self, False, next(self.results))

    def grad_votes(self, reuse: bool) -> Tensor:
        """The gradient of the centred votes x, (G, N_in, P), from those of x and x^2.

        d/dx = D_1 + 2 x D_2 with D = (columns) @ (rows). With ``reuse`` (the graph will not
        be run again) it is formed in the buffer of x^2, which nothing needs any more.
        """
        x, x2 = self.x[0], self.x[1]
        if not self.columns:
            return torch.zeros_like(x)
        col = torch.cat(self.columns, dim=2)
        row = torch.cat(self.rows, dim=1)
        p = x.shape[2]
        d1, d2 = row[..., :p], row[..., p:]
        out = x2 if reuse else torch.empty_like(x2)
        torch.bmm(col, d2.contiguous(), out=out)
        out.mul_(x)
        return out.baddbmm_(col, d1, beta=2.0)


class _Pass(torch.autograd.Function):
    """A recorded pass ``y = c X`` (``over_children``) or ``y = s X^T``.

    Differentiable in the small operand; X's share of the gradient is left with the passes.
    """

    @staticmethod
    def forward(
        ctx: Any, small: Tensor, passes: _ReplayedPasses, over_children: bool, result: Tensor
    ) -> Tensor:
        ctx.save_for_backward(small)
        ctx.passes, ctx.over_children = passes, over_children
        return result.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        # detached: the factors kept for X's gradient must not hold the replayed graph (a
        # reference cycle through the passes object that nothing would collect)
        small = ctx.saved_tensors[0].detach()
        passes: _ReplayedPasses = ctx.passes
        if ctx.over_children:  # y = c X: dc = g X^T, dX = c^T g
            d_small = _Passes.over_components(passes, grad)
            passes.columns.append(small.transpose(1, 2))
            passes.rows.append(grad)
        else:  # y = s X^T: ds = g X, dX = g^T s
            d_small = _children_product(grad, passes.x)
            passes.columns.append(grad.transpose(1, 2))
            passes.rows.append(small)
        return d_small, None, None, None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if unknown."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


class _EMFunction(torch.autograd.Function):
    """EM routing with a backward that never keeps more than the stacked votes.

    The forward runs without a graph and records its passes over the votes; the backward
    replays the iterations on the small tensors with autograd, the recorded passes standing in
    for the big products, and assembles the votes' gradient once (in the buffer of the
    squared votes, unless the graph is retained).
    """

    @staticmethod
    def forward(
        ctx: Any,
        votes: Tensor,
        a_in: Tensor,
        beta_u: Tensor,
        beta_a: Tensor,
        routing: EMRouting,
        log_normalize: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        stacked, center = _stacked_votes(votes, in_place=True)
        passes = _RecordedPasses(stacked)
        m1, a_out, r = routing._em(passes, a_in, beta_u, beta_a, log_normalize)
        # Saved, not kept as attributes: the buffer is freed when the backward has run.
        ctx.save_for_backward(a_in, beta_u, beta_a, stacked, *passes.results)
        ctx.routing, ctx.log_normalize = routing, log_normalize
        ctx.votes_shape = votes.shape
        return m1 + center, a_out, r

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_mu: Tensor | None, g_a: Tensor | None, g_r: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        a_in, beta_u, beta_a, stacked_votes, *results = ctx.saved_tensors
        b, n_in, n_out = ctx.votes_shape[:3]
        need_votes = ctx.needs_input_grad[0]
        passes = _ReplayedPasses(stacked_votes, results)
        # Every leaf requires grad, so that every pass is in the replayed graph (X's gradient
        # comes from their backward); the gradients of inputs that need none are dropped.
        leaves = [t.detach().requires_grad_(True) for t in (a_in, beta_u, beta_a)]
        with torch.enable_grad():
            m1, a_out, r = ctx.routing._em(passes, *leaves, ctx.log_normalize)
            pairs = [
                (o, g)
                for o, g in ((m1, g_mu), (a_out, g_a), (r, g_r))
                if g is not None and o.requires_grad
            ]
            found = torch.autograd.grad(
                [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True
            )
        grads = [g if need else None for g, need in zip(found, ctx.needs_input_grad[1:4])]
        if not need_votes:
            return (None, *grads, None, None)
        grad = passes.grad_votes(reuse=not _graph_kept()).view(b, n_out, n_in, -1)
        # x = v - centre and mu = m + centre, with centre the unweighted mean over children
        shift = -grad.sum(dim=2)
        if g_mu is not None:
            shift = shift + g_mu
        grad.add_(shift.unsqueeze(2), alpha=1.0 / n_in)
        return (grad.transpose(1, 2).view(ctx.votes_shape), *grads, None, None)
