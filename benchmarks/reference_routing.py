"""Straightforward capsule layers written from the papers' equations: the routing yardsticks.

NOT part of torchcaps; ``bench_routing.py`` compares torchcaps' layers against these. They
are written the way public code typically writes them, as ``reference_capsnet.DigitCaps`` is:
predictions ``u_hat = W @ u`` with ``W`` broadcast over the batch (a (B, N_in, N_out, D_out,
D_in) copy materialised forward and backward), every tensor in the (B, N_in, N_out, D) layout,
reductions by broadcasting and ``sum``.

- :class:`SelfAttentionCaps`: Efficient-CapsNet's routing (Mazzia et al. 2021): agreement of each
  prediction with the sum of its parent's predictions, softmax over the parents, a learned prior
  added after it, ``exp_squash``.
- :class:`InvertedDotProductCaps`: inverted dot-product attention routing (Tsai et al. 2020):
  a uniform first round, then agreement with the layer-normed parents, softmax over the parents.
- :class:`NaiveConvCaps`: convolutional capsules with dynamic routing, all output positions at
  once: ``unfold`` the windows, broadcast one matrix per (kernel position, input type, output
  type) over batch and positions, route everything in one piece (no chunking).
- :func:`naive_em` / :class:`NaiveEM`: EM routing (Hinton et al. 2018, Procedure 1) by
  broadcasting over (B, N_in, N_out, P).
- :class:`NaiveConvEMCaps`: convolutional matrix capsules, ``unfold`` and ``einsum`` votes,
  :func:`naive_em` over every window at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def exp_squash(s: Tensor, dim: int = -1, eps: float = 1e-20) -> Tensor:
    """Efficient-CapsNet's squash: (1 - 1 / (exp(|s|) + eps)) s / (|s| + eps)."""
    norm = s.norm(dim=dim, keepdim=True)
    return (1 - 1 / (torch.exp(norm) + eps)) * s / (norm + eps)


def broadcast_predictions(weight: Tensor, u: Tensor, out_capsules: int) -> Tensor:
    """``u_hat = W @ u``: ``weight`` (1, N_in, N_out, D_out, D_in), ``u`` (B, N_in, D_in)."""
    x = u[:, :, None, :, None].expand(-1, -1, out_capsules, -1, -1)
    return torch.matmul(weight.expand(u.shape[0], -1, -1, -1, -1), x).squeeze(-1)


class SelfAttentionCaps(nn.Module):
    """Dense capsules with self-attention routing and a learned prior ``B`` (N_in, N_out)."""

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int) -> None:
        super().__init__()
        self.out_capsules = out_capsules
        self.W = nn.Parameter(0.01 * torch.randn(1, in_capsules, out_capsules, out_dim, in_dim))
        self.B = nn.Parameter(torch.zeros(in_capsules, out_capsules))

    def forward(self, u: Tensor) -> Tensor:
        u_hat = broadcast_predictions(self.W, u, self.out_capsules)  # (B, N_in, N_out, D)
        total = u_hat.sum(dim=1, keepdim=True)  # S_j
        agreement = (u_hat * total).sum(dim=-1) / math.sqrt(u_hat.shape[-1])  # A_ij
        c = F.softmax(agreement, dim=2) + self.B
        return exp_squash((c.unsqueeze(-1) * u_hat).sum(dim=1))


class InvertedDotProductCaps(nn.Module):
    """Dense capsules with inverted dot-product attention routing and a shared LayerNorm."""

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        iterations: int = 2,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.out_capsules, self.iterations = out_capsules, iterations
        self.W = nn.Parameter(0.01 * torch.randn(1, in_capsules, out_capsules, out_dim, in_dim))
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, u: Tensor) -> Tensor:
        u_hat = broadcast_predictions(self.W, u, self.out_capsules)  # (B, N_in, N_out, D)
        r = torch.full(u_hat.shape[:3], 1.0 / self.out_capsules, device=u.device)
        p = self.norm((r.unsqueeze(-1) * u_hat).sum(dim=1))
        for _ in range(self.iterations - 1):
            a = (p.unsqueeze(1) * u_hat).sum(dim=-1) / math.sqrt(u_hat.shape[-1])
            r = F.softmax(a, dim=2)
            p = self.norm((r.unsqueeze(-1) * u_hat).sum(dim=1))
        return p


class NaiveConvCaps(nn.Module):
    """Convolutional capsules ``(B, N_in, H, W, D_in) -> (B, N_out, H', W', D_out)`` routed by
    dynamic routing at every position, all positions in one piece."""

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        iterations: int = 3,
    ) -> None:
        super().__init__()
        self.k, self.stride, self.padding = kernel_size, stride, padding
        # imported here: reference_capsnet needs torchvision, the rest of this module only torch
        from reference_capsnet import DigitCaps

        children = kernel_size * kernel_size * in_capsules
        # the routing of one position is DigitCaps' over its window's children
        self.route = DigitCaps(children, in_dim, out_capsules, out_dim, iterations=iterations)

    @property
    def W(self) -> Tensor:
        return self.route.W

    def forward(self, inp: Tensor) -> Tensor:
        b, n, _, _, d = inp.shape
        p, k, s = self.padding, self.k, self.stride
        x = F.pad(inp, (0, 0, p, p, p, p)).unfold(2, k, s).unfold(3, k, s)  # (B,N,H',W',D,k,k)
        h_out, w_out = x.shape[2], x.shape[3]
        # children of each position ordered (ky, kx, n), as torchcaps.ConvCaps2d's
        x = x.permute(0, 2, 3, 5, 6, 1, 4).reshape(b * h_out * w_out, k * k * n, d)
        v = self.route(x)  # (B * H' * W', N_out, D_out)
        return v.view(b, h_out, w_out, *v.shape[1:]).permute(0, 3, 1, 2, 4)


def naive_em(
    votes: Tensor,
    acts: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    iterations: int,
    final_lambda: float = 0.01,
    eps: float = 1e-4,
    mass_scale: float | None = 100.0,
) -> tuple[Tensor, Tensor]:
    """EM routing (Procedure 1) by broadcasting over (B, N_in, N_out, P), as public code does."""
    n_in, n_out = votes.shape[1], votes.shape[2]
    r = torch.full(votes.shape[:3], 1.0 / n_out, device=votes.device, dtype=votes.dtype)
    mu = a_out = votes.new_empty(0)
    for t in range(1, iterations + 1):
        lam = final_lambda * (1 - 0.95**t)
        rp = (r * acts[:, :, None]).unsqueeze(-1)  # (B, N_in, N_out, 1)
        mass = rp.sum(dim=1, keepdim=True)  # (B, 1, N_out, 1)
        mu = (rp * votes).sum(dim=1, keepdim=True) / mass.clamp_min(1e-30)
        var = (rp * (votes - mu) ** 2).sum(dim=1, keepdim=True) / mass.clamp_min(1e-30) + eps
        m = mass if mass_scale is None else mass * mass_scale * n_out / n_in
        cost = ((beta_u.view(1, 1, -1, 1) + 0.5 * torch.log(var)) * m).sum(dim=-1)
        logit = lam * (beta_a.view(1, 1, -1) - cost)  # (B, 1, N_out)
        a_out = torch.sigmoid(logit)
        if t < iterations:
            log_p = -((votes - mu) ** 2 / (2 * var)).sum(-1) - 0.5 * torch.log(
                2 * math.pi * var
            ).sum(-1)
            r = torch.softmax(F.logsigmoid(logit) + log_p, dim=2)
    return mu.squeeze(1), a_out.squeeze(1)


class NaiveEM(nn.Module):
    """:func:`naive_em` as a module with learned ``beta_u``, ``beta_a`` (one per parent)."""

    def __init__(self, out_capsules: int, iterations: int = 3) -> None:
        super().__init__()
        self.iterations = iterations
        self.beta_u = nn.Parameter(torch.zeros(out_capsules))
        self.beta_a = nn.Parameter(torch.zeros(out_capsules))

    def forward(self, votes: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
        return naive_em(votes, acts, self.beta_u, self.beta_a, self.iterations)


class NaiveConvEMCaps(nn.Module):
    """Convolutional matrix capsules, every window an independent EM problem (per-window
    normalisation): unfold, votes by ``einsum``, :func:`naive_em` over all windows at once."""

    def __init__(
        self,
        in_capsules: int,
        out_capsules: int,
        kernel_size: int,
        stride: int,
        iterations: int = 3,
    ) -> None:
        super().__init__()
        self.k, self.stride, self.iterations = kernel_size, stride, iterations
        self.W = nn.Parameter(
            0.3 * torch.randn(kernel_size * kernel_size * in_capsules, out_capsules, 4, 4)
        )
        self.beta_u = nn.Parameter(torch.zeros(out_capsules))
        self.beta_a = nn.Parameter(torch.zeros(out_capsules))

    def forward(self, poses: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _, _, _ = poses.shape
        k, s = self.k, self.stride
        p = poses.unfold(2, k, s).unfold(3, k, s)  # (B, N, H', W', 16, k, k)
        a = acts.unfold(2, k, s).unfold(3, k, s)  # (B, N, H', W', k, k)
        h_out, w_out = p.shape[2], p.shape[3]
        p = p.permute(0, 2, 3, 5, 6, 1, 4).reshape(b * h_out * w_out, k * k * n, 4, 4)
        a = a.permute(0, 2, 3, 4, 5, 1).reshape(b * h_out * w_out, k * k * n)
        votes = torch.einsum("rkab,kjbc->rkjac", p, self.W).flatten(-2)  # (R, K, N_out, 16)
        mu, a_out = naive_em(votes, a, self.beta_u, self.beta_a, self.iterations)
        n_out = self.W.shape[1]
        mu = mu.view(b, h_out, w_out, n_out, 16).permute(0, 3, 1, 2, 4)
        return mu, a_out.view(b, h_out, w_out, n_out).permute(0, 3, 1, 2)
