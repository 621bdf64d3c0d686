"""Float64 references written directly from the paper's equations (no torchcaps code)."""

from __future__ import annotations

import math

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


def exp_squash_ref(s: Tensor, eps: float = 1e-20) -> Tensor:
    """Efficient-CapsNet's squash literally, per vector of the last dimension (float64)."""
    flat = s.reshape(-1, s.shape[-1]).double()
    out = torch.zeros_like(flat)
    for k in range(flat.shape[0]):
        n = float(torch.sqrt((flat[k] * flat[k]).sum()))
        # e^n overflows a double beyond n ~ 709; there 1 / e^n is 0 to double precision anyway
        out[k] = (1 - 1 / (math.exp(min(n, 700.0)) + eps)) * flat[k] / (n + eps)
    return out.reshape(s.shape)


def self_attention_ref(u_hat: Tensor, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Self-attention routing of Efficient-CapsNet with explicit loops (float64, slow).

    A_ij is the row sum of parent j's N_in x N_in self-attention matrix, built here as that
    matrix on purpose (the library never builds it).
    """
    batch, n_in, n_out, dim = u_hat.shape
    v = torch.zeros(batch, n_out, dim, dtype=torch.float64)
    weights = torch.zeros(batch, n_in, n_out, dtype=torch.float64)
    for b in range(batch):
        logits = torch.zeros(n_in, n_out, dtype=torch.float64)
        for j in range(n_out):
            attention = torch.zeros(n_in, n_in, dtype=torch.float64)
            for i in range(n_in):
                for k in range(n_in):
                    attention[i, k] = torch.dot(u_hat[b, i, j], u_hat[b, k, j])
            for i in range(n_in):
                logits[i, j] = attention[i].sum() / math.sqrt(dim)
        for i in range(n_in):
            e = [math.exp(float(logits[i, j])) for j in range(n_out)]
            for j in range(n_out):
                weights[b, i, j] = e[j] / sum(e) + (0.0 if prior is None else float(prior[i, j]))
        for j in range(n_out):
            s_j = sum(weights[b, i, j] * u_hat[b, i, j] for i in range(n_in))
            v[b, j] = exp_squash_ref(s_j)
    return v, weights


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean) / sqrt(biased variance + eps) * weight + bias, for one vector."""
    mean = x.sum() / x.numel()
    var = ((x - mean) ** 2).sum() / x.numel()
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def inverted_dot_product_ref(
    u_hat: Tensor, iterations: int, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Inverted dot-product attention routing (Tsai et al. 2020) with explicit loops."""
    batch, n_in, n_out, dim = u_hat.shape
    p = torch.zeros(batch, n_out, dim, dtype=torch.float64)
    r = torch.zeros(batch, n_in, n_out, dtype=torch.float64)
    w, bb = weight.double(), bias.double()
    for b in range(batch):
        r_b = torch.full((n_in, n_out), 1.0 / n_out, dtype=torch.float64)
        for t in range(iterations):
            if t > 0:
                for i in range(n_in):
                    a = [
                        float(torch.dot(p[b, j], u_hat[b, i, j])) / math.sqrt(dim)
                        for j in range(n_out)
                    ]
                    e = [math.exp(x) for x in a]
                    for j in range(n_out):
                        r_b[i, j] = e[j] / sum(e)
            for j in range(n_out):
                s_j = sum(r_b[i, j] * u_hat[b, i, j] for i in range(n_in))
                p[b, j] = layer_norm_ref(s_j, w, bb, eps)
        r[b] = r_b
    return p, r


def em_routing_ref(
    votes: Tensor,
    acts: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    iterations: int,
    final_lambda: float = 0.01,
    eps: float = 1e-4,
    mass_scale: float | None = 100.0,
    beta_a_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing (Hinton et al. 2018, Procedure 1) with explicit loops over b, i, j, h (float64).

    The cost's mass is sum_i R'_ij, times mass_scale * N_out / N_in unless mass_scale is None;
    the activation logit is lambda_t (beta_a_scale * beta_a_j - cost_j).
    Returns (poses (B, N_out, P), activations (B, N_out), the R of the last M-step).
    """
    votes, acts = votes.double(), acts.double()
    b_size, n_in, n_out, p = votes.shape
    poses = torch.zeros(b_size, n_out, p, dtype=torch.float64)
    a_out = torch.zeros(b_size, n_out, dtype=torch.float64)
    r_last = torch.zeros(b_size, n_in, n_out, dtype=torch.float64)
    for b in range(b_size):
        r = [[1.0 / n_out] * n_out for _ in range(n_in)]
        for t in range(1, iterations + 1):
            lam = final_lambda * (1 - 0.95**t)
            mu = [[0.0] * p for _ in range(n_out)]
            var = [[0.0] * p for _ in range(n_out)]
            a = [0.0] * n_out
            for j in range(n_out):
                w = [r[i][j] * float(acts[b, i]) for i in range(n_in)]  # R'_ij
                mass = sum(w)
                for h in range(p):
                    if mass > 0:
                        mu[j][h] = sum(w[i] * float(votes[b, i, j, h]) for i in range(n_in)) / mass
                        var[j][h] = (
                            sum(
                                w[i] * (float(votes[b, i, j, h]) - mu[j][h]) ** 2
                                for i in range(n_in)
                            )
                            / mass
                        )
                    var[j][h] += eps
                m = mass if mass_scale is None else mass * mass_scale * n_out / n_in
                cost = sum((float(beta_u[j]) + 0.5 * math.log(var[j][h])) * m for h in range(p))
                a[j] = 1 / (1 + math.exp(-lam * (beta_a_scale * float(beta_a[j]) - cost)))
            for i in range(n_in):
                for j in range(n_out):
                    r_last[b, i, j] = r[i][j]
            if t < iterations:  # E-step
                for i in range(n_in):
                    logits = []
                    for j in range(n_out):
                        log_p = sum(
                            -((float(votes[b, i, j, h]) - mu[j][h]) ** 2) / (2 * var[j][h])
                            - 0.5 * math.log(2 * math.pi * var[j][h])
                            for h in range(p)
                        )
                        logits.append(math.log(a[j]) + log_p)
                    top = max(logits)
                    z = sum(math.exp(x - top) for x in logits)
                    r[i] = [math.exp(x - top) / z for x in logits]
        poses[b] = torch.tensor(mu, dtype=torch.float64)
        a_out[b] = torch.tensor(a, dtype=torch.float64)
    return poses, a_out, r_last
