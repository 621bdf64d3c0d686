"""Pieces the capsule layers share: predictions, capsule windows, grid sizes, routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import float32_compute, no_autocast


def predictions(
    u: Tensor, weight: Tensor, out_capsules: int, out_dim: int, out: Tensor | None = None
) -> Tensor:
    r"""Prediction vectors :math:`\hat{u}_{j|i} = W_{ij} u_i` of every child for every parent.

    ``u`` (B, N_in, D_in) and ``weight`` (N_in, D_in, N_out * D_out) give (B, N_in, N_out, D_out)
    in one batched matmul over the children, in float32 with autocast off. The result is a
    transposed view of a (B, N_out, N_in, D_out)-contiguous buffer, the layout the routing
    reductions read fastest: ``out``, a float32 (B, N_out, N_in, D_out) tensor, if given.
    """
    batch, n_in = u.shape[0], u.shape[1]
    with no_autocast(u.device):
        u32 = float32_compute(u)
        w = weight.to(u32.dtype) if weight.dtype != u32.dtype else weight
        # (N_in, B, D_in) @ (N_in, D_in, N_out*D_out) -> (N_in, B, N_out*D_out)
        pred = torch.bmm(u32.transpose(0, 1), w)
        pred = pred.view(n_in, batch, out_capsules, out_dim).permute(1, 2, 0, 3)
        if out is None:
            return pred.contiguous().transpose(1, 2)
        return out.copy_(pred).transpose(1, 2)


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


def capsule_windows(
    inp: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> tuple[Tensor, int, int]:
    """The children of every output position of a capsule grid, and the output grid size.

    ``inp`` (B, N, H, W, D) -> ``(B * H' * W', kH * kW * N, D)``, rows ordered (b, h', w'),
    children ordered (kernel row, kernel column, capsule type); padding adds zero capsules.
    """
    b, n, _, _, d = inp.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    x = F.pad(inp, (0, 0, pw, pw, ph, ph))  # zero capsules around the grid
    x = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, N, H', W', D, kH, kW)
    h_out, w_out = x.shape[2], x.shape[3]
    x = x.permute(0, 2, 3, 5, 6, 1, 4)  # (B, H', W', kH, kW, N, D)
    return x.reshape(b * h_out * w_out, kh * kw * n, d), h_out, w_out


_R = TypeVar("_R")


def layer_routing(
    routing: Any,
    routing_kwargs: Any,
    resolve: Callable[..., _R],
    *,
    owner: str,
) -> _R:
    """``resolve(routing, **routing_kwargs)``, after checking that ``routing_kwargs`` is a dict."""
    if routing_kwargs is not None and not isinstance(routing_kwargs, dict):
        raise TypeError(
            f"{owner}: routing_kwargs must be a dict or None, got {type(routing_kwargs).__name__}"
        )
    return resolve(routing, **(routing_kwargs or {}))


def route_in_chunks(
    layer: Any, u: Tensor, rows: int, return_coupling: bool
) -> tuple[Tensor, Tensor | None]:
    """Predict (``layer._predict``) and route (``layer.routing``) ``rows`` rows at a time.

    ``u`` is (rows, N_in, D_in); returns ``(v, c)``, ``c`` only with ``return_coupling``.
    Routing treats rows independently, so the chunks give the result of one pass while each
    chunk's predictions stay small (in cache, or within a memory budget).
    """
    parts = [u] if rows >= u.shape[0] else list(u.split(rows))
    vs, cs = [], []
    for part in parts:
        u_hat = layer._predict(part)
        if return_coupling:
            v, c = layer.routing(u_hat, return_coupling=True)
            cs.append(c)
        else:
            v = layer.routing(u_hat)
        vs.append(v)
    v = vs[0] if len(vs) == 1 else torch.cat(vs)
    if not return_coupling:
        return v, None
    return v, (cs[0] if len(cs) == 1 else torch.cat(cs))
