"""Pieces the capsule layers share: the batched predictions and the output grid size."""

from __future__ import annotations

import torch
from torch import Tensor

from torchcaps._checks import float32_compute, no_autocast


def predictions(u: Tensor, weight: Tensor, out_capsules: int, out_dim: int) -> Tensor:
    r"""Prediction vectors :math:`\hat{u}_{j|i} = W_{ij} u_i` of every child for every parent.

    ``u`` (B, N_in, D_in) and ``weight`` (N_in, D_in, N_out * D_out) give (B, N_in, N_out, D_out)
    in one batched matmul over the children, in float32 with autocast off. The result is a
    transposed view of a (B, N_out, N_in, D_out)-contiguous buffer, the layout the routing
    reductions read fastest.
    """
    batch, n_in = u.shape[0], u.shape[1]
    with no_autocast(u.device):
        u32 = float32_compute(u)
        w = weight.to(u32.dtype) if weight.dtype != u32.dtype else weight
        # (N_in, B, D_in) @ (N_in, D_in, N_out*D_out) -> (N_in, B, N_out*D_out)
        pred = torch.bmm(u32.transpose(0, 1), w)
        pred = pred.view(n_in, batch, out_capsules, out_dim)
        return pred.permute(1, 2, 0, 3).contiguous().transpose(1, 2)


def output_size(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a ``kernel_size`` window moved by ``stride``, as for Conv2d."""
    h = (height + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    w = (width + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return h, w
