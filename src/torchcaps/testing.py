"""Public test helpers, e.g. :func:`assert_routing_contract` for third-party routing algorithms."""

from __future__ import annotations

import torch
from torch import Tensor

from torchcaps.routing.base import Routing

__all__ = ["assert_routing_contract"]


def _call(routing: torch.nn.Module, u_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    v = routing(u_hat)
    out = routing(u_hat, return_coupling=True)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(
            f"{type(routing).__name__}(u_hat, return_coupling=True) must return a pair (v, c), "
            f"got {type(out).__name__}"
        )
    return v, out[0], out[1]


def assert_routing_contract(
    routing: Routing,
    *,
    batch: int = 3,
    in_capsules: int = 7,
    out_capsules: int = 4,
    dim: int = 5,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    r"""Check that ``routing`` follows the :class:`~torchcaps.routing.Routing` contract.

    Raises :class:`AssertionError` naming the first broken rule. Checked on random prediction
    vectors :math:`\hat{u}` of shape ``(batch, in_capsules, out_capsules, dim)``:

    1. ``routing(u_hat)`` returns ``v`` of shape ``(B, N_out, D)`` in ``u_hat``'s dtype, finite;
    2. ``routing(u_hat, return_coupling=True)`` returns ``(v, c)`` with the same ``v`` and
       ``c`` of shape ``(B, N_in, N_out)``, non-negative, summing to 1 over the parents;
    3. the examples of a batch are routed independently (routing one example alone gives the
       same result as routing it inside the batch);
    4. gradients flow from ``v`` back to ``u_hat`` and are finite;
    5. malformed ``u_hat`` (wrong rank, integer dtype) raises :class:`ValueError` or
       :class:`TypeError`.

    A routing algorithm with learned parameters of a fixed size must be built for
    ``(in_capsules, out_capsules)``.

    Args:
        routing: the routing module to check.
        batch: batch size :math:`B` of the probe input.
        in_capsules: :math:`N_{in}` of the probe input.
        out_capsules: :math:`N_{out}` of the probe input.
        dim: :math:`D` of the probe input.
        dtype: dtype of the probe input.
        device: device of the probe input.
        atol: absolute tolerance of the comparisons.
        seed: seed of the probe input.

    Examples:
        >>> from torchcaps import DynamicRouting
        >>> from torchcaps.testing import assert_routing_contract
        >>> assert_routing_contract(DynamicRouting(iterations=3))  # passes silently
    """
    name = type(routing).__name__
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, in_capsules, out_capsules, dim)
    u_hat = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    u_hat.requires_grad_(True)

    v, v2, c = _call(routing, u_hat)
    if tuple(v.shape) != (batch, out_capsules, dim):
        raise AssertionError(
            f"{name}: v must have shape {(batch, out_capsules, dim)}, got {tuple(v.shape)}"
        )
    if v.dtype != u_hat.dtype:
        raise AssertionError(f"{name}: v must have u_hat's dtype {u_hat.dtype}, got {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        raise AssertionError(f"{name}: v has non-finite values for finite u_hat")
    if not torch.allclose(v, v2, atol=atol, rtol=0):
        raise AssertionError(f"{name}: v differs between return_coupling=False and True")
    if tuple(c.shape) != (batch, in_capsules, out_capsules):
        raise AssertionError(
            f"{name}: c must have shape {(batch, in_capsules, out_capsules)}, got {tuple(c.shape)}"
        )
    if bool((c < -atol).any()):
        raise AssertionError(f"{name}: coupling coefficients must be >= 0")
    ones = torch.ones(batch, in_capsules, dtype=c.dtype, device=c.device)
    if not torch.allclose(
        c.sum(dim=-1), ones, atol=max(atol, 1e-3 if dtype != torch.float64 else atol)
    ):
        raise AssertionError(f"{name}: coupling coefficients must sum to 1 over the parents")

    for k in range(batch):
        v_k = routing(u_hat[k : k + 1])
        if not torch.allclose(v_k[0], v[k], atol=atol * 10, rtol=1e-4):
            raise AssertionError(
                f"{name}: example {k} routed alone differs from the batch: "
                "batch elements must be independent"
            )

    (grad,) = torch.autograd.grad(v.square().sum(), u_hat, allow_unused=True)
    if grad is None:
        raise AssertionError(f"{name}: no gradient flows from v back to u_hat")
    if not bool(torch.isfinite(grad).all()):
        raise AssertionError(f"{name}: gradient of v w.r.t. u_hat is not finite")

    for bad, what in (
        (torch.zeros(batch, in_capsules, out_capsules, dtype=dtype, device=device), "rank-3 u_hat"),
        (torch.zeros(shape, dtype=torch.int64, device=device), "integer u_hat"),
    ):
        try:
            routing(bad)
        except (ValueError, TypeError):
            continue
        except Exception as exc:
            raise AssertionError(
                f"{name}: {what} must raise ValueError/TypeError, got {type(exc).__name__}: {exc}"
            ) from exc
        raise AssertionError(f"{name}: {what} must raise ValueError/TypeError, nothing was raised")
