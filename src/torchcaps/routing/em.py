"""EM routing between matrix capsules (Hinton, Sabour & Frosst 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    Degenerate input stays finite, values and gradients: :math:`\epsilon` keeps the variance of
    a parent with identical votes or a single child positive, a parent that receives no mass
    (all children inactive) gets the unweighted mean of its votes, and :math:`\ln a_j` is
    computed as a log-sigmoid. Every pass over the votes is a batched matrix product: the
    variances come from the weighted first and second moments of the votes centred on each
    parent's unweighted mean, and the E-step's squared distances from their expansion.
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
            f"final_lambda={self.final_lambda}, eps={self.eps}, mass_scale={self.mass_scale}"
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
            b, n_in, n_out, p = v.shape
            # Every pass over the votes is a batched matrix-vector product in a (B, N_out, P,
            # N_in) layout: the weighted moments of x and x^2 (computed once) give the means and
            # variances, and the E-step's squared distances expand into two products. x is the
            # votes centred on each parent's unweighted mean, which keeps the moments small
            # (E[x^2] - E[x]^2 then loses little to cancellation, even for votes of 1e4).
            vt = v.permute(0, 2, 3, 1)  # (B, N_out, P, N_in)
            center = vt.mean(dim=3)  # (B, N_out, P)
            x = (vt - center.unsqueeze(3)).contiguous().view(b * n_out, p, n_in)
            x2 = x.square()
            r = v.new_full((b, n_out, n_in), 1.0 / n_out)  # R, transposed
            mu = log_a = a_out = v.new_empty(0)
            for t in range(1, self.iterations + 1):
                m1, var, a_out, log_a = self._m_step(x, x2, a_in, r, self.inverse_temperature(t))
                mu = m1 + center
                if t < self.iterations:
                    logits = log_a.unsqueeze(2) + self._log_p(x, x2, m1, var)  # (B, N_out, N_in)
                    if log_normalize is None:
                        r = torch.softmax(logits, dim=1)
                    else:
                        r = torch.exp(log_normalize(logits.transpose(1, 2))).transpose(1, 2)
        return mu.to(out_dtype), a_out.to(out_dtype), r.transpose(1, 2).to(out_dtype)

    def _m_step(
        self, x: Tensor, x2: Tensor, a_in: Tensor, r: Tensor, lam: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Centred means, variances, activations and log-activations of the parents.

        ``x``, ``x2``: (B * N_out, P, N_in) centred votes and their squares; ``r`` (B, N_out,
        N_in). Returns means (of ``x``) and variances (B, N_out, P), activations (B, N_out).
        """
        b, n_out, n_in = r.shape
        weighted = r * a_in.unsqueeze(1)  # R'_ij
        mass = weighted.sum(dim=2)  # (B, N_out)
        # A parent without mass gets weights 0 (mean 0), not 0/0.
        coeff = weighted / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(2)
        c = coeff.reshape(b * n_out, n_in, 1)
        m1 = torch.bmm(x, c).view(b, n_out, -1)
        m2 = torch.bmm(x2, c).view(b, n_out, -1)
        var = (m2 - m1.square()).clamp_min(0) + self.eps
        cost_mass = mass if self.mass_scale is None else mass * (self.mass_scale * n_out / n_in)
        beta_u = self.beta_u.to(x.dtype).view(1, n_out, 1)
        cost = (beta_u + 0.5 * torch.log(var)).sum(dim=2) * cost_mass  # sum over h
        logit = lam * (self.beta_a.to(x.dtype).unsqueeze(0) - cost)
        return m1, var, torch.sigmoid(logit), F.logsigmoid(logit)

    @staticmethod
    def _log_p(x: Tensor, x2: Tensor, m1: Tensor, var: Tensor) -> Tensor:
        r"""Log-density of every vote under its parent's diagonal Gaussian, (B, N_out, N_in).

        :math:`\sum_h (x - m)^2 / (2 \sigma^2)` as :math:`x^2 \cdot w - x \cdot (2 m w) +
        m^2 \cdot w` with :math:`w = 1 / (2 \sigma^2)`: two matrix-vector products.
        """
        b, n_out, p = m1.shape
        w = 0.5 / var  # (B, N_out, P)
        quad = torch.bmm(w.view(b * n_out, 1, p), x2) - torch.bmm(
            (2 * m1 * w).view(b * n_out, 1, p), x
        )
        quad = quad.view(b, n_out, -1) + (m1.square() * w).sum(dim=2, keepdim=True)
        log_norm = 0.5 * (torch.log(var) + _LOG_2PI).sum(dim=2, keepdim=True)  # (B, N_out, 1)
        return -quad - log_norm
