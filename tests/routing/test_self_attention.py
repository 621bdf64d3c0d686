"""torchcaps.routing.self_attention: SelfAttentionRouting against a float64 reference written from
Efficient-CapsNet's equations, properties, gradients, precision and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

from _helpers import TOL
from reference import self_attention_ref
from torchcaps import SelfAttentionRouting
from torchcaps.routing import resolve_routing
from torchcaps.testing import assert_routing_contract


def _u(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("shape", [(2, 9, 4, 3), (1, 1, 1, 1), (3, 5, 10, 16), (2, 16, 2, 8)])
def test_matches_the_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    u = _u(shape, seed=sum(shape), scale=0.5)
    v_ref, c_ref = self_attention_ref(u)
    v, c = SelfAttentionRouting()(u.to(dtype), return_coupling=True)
    atol, rtol = TOL[dtype]
    assert v.dtype == dtype and c.dtype == dtype
    torch.testing.assert_close(v.double(), v_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(c.double(), c_ref, atol=atol, rtol=rtol)


def test_learned_prior_is_added_after_the_softmax() -> None:
    routing = SelfAttentionRouting(learned_prior=(9, 4), dtype=torch.float64)
    assert routing.prior is not None and bool((routing.prior == 0).all())  # zero-initialised
    assert not routing.couplings_sum_to_one  # declared: a learned B moves the sums off 1
    with torch.no_grad():
        routing.prior.copy_(torch.randn(9, 4, dtype=torch.float64) * 0.3)
    u = _u((2, 9, 4, 3), seed=1)
    v_ref, c_ref = self_attention_ref(u, prior=routing.prior.detach())
    v, c = routing(u, return_coupling=True)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)  # c + B: the weights actually used
    assert not torch.allclose(c.sum(dim=-1), torch.ones(2, 9, dtype=torch.float64))
    v.sum().backward()
    assert routing.prior.grad is not None and bool(routing.prior.grad.abs().sum() > 0)


def test_contract_with_and_without_prior() -> None:
    assert SelfAttentionRouting().couplings_sum_to_one
    assert not SelfAttentionRouting(learned_prior=(7, 4)).couplings_sum_to_one
    assert_routing_contract(SelfAttentionRouting())
    prior = SelfAttentionRouting(learned_prior=(7, 4), dtype=torch.float64)
    with torch.no_grad():
        prior.prior.normal_(0, 0.1)  # type: ignore[union-attr]
    assert_routing_contract(prior)


def test_gradcheck() -> None:
    u = _u((2, 5, 3, 4), seed=2).requires_grad_(True)
    assert gradcheck(lambda t: SelfAttentionRouting()(t), (u,))
    routing = SelfAttentionRouting(learned_prior=(5, 3), dtype=torch.float64)
    with torch.no_grad():
        routing.prior.normal_(0, 0.2)  # type: ignore[union-attr]
    prior = routing.prior.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
    assert gradcheck(
        lambda t, b: torch.func.functional_call(routing, {"prior": b}, (t,)), (u, prior)
    )


@given(
    st.integers(1, 3), st.integers(1, 8), st.integers(1, 5), st.integers(1, 6), st.integers(0, 99)
)
def test_children_permutation_does_not_change_the_output(
    batch: int, n_in: int, n_out: int, dim: int, seed: int
) -> None:
    u = _u((batch, n_in, n_out, dim), seed=seed)
    perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
    routing = SelfAttentionRouting()
    v, c = routing(u, return_coupling=True)
    v_p, c_p = routing(u[:, perm], return_coupling=True)
    torch.testing.assert_close(v_p, v)
    torch.testing.assert_close(c_p, c[:, perm])
    assert bool((v.norm(dim=-1) < 1).all())


def test_zero_and_huge_predictions_stay_finite() -> None:
    for scale in (0.0, 1e-20, 1e6):
        u = (_u((2, 6, 3, 4), seed=3) * scale).float().requires_grad_(True)
        v = SelfAttentionRouting()(u)
        v.square().sum().backward()
        assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(u.grad).all())  # type: ignore[arg-type]


def test_half_precision_runs_in_float32_and_returns_the_input_dtype() -> None:
    u = _u((2, 6, 3, 8), seed=4).float()
    ref = SelfAttentionRouting()(u)
    out = SelfAttentionRouting()(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_resolves_by_name() -> None:
    r = resolve_routing("self_attention", learned_prior=(3, 2))
    assert isinstance(r, SelfAttentionRouting) and r.prior is not None
    assert repr(r) == "SelfAttentionRouting(learned_prior=(3, 2))"
    assert repr(SelfAttentionRouting()) == "SelfAttentionRouting()"


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"SelfAttentionRouting: learned_prior must be a pair"):
        SelfAttentionRouting(learned_prior=(3,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SelfAttentionRouting: learned_prior\[1\] must be >= 1"):
        SelfAttentionRouting(learned_prior=(3, 0))
    with pytest.raises(
        ValueError,
        match=r"SelfAttentionRouting with learned_prior=\(5, 3\) expected u_hat of shape "
        r"\(B, 5, 3, D_out\), got \(2, 6, 3, 4\)",
    ):
        SelfAttentionRouting(learned_prior=(5, 3))(torch.zeros(2, 6, 3, 4))
    with pytest.raises(ValueError, match=r"expected u_hat of shape \(B, N_in, N_out, D_out\)"):
        SelfAttentionRouting()(torch.zeros(2, 6, 3))
    with pytest.raises(TypeError, match="u_hat must be a real floating-point tensor"):
        SelfAttentionRouting()(torch.zeros(2, 6, 3, 4, dtype=torch.int64))
