"""torchcaps.routing.dynamic: DynamicRouting against Procedure 1 (float64 reference), properties,
gradients, precision, errors and fuzzing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from _helpers import TOL
from _strategies import (
    BAD_FLOATS,
    BAD_INTS,
    FLOAT_DTYPES,
    MODULE_DTYPES,
    RAISED,
    bad_tensors,
    check_call,
    finite,
    real_tensors,
)
from reference import routing_ref
from torchcaps import DynamicRouting, squash
from torchcaps.routing import dynamic
from torchcaps.testing import assert_routing_contract

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 6), st.integers(1, 5))


def _u(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_matches_procedure_1_reference(iterations: int, dtype: torch.dtype) -> None:
    u = _u((2, 9, 4, 3), seed=iterations)
    v_ref, c_ref = routing_ref(u, iterations)
    v, c = DynamicRouting(iterations)(u.to(dtype), return_coupling=True)
    atol, rtol = TOL[dtype]
    assert v.dtype == dtype and c.dtype == dtype
    torch.testing.assert_close(v.double(), v_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(c.double(), c_ref, atol=atol, rtol=rtol)


def test_learned_prior_matches_reference() -> None:
    routing = DynamicRouting(3, learned_prior=(9, 4), dtype=torch.float64)
    with torch.no_grad():
        routing.log_prior.copy_(torch.randn(9, 4, dtype=torch.float64))
    u = _u((2, 9, 4, 3), seed=0)
    v_ref, c_ref = routing_ref(u, 3, prior=routing.log_prior.detach())
    v, c = routing(u, return_coupling=True)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)
    v.sum().backward()
    assert routing.log_prior.grad is not None and bool(routing.log_prior.grad.abs().sum() > 0)


def test_learned_prior_off_by_default() -> None:
    assert DynamicRouting().log_prior is None
    assert len(list(DynamicRouting().parameters())) == 0
    r = DynamicRouting(2, learned_prior=(5, 3))
    assert r.log_prior is not None and r.log_prior.shape == (5, 3)
    assert bool((r.log_prior == 0).all())


def test_one_iteration_is_uniform_coupling_and_mean() -> None:
    u = _u((3, 7, 5, 4), seed=1)
    v, c = DynamicRouting(1)(u, return_coupling=True)
    assert bool((c == 1 / 5).all())
    torch.testing.assert_close(v, squash(u.sum(dim=1) / 5))  # s_j = sum_i (1/N_out) u_hat


@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_coupling_is_a_distribution_over_parents(
    shape: tuple[int, ...], iters: int, seed: int
) -> None:
    u = _u(shape, seed, scale=2.0)
    v, c = DynamicRouting(iters)(u, return_coupling=True)
    assert v.shape == (shape[0], shape[2], shape[3])
    assert c.shape == shape[:3]
    assert bool((c >= 0).all())
    torch.testing.assert_close(c.sum(dim=-1), torch.ones(shape[:2], dtype=torch.float64))
    assert bool((v.norm(dim=-1) < 1).all())


@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_invariant_to_permuting_inputs(shape: tuple[int, ...], iters: int, seed: int) -> None:
    u = _u(shape, seed)
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    routing = DynamicRouting(iters)
    v, c = routing(u, return_coupling=True)
    v_p, c_p = routing(u[:, perm], return_coupling=True)
    torch.testing.assert_close(v_p, v)
    torch.testing.assert_close(c_p, c[:, perm])


@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_equivariant_to_permuting_outputs(shape: tuple[int, ...], iters: int, seed: int) -> None:
    u = _u(shape, seed)
    perm = torch.randperm(shape[2], generator=torch.Generator().manual_seed(seed))
    routing = DynamicRouting(iters)
    v, c = routing(u, return_coupling=True)
    v_p, c_p = routing(u[:, :, perm], return_coupling=True)
    torch.testing.assert_close(v_p, v[:, perm])
    torch.testing.assert_close(c_p, c[:, :, perm])


@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_batch_elements_are_independent(shape: tuple[int, ...], iters: int, seed: int) -> None:
    u = _u(shape, seed)
    routing = DynamicRouting(iters)
    v = routing(u)
    for b in range(shape[0]):
        torch.testing.assert_close(routing(u[b : b + 1])[0], v[b])


@given(st.integers(2, 6), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_more_rounds_shift_coupling_to_agreed_parent(n_out: int, dim: int, seed: int) -> None:
    # Every child predicts (nearly) the same vector for parent 0 and small noise for the others.
    g = torch.Generator().manual_seed(seed)
    n_in = 32
    u = torch.randn(1, n_in, n_out, dim, generator=g, dtype=torch.float64) * 0.1
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    u[:, :, 0] += 2.0 * direction / direction.norm()
    coupling = [
        float(DynamicRouting(r)(u, return_coupling=True)[1][0, :, 0].mean()) for r in (1, 2, 3, 5)
    ]
    assert coupling[0] == pytest.approx(1 / n_out)
    assert all(b > a for a, b in zip(coupling, coupling[1:])), coupling


def test_gradcheck_through_all_rounds() -> None:
    u = _u((2, 5, 3, 4), seed=3).requires_grad_(True)
    assert gradcheck(lambda t: DynamicRouting(3)(t), (u,))
    assert gradcheck(
        lambda t: DynamicRouting(3, learned_prior=(5, 3), dtype=torch.float64)(t), (u,)
    )


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "prior"])
@pytest.mark.parametrize("stop_gradient", [False, True], ids=["grad", "stop-grad"])
def test_hand_written_backward_matches_autograd(
    iterations: int, prior: bool, stop_gradient: bool
) -> None:
    # The eager path's one-pass backward (_RoutingRounds) against autograd through the same
    # rounds (_rounds), for the capsules and the returned coupling, in float64.
    routing = DynamicRouting(
        iterations,
        stop_gradient=stop_gradient,
        learned_prior=(6, 3) if prior else None,
        dtype=torch.float64,
    )
    if prior:
        with torch.no_grad():
            routing.log_prior.normal_(generator=torch.Generator().manual_seed(1))
    u = _u((2, 6, 3, 4), seed=7).requires_grad_(True)
    params = [u, *routing.parameters()]
    x = u.transpose(1, 2).contiguous()
    log_prior = None if routing.log_prior is None else routing.log_prior.t()
    options = (iterations, routing.eps, stop_gradient)
    got_v, got_c = dynamic._RoutingRounds.apply(x, log_prior, *options)
    ref_v, ref_c = dynamic._rounds(x, log_prior, *options)
    torch.testing.assert_close(got_v, ref_v, atol=1e-12, rtol=1e-12)
    g = torch.Generator().manual_seed(2)
    wv = torch.randn(got_v.shape, generator=g, dtype=torch.float64)
    if ref_c is None:
        assert got_c is None
        outs, refs, ws = [got_v], [ref_v], [wv]
    else:
        wc = torch.randn(got_c.shape, generator=g, dtype=torch.float64)
        outs, refs, ws = [got_v, got_c], [ref_v, ref_c], [wv, wc]
    got = torch.autograd.grad(outs, params, ws, allow_unused=True)
    live = [(r, w) for r, w in zip(refs, ws, strict=True) if r.requires_grad]  # stop_gradient
    expected = torch.autograd.grad(
        [r for r, _ in live], params, [w for _, w in live], allow_unused=True
    )
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]),
    eps=st.sampled_from([1e-12, 1e-8, 1e-3]),
)
def test_squash_backward_matches_autograd(seed: int, scale: float, eps: float) -> None:
    # The written-out gradient of squash that the hand-written backward uses, against autograd
    # through squash itself, from zero vectors to huge norms, in float64 and float32.
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float64, torch.float32):
        s = (torch.randn(7, 5, generator=g, dtype=torch.float64) * scale).to(dtype)
        s[0] = 0.0
        grad = torch.randn(7, 5, generator=g, dtype=torch.float64).to(dtype)
        sr = s.clone().requires_grad_()
        (expected,) = torch.autograd.grad(squash(sr, dim=-1, eps=eps), sr, grad)
        got = dynamic._squash_backward(s, grad, eps)
        assert bool(torch.isfinite(got).all())
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_hand_written_backward_gradcheck_and_double_backward() -> None:
    u = _u((2, 5, 3, 4), seed=8).requires_grad_(True)  # (B, N_out, N_in, D)
    prior = (_u((5, 3), seed=9) * 0.5).requires_grad_(True)  # (N_out, N_in) of u
    # (stop_gradient=True is not the derivative of the forward by design; it is compared
    # with autograd's stopped gradient above.)

    def fn(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v, c = dynamic._RoutingRounds.apply(x, p, 3, 1e-8, False)
        return v, c

    assert gradcheck(fn, (u, prior))
    assert gradgradcheck(fn, (u, prior))


def test_eager_and_captured_routing_agree() -> None:
    u = _u((3, 9, 4, 5), seed=6).requires_grad_(True)
    routing = DynamicRouting(3)
    (g_eager,) = torch.autograd.grad(routing(u).pow(2).sum(), u)
    x = u.transpose(1, 2).contiguous()
    assert dynamic._fused_backward_pays(x, None)
    with torch.no_grad():
        assert not dynamic._fused_backward_pays(x, None)
    assert not dynamic._fused_backward_pays(x.detach(), None)
    traced = torch.jit.trace(routing, (u,), check_trace=False)
    (g_traced,) = torch.autograd.grad(traced(u).pow(2).sum(), u)
    torch.testing.assert_close(g_eager, g_traced, atol=1e-12, rtol=1e-10)
    assert "PythonOp" not in str(traced.graph)


def test_gradients_flow_through_routing_rounds_by_default() -> None:
    u = _u((2, 6, 3, 4), seed=4).requires_grad_(True)
    # With the coupling coefficients frozen at their final values, only the last weighted sum
    # carries gradient; the default lets gradient flow through the rounds as well, so differs.
    _, c = DynamicRouting(3)(u.detach(), return_coupling=True)

    def frozen(t: torch.Tensor) -> torch.Tensor:
        return squash(torch.einsum("bij,bijd->bjd", c, t))

    (g_default,) = torch.autograd.grad(DynamicRouting(3)(u).pow(2).sum(), u)
    (g_stop,) = torch.autograd.grad(DynamicRouting(3, stop_gradient=True)(u).pow(2).sum(), u)
    (g_frozen,) = torch.autograd.grad(frozen(u).pow(2).sum(), u)
    torch.testing.assert_close(g_stop, g_frozen)
    assert not torch.allclose(g_default, g_frozen, atol=1e-8)
    # forward values are the same either way
    torch.testing.assert_close(DynamicRouting(3, stop_gradient=True)(u), DynamicRouting(3)(u))


@pytest.mark.parametrize("iterations", [1, 3, 20])
def test_extreme_inputs_are_finite(iterations: int) -> None:
    for u in (torch.zeros(2, 8, 3, 4), torch.full((2, 8, 3, 4), 1e4), torch.randn(1, 1, 1, 1)):
        u = u.clone().requires_grad_(True)
        v = DynamicRouting(iterations)(u)
        (g,) = torch.autograd.grad(v.sum(), u)
        assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_half_input_routes_in_float32(amp_dtype: torch.dtype) -> None:
    u = _u((2, 40, 4, 8), seed=5)
    v = DynamicRouting(3)(u.to(amp_dtype))
    assert v.dtype == amp_dtype
    v_ref, _ = routing_ref(u.to(amp_dtype).double(), 3)
    torch.testing.assert_close(v.double(), v_ref, atol=1e-2, rtol=1e-2)


def test_under_autocast_stays_float32() -> None:
    u = torch.randn(2, 30, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = DynamicRouting(3)(u)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, DynamicRouting(3)(u))


def test_on_device(device: torch.device) -> None:
    u = torch.randn(2, 10, 3, 4, device=device)
    v, c = DynamicRouting(3)(u, return_coupling=True)
    assert v.device == device and c.device == device
    v_ref, c_ref = routing_ref(u.double().cpu(), 3)
    torch.testing.assert_close(v.double().cpu(), v_ref, atol=1e-5, rtol=1e-4)


def test_contract_helper_accepts_dynamic_routing() -> None:
    assert_routing_contract(DynamicRouting(1))
    assert_routing_contract(DynamicRouting(3, stop_gradient=True), dtype=torch.float32, atol=1e-5)
    assert_routing_contract(DynamicRouting(3, learned_prior=(7, 4), dtype=torch.float64))


def test_bad_input() -> None:
    r = DynamicRouting()
    with pytest.raises(
        ValueError,
        match=r"DynamicRouting expected u_hat of shape \(B, N_in, N_out, D_out\).*got \(2, 3, 4\)",
    ):
        r(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"got \(2, 0, 4, 3\)"):
        r(torch.randn(2, 0, 4, 3))
    with pytest.raises(
        TypeError,
        match="DynamicRouting: u_hat must be a real floating-point tensor, got dtype torch.int64",
    ):
        r(torch.ones(2, 3, 4, 5, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"learned_prior=\(5, 3\) expected u_hat of shape \(B, 5, 3, D_out\), got \(2, 6, 3, 4\)",
    ):
        DynamicRouting(learned_prior=(5, 3))(torch.randn(2, 6, 3, 4))


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="DynamicRouting: iterations must be >= 1, got 0"):
        DynamicRouting(0)
    with pytest.raises(TypeError, match="DynamicRouting: iterations must be an int, got float"):
        DynamicRouting(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stop_gradient must be a bool"):
        DynamicRouting(stop_gradient="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="learned_prior must be a pair"):
        DynamicRouting(learned_prior=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"learned_prior\[1\] must be >= 1"):
        DynamicRouting(learned_prior=(5, 0))


def test_repr() -> None:
    assert repr(DynamicRouting()) == "DynamicRouting(iterations=3)"
    assert "stop_gradient=True" in repr(DynamicRouting(stop_gradient=True))
    assert "learned_prior=(4, 2)" in repr(DynamicRouting(learned_prior=(4, 2)))


# -- fuzz ----------------------------------------------------------------------------------------
@given(st.data())
def test_fuzz_dynamic_routing(data: st.DataObject) -> None:
    ctor = ["iterations", "stop_gradient", "learned_prior", "eps"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "u_hat", "u_hat"]), label="broken")
    b = data.draw(st.integers(0, 3), label="B")
    n_in = data.draw(st.integers(1, 6), label="N_in")
    n_out = data.draw(st.integers(1, 4), label="N_out")
    d = data.draw(st.integers(1, 4), label="D")
    kwargs: dict[str, Any] = {
        "iterations": data.draw(st.integers(1, 6)),
        "stop_gradient": data.draw(st.booleans()),
        "learned_prior": data.draw(st.sampled_from([None, (n_in, n_out), [n_in, n_out]])),
        "eps": data.draw(st.sampled_from([1e-12, 1e-6, 1e-3])),
    }
    kind = ""
    if broken == "iterations":
        kwargs[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "stop_gradient":
        kwargs[broken] = data.draw(st.sampled_from([0, 1, "yes", None]))
    elif broken == "learned_prior":
        kwargs[broken] = data.draw(
            st.sampled_from([(n_in,), (n_in, n_out, 1), (0, n_out), (n_in, -1), (1.5, 2), 3, "ab"])
        )
    elif broken == "eps":
        kwargs[broken] = data.draw(st.sampled_from([0.0, -1.0, *BAD_FLOATS]))
    if broken in ctor:
        kind = repr(kwargs[broken])
    routing = check_call(
        "DynamicRouting", lambda: DynamicRouting(**kwargs), broken if broken in ctor else None, kind
    )
    if routing is RAISED:
        return
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    u: Any = data.draw(real_tensors((b, n_in, n_out, d), dtype, nonfinite=nonfinite), label="u_hat")
    if broken == "u_hat":
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            u, kind = data.draw(bad_tensors((b, n_in, n_out, d)))
        elif choice == 1:
            shape = data.draw(
                st.sampled_from(
                    [
                        (b, n_in, n_out),
                        (b, 0, n_out, d),
                        (b, n_in, 0, d),
                        (b, n_in, n_out, 0),
                        (1, b, n_in, n_out, d),
                    ]
                )
            )
            u, kind = torch.rand(shape), f"shape {shape}"
        else:
            if routing.log_prior is None:
                u, kind = torch.rand(b, n_in, n_out), "rank 3"
            else:
                u, kind = torch.rand(b, n_in + 1, n_out, d), "N_in != learned_prior"
    grad = broken is None and not nonfinite and dtype in MODULE_DTYPES
    if grad:
        u = u.clone().requires_grad_(True)
    out = check_call(
        "DynamicRouting",
        lambda: routing(u, return_coupling=True),
        "u_hat" if broken == "u_hat" else None,
        kind,
        nonfinite="u_hat" if nonfinite else None,
    )
    if out is RAISED:
        return
    v, c = out
    assert v.shape == (b, n_out, d) and c.shape == (b, n_in, n_out)
    assert v.dtype == dtype
    if not nonfinite:
        assert finite(v) and finite(c)
        assert bool((torch.linalg.vector_norm(v.double(), dim=-1) <= 1 + 1e-2).all())
        torch.testing.assert_close(
            c.double().sum(-1), torch.ones(b, n_in, dtype=torch.float64), atol=1e-2, rtol=0
        )
    if grad and v.numel():
        (g,) = torch.autograd.grad(v.sum(), u)
        assert finite(g), "DynamicRouting: non-finite gradient for finite input"


@pytest.mark.parametrize("stop_gradient", [False, True], ids=["grad", "stop-grad"])
def test_hand_written_backward_second_order_matches_autograd(stop_gradient: bool) -> None:
    # create_graph=True differentiates the plain rounds: the same second derivatives.
    u = _u((2, 4, 5, 3), seed=10).requires_grad_(True)  # (B, N_out, N_in, D)
    prior = (_u((4, 5), seed=11) * 0.5).requires_grad_(True)
    w = _u((2, 4, 3), seed=12)

    def second_order(fn) -> tuple[torch.Tensor, ...]:
        v, c = fn(u, prior, 3, 1e-8, stop_gradient)
        loss = (v * w).sum() + c.pow(2).sum() if c.requires_grad else (v * w).sum()
        gu, gp = torch.autograd.grad(loss, (u, prior), create_graph=True)
        return torch.autograd.grad(gu.pow(2).sum() + gp.pow(2).sum(), (u, prior))

    got = second_order(dynamic._RoutingRounds.apply)
    expected = second_order(dynamic._rounds)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
