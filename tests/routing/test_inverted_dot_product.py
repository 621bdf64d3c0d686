"""torchcaps.routing.inverted_dot_product: InvertedDotProductRouting against a float64 reference
written from Procedure 1 of Tsai et al. (2020), properties, gradients, precision and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

from _helpers import TOL
from reference import inverted_dot_product_ref
from torchcaps import InvertedDotProductRouting
from torchcaps.routing import resolve_routing
from torchcaps.testing import assert_routing_contract


def _u(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _routing(dim: int, iterations: int, seed: int = 0) -> InvertedDotProductRouting:
    """A routing whose layer norm has non-trivial (random) affine parameters."""
    routing = InvertedDotProductRouting(dim, iterations, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        routing.norm.weight.copy_(1 + 0.3 * torch.randn(dim, generator=g, dtype=torch.float64))
        routing.norm.bias.copy_(0.2 * torch.randn(dim, generator=g, dtype=torch.float64))
    return routing


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 9, 4, 3), (1, 1, 1, 2), (3, 6, 10, 8)])
def test_matches_procedure_1_reference(
    iterations: int, shape: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    u = _u(shape, seed=iterations + sum(shape))
    routing = _routing(shape[-1], iterations)
    p_ref, r_ref = inverted_dot_product_ref(
        u, iterations, routing.norm.weight.detach(), routing.norm.bias.detach()
    )
    p, r = routing.to(dtype)(u.to(dtype), return_coupling=True)
    atol, rtol = TOL[dtype]
    assert p.dtype == dtype and r.dtype == dtype
    torch.testing.assert_close(p.double(), p_ref, atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(r.double(), r_ref, atol=atol * 10, rtol=rtol * 10)


def test_one_iteration_is_uniform_routing() -> None:
    u = _u((2, 7, 4, 5), seed=1)
    p, r = InvertedDotProductRouting(5, iterations=1, dtype=torch.float64)(u, return_coupling=True)
    assert bool((r == 0.25).all())
    s = u.sum(dim=1) / 4  # r_ij = 1 / N_out
    expected = (s - s.mean(-1, keepdim=True)) / torch.sqrt(
        s.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(p, expected)


def test_layer_norm_is_learned_and_shared_by_all_parents() -> None:
    routing = InvertedDotProductRouting(6, iterations=2)
    assert isinstance(routing.norm, torch.nn.LayerNorm)
    assert tuple(routing.norm.normalized_shape) == (6,) and routing.norm.eps == 1e-5
    assert bool((routing.norm.weight == 1).all()) and bool((routing.norm.bias == 0).all())
    assert sum(p.numel() for p in routing.parameters()) == 12  # one (weight, bias) pair
    u = _u((3, 5, 4, 6), seed=2).float().requires_grad_(True)
    routing(u).square().sum().backward()
    assert routing.norm.weight.grad is not None and bool(routing.norm.weight.grad.abs().sum() > 0)
    assert not routing.squashes_output


def test_contract() -> None:
    assert_routing_contract(InvertedDotProductRouting(5, iterations=3))
    assert_routing_contract(_routing(5, 2, seed=3))


def test_gradcheck() -> None:
    u = _u((2, 5, 3, 4), seed=4).requires_grad_(True)
    routing = _routing(4, 3, seed=5)
    assert gradcheck(lambda t: routing(t), (u,))


@given(
    st.integers(1, 3), st.integers(1, 8), st.integers(1, 5), st.integers(2, 6), st.integers(0, 99)
)
def test_children_permutation_does_not_change_the_output(
    batch: int, n_in: int, n_out: int, dim: int, seed: int
) -> None:
    u = _u((batch, n_in, n_out, dim), seed=seed)
    perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
    routing = _routing(dim, 3, seed=seed)
    p, r = routing(u, return_coupling=True)
    p_perm, r_perm = routing(u[:, perm], return_coupling=True)
    torch.testing.assert_close(p_perm, p)
    torch.testing.assert_close(r_perm, r[:, perm])
    torch.testing.assert_close(r.sum(dim=-1), torch.ones(batch, n_in, dtype=torch.float64))


def test_half_precision_runs_in_float32_and_returns_the_input_dtype() -> None:
    u = _u((2, 6, 3, 8), seed=6).float()
    routing = InvertedDotProductRouting(8)
    ref = routing(u)
    out = routing(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert routing(u).dtype == torch.float32  # float32 parameters, float32 compute


def test_zero_predictions_stay_finite() -> None:
    u = torch.zeros(2, 4, 3, 5, requires_grad=True)
    p = InvertedDotProductRouting(5, iterations=3)(u)
    p.square().sum().backward()
    assert bool(torch.isfinite(p).all()) and bool(torch.isfinite(u.grad).all())  # type: ignore[arg-type]


def test_resolves_by_name() -> None:
    r = resolve_routing("inverted_dot_product", out_dim=8, iterations=3)
    assert isinstance(r, InvertedDotProductRouting) and (r.out_dim, r.iterations) == (8, 3)
    assert r.extra_repr() == "out_dim=8, iterations=3, eps=1e-05"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="InvertedDotProductRouting: out_dim must be >= 1, got 0"):
        InvertedDotProductRouting(0)
    with pytest.raises(
        ValueError, match="InvertedDotProductRouting: iterations must be >= 1, got 0"
    ):
        InvertedDotProductRouting(4, iterations=0)
    with pytest.raises(TypeError, match="InvertedDotProductRouting: iterations must be an int"):
        InvertedDotProductRouting(4, iterations=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="InvertedDotProductRouting: eps must be > 0.0"):
        InvertedDotProductRouting(4, eps=0.0)
    with pytest.raises(
        ValueError,
        match=r"InvertedDotProductRouting expected u_hat of shape \(B, N_in, N_out, 4\), "
        r"got \(2, 6, 3, 5\)",
    ):
        InvertedDotProductRouting(4)(torch.zeros(2, 6, 3, 5))
    with pytest.raises(TypeError, match="u_hat must be a real floating-point tensor"):
        InvertedDotProductRouting(4)(torch.zeros(2, 6, 3, 4, dtype=torch.int64))
