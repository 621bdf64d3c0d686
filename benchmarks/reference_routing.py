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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_capsnet import DigitCaps


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
