"""Float64 references written directly from the paper's equations (no torchcaps code)."""

from __future__ import annotations

import torch
from torch import Tensor


def squash_ref(s: Tensor, dim: int = -1) -> Tensor:
    """Eq. 1 literally: |s|^2 / (1 + |s|^2) * s / |s| (undefined at s = 0)."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return n2 / (1 + n2) * s / n2.sqrt()


def routing_ref(
    u_hat: Tensor, iterations: int, prior: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Procedure 1 with explicit loops over children i and parents j (float64, slow)."""
    batch, n_in, n_out, dim = u_hat.shape
    v = torch.zeros(batch, n_out, dim, dtype=torch.float64)
    c = torch.zeros(batch, n_in, n_out, dtype=torch.float64)
    for bi in range(batch):
        b = (
            torch.zeros(n_in, n_out, dtype=torch.float64)
            if prior is None
            else prior.double().clone()
        )
        for r in range(iterations):
            c_b = torch.softmax(b, dim=1)  # over parents j for each child i
            for j in range(n_out):
                s_j = sum(c_b[i, j] * u_hat[bi, i, j] for i in range(n_in))
                v[bi, j] = squash_ref(s_j)
            if r < iterations - 1:
                for i in range(n_in):
                    for j in range(n_out):
                        b[i, j] = b[i, j] + torch.dot(u_hat[bi, i, j], v[bi, j])
        c[bi] = c_b
    return v, c


def margin_ref(
    lengths: Tensor, t: Tensor, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5
) -> Tensor:
    """Per-sample margin loss with loops over classes; t is multi-hot (B, K)."""
    out = torch.zeros(lengths.shape[0], dtype=torch.float64)
    for b in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            l = float(lengths[b, k])
            tk = float(t[b, k])
            out[b] += tk * max(0.0, m_pos - l) ** 2 + lam * (1 - tk) * max(0.0, l - m_neg) ** 2
    return out
