"""DenseCaps with DynamicRouting under ``torch.compile`` on CPU: one opaque operator each way.

In eager mode :class:`~torchcaps.DenseCaps` routes a CPU batch in chunks (``batch_chunk="auto"``)
so that each chunk's predictions stay in cache through the rounds, and
:class:`~torchcaps.DynamicRouting` differentiates the rounds by hand. A compiled graph can do
neither: a loop over chunks would be unrolled into it, so the whole batch is routed at once (an
evaluation batch of 1,000 holds 737 MB of predictions for the paper's DigitCaps), and inductor
generates kernels for the rounds and their autograd backward. Under ``torch.compile`` the layer
therefore calls ``torchcaps::dense_dynamic_routing``, which runs the eager chunks, and its
backward ``torchcaps::dense_dynamic_routing_backward``, which runs the hand-written backward
chunk by chunk from what the forward saved. Measurements: docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from torchcaps._checks import float32_compute
from torchcaps.layers._common import predictions
from torchcaps.routing.dynamic import _rounds, _rounds_backward

__all__: list[str] = []

_Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _chunks(batch: int, chunk: int) -> Iterator[slice]:
    for start in range(0, batch, chunk):
        yield slice(start, min(start + chunk, batch))


def _softmax_rounds(iterations: int, prior: Tensor | None) -> int:
    """Rounds with a softmax coupling: all but the first (uniform) one without a prior."""
    return iterations - int(prior is None)


# v (B, N_out, D_out) in float32 (float64 for a float64 input) and, with ``save``, what the
# backward reads: the predictions (B, N_out, N_in, D_out), the couplings of the rounds with a
# softmax (K, B, N_out, N_in), and every round's s and v (R, B, N_out, D_out); empty tensors
# without ``save`` (no graph recorded).
# ``prior``: DynamicRouting's log_prior (N_in, N_out) or None.
@torch.library.custom_op("torchcaps::dense_dynamic_routing", mutates_args=())
def _forward_op(
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    out_capsules: int,
    out_dim: int,
    iterations: int,
    eps: float,
    stop_gradient: bool,
    chunk: int,
    save: bool,
) -> _Outputs:
    with torch.autocast(device_type=u.device.type, enabled=False):
        x = float32_compute(u)
        batch, n_in = x.shape[:2]
        logits = None if prior is None else prior.t()
        first = iterations - _softmax_rounds(iterations, prior)  # first round with a coupling
        v = x.new_empty(batch, out_capsules, out_dim)
        u_hat, cs, ss, vs = _saved_like(x, prior, out_capsules, out_dim, iterations, save)
        scratch = None if save else x.new_empty(min(chunk, batch), out_capsules, n_in, out_dim)
        for rows in _chunks(batch, chunk):
            n = rows.stop - rows.start
            out = u_hat[rows] if scratch is None else scratch[:n]
            predictions(x[rows], weight, out_capsules, out_dim, out=out)
            trace: list[Any] | None = [] if save else None
            v[rows] = _rounds(out, logits, iterations, eps, stop_gradient, trace)[0]
            for r, (c, s, v_r) in enumerate(trace or ()):
                if c is not None:
                    cs[r - first, rows] = c
                ss[r, rows] = s.view(n, out_capsules, out_dim)
                vs[r, rows] = v_r.view(n, out_capsules, out_dim)
    return v, u_hat, cs, ss, vs


def _saved_like(
    x: Tensor,
    prior: Tensor | None,
    out_capsules: int,
    out_dim: int,
    iterations: int,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty (predictions, couplings, s, v) buffers of the shapes the operator returns.

    ``x``: the input in its compute dtype (float32 for half precision, see
    :func:`~torchcaps._checks.float32_compute`).
    """
    if not save:
        return tuple(x.new_empty(0) for _ in range(4))  # type: ignore[return-value]
    batch, n_in = x.shape[:2]
    k = _softmax_rounds(iterations, prior)
    return (
        x.new_empty(batch, out_capsules, n_in, out_dim),
        x.new_empty(k, batch, out_capsules, n_in),
        x.new_empty(iterations, batch, out_capsules, out_dim),
        x.new_empty(iterations, batch, out_capsules, out_dim),
    )


@_forward_op.register_fake
def _forward_fake(
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    out_capsules: int,
    out_dim: int,
    iterations: int,
    eps: float,
    stop_gradient: bool,
    chunk: int,
    save: bool,
) -> _Outputs:
    x = u.new_empty(u.shape, dtype=float32_compute(u.new_empty(0)).dtype)  # no data: a fake
    v = x.new_empty(u.shape[0], out_capsules, out_dim)
    return (v, *_saved_like(x, prior, out_capsules, out_dim, iterations, save))


# The gradients of u (u's dtype), weight and prior (theirs), each empty where not needed.
@torch.library.custom_op("torchcaps::dense_dynamic_routing_backward", mutates_args=())
def _backward_op(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    u_hat: Tensor,
    cs: Tensor,
    ss: Tensor,
    vs: Tensor,
    iterations: int,
    eps: float,
    stop_gradient: bool,
    chunk: int,
    need_u: bool,
    need_weight: bool,
    need_prior: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(device_type=u.device.type, enabled=False):
        x = float32_compute(u)
        batch, n_in = x.shape[:2]
        _, out_capsules, _, out_dim = u_hat.shape
        first = iterations - _softmax_rounds(iterations, prior)
        options = (iterations, eps, stop_gradient)
        grad_u = x.new_empty(x.shape) if need_u else u.new_empty(0)
        grad_w = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
        grad_b = None
        for rows in _chunks(batch, chunk):
            n = rows.stop - rows.start
            couplings: list[Tensor | None] = [None] * first + [
                cs[k, rows] for k in range(cs.shape[0])
            ]
            ss_c, vs_c = (t[:, rows].reshape(iterations, -1, out_dim).unbind(0) for t in (ss, vs))
            g_hat, g_b = _rounds_backward(
                u_hat[rows], couplings, ss_c, vs_c, options, grad_v[rows], None
            )
            if g_b is not None and need_prior:
                g_b = g_b.sum(dim=0)
                grad_b = g_b if grad_b is None else grad_b + g_b
            # the predictions' bmm, backwards: (N_in, n, N_out * D_out) gradient rows
            assert g_hat is not None
            g_pred = g_hat.permute(2, 0, 1, 3).reshape(n_in, n, out_capsules * out_dim)
            if need_u:
                grad_u[rows] = torch.bmm(g_pred, weight.transpose(1, 2)).transpose(0, 1)
            if need_weight:
                grad_w.baddbmm_(x[rows].transpose(0, 1).transpose(1, 2), g_pred)
    # grad_b is summed only where the prior's gradient is needed (with a prior every round has
    # a softmax, so it is then never None)
    grad_prior = grad_b.t().contiguous() if grad_b is not None else u.new_empty(0)
    return grad_u.to(u.dtype), grad_w, grad_prior


@_backward_op.register_fake
def _backward_fake(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    u_hat: Tensor,
    cs: Tensor,
    ss: Tensor,
    vs: Tensor,
    iterations: int,
    eps: float,
    stop_gradient: bool,
    chunk: int,
    need_u: bool,
    need_weight: bool,
    need_prior: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_u = u.new_empty(u.shape) if need_u else u.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    grad_prior = prior.new_empty(prior.shape) if need_prior and prior is not None else None
    return grad_u, grad_w, grad_prior if grad_prior is not None else u.new_empty(0)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: _Outputs) -> None:
    u, weight, prior, _, _, iterations, eps, stop_gradient, chunk, save = inputs
    _, u_hat, cs, ss, vs = output
    ctx.save_for_backward(u, weight, prior, u_hat, cs, ss, vs)
    ctx.options = (iterations, eps, stop_gradient, chunk)
    ctx.saved = save


def _backward(ctx: Any, grad_v: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    u, weight, prior, u_hat, cs, ss, vs = ctx.saved_tensors
    need_u, need_w, need_p = ctx.needs_input_grad[:3]
    nones = (None,) * 7
    if grad_v is None or not (need_u or need_w or need_p):
        return (None, None, None, *nones)
    if not ctx.saved:
        raise RuntimeError(
            "torchcaps::dense_dynamic_routing: backward through a forward that saved nothing "
            "(it ran where no input required grad)"
        )
    grads = _backward_op(
        grad_v, u, weight, prior, u_hat, cs, ss, vs, *ctx.options, need_u, need_w, need_p
    )
    return tuple(g if need else None for g, need in zip(grads, (need_u, need_w, need_p))) + nones


_forward_op.register_autograd(_backward, setup_context=_setup)


def dense_dynamic_routing(
    u: Tensor,
    weight: Tensor,
    prior: Tensor | None,
    out_capsules: int,
    out_dim: int,
    options: tuple[int, float, bool],
    chunk: int,
) -> Tensor:
    """DenseCaps + DynamicRouting of ``u`` (B, N_in, D_in) as the operator: v (B, N_out, D_out).

    ``weight``: DenseCaps' (N_in, D_in, N_out * D_out) float32 weight; ``prior``: the routing's
    ``log_prior`` or ``None``; ``options``: ``(iterations, eps, stop_gradient)``; ``chunk``:
    examples per chunk. The result is float32 for a half-precision input; float64 inputs (the
    tests' gradcheck) stay float64.
    """
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, weight, prior)
    )
    return _forward_op(u, weight, prior, out_capsules, out_dim, *options, chunk, save)[0]
