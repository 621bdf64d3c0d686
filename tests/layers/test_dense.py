"""torchcaps.layers.dense: DenseCaps (the paper's DigitCaps) with pluggable routing.

Exact values against the float64 reference, batch chunking (batch_chunk=...), extreme inputs
through DenseCaps, routing, losses and decoder, torch.compile, and fuzzing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.autograd import gradcheck

from _strategies import (
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
from torchcaps import (
    Conv2dCaps,
    DenseCaps,
    DynamicRouting,
    MarginLoss,
    MaskedDecoder,
    ReconstructionLoss,
    Routing,
    capsule_lengths,
    squash,
)


def _reference_dense(
    layer: DenseCaps, x: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """u_hat[j|i] = W_ij u_i with explicit loops, then routing_ref."""
    u = x.reshape(x.shape[0], layer.in_capsules, layer.in_dim).double()
    W = layer.weight_matrices.double()  # (N_in, N_out, D_out, D_in)
    u_hat = torch.empty(
        u.shape[0], layer.in_capsules, layer.out_capsules, layer.out_dim, dtype=torch.float64
    )
    for i in range(layer.in_capsules):
        for j in range(layer.out_capsules):
            u_hat[:, i, j] = u[:, i] @ W[i, j].T
    return routing_ref(u_hat, iterations)


@pytest.mark.parametrize("iterations", [1, 3])
def test_dense_caps_matches_reference(iterations: int, dtype: torch.dtype) -> None:
    layer = DenseCaps(6, 3, 4, 5, routing=DynamicRouting(iterations), dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
    x = torch.randn(2, 6, 3, dtype=dtype)
    v, c = layer(x, return_coupling=True)
    v_ref, c_ref = _reference_dense(layer, x, iterations)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert v.dtype == dtype
    torch.testing.assert_close(v.double(), v_ref, atol=tol, rtol=tol * 10)
    torch.testing.assert_close(c.double(), c_ref, atol=tol, rtol=tol * 10)


def test_digit_caps_shapes_and_params() -> None:
    layer = DenseCaps(1152, 8, 10, 16)
    assert isinstance(layer.routing, DynamicRouting) and layer.routing.iterations == 3
    assert sum(p.numel() for p in layer.parameters()) == 1152 * 10 * 16 * 8
    grid = torch.randn(2, 32, 6, 6, 8)
    assert layer(grid).shape == (2, 10, 16)
    torch.testing.assert_close(layer(grid), layer(grid.reshape(2, 1152, 8)))


@given(
    st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)
)
def test_dense_caps_any_size(batch: int, n_in: int, d_in: int, n_out: int, d_out: int) -> None:
    layer = DenseCaps(n_in, d_in, n_out, d_out, routing_kwargs={"iterations": 2})
    v, c = layer(torch.randn(batch, n_in, d_in), return_coupling=True)
    assert v.shape == (batch, n_out, d_out) and c.shape == (batch, n_in, n_out)
    assert bool((v.norm(dim=-1) < 1).all())


def test_dense_caps_gradcheck() -> None:
    layer = DenseCaps(4, 3, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(layer, (x,))
    w = layer.weight
    assert gradcheck(
        lambda weight: torch.func.functional_call(layer, {"weight": weight}, (x.detach(),)), (w,)
    )


def test_dense_caps_autocast_computes_routing_in_float32() -> None:
    layer = DenseCaps(20, 8, 4, 6)
    x = torch.randn(3, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = layer(x.bfloat16())
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, layer(x.bfloat16().float()), atol=1e-6, rtol=1e-5)


def test_dense_caps_user_routing_plugs_in() -> None:
    class MaxRouting(Routing):
        """Every child routes only to the parent whose prediction is longest."""

        def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = F.one_hot(u_hat.norm(dim=-1).argmax(-1), u_hat.shape[2]).to(u_hat.dtype)
            return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c

    class ForwardOnly(nn.Module):
        def forward(self, u_hat: torch.Tensor, return_coupling: bool = False):  # type: ignore[no-untyped-def]
            v = squash(u_hat.sum(1))
            c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2])
            return (v, c) if return_coupling else v

    x = torch.randn(2, 5, 3)
    layer = DenseCaps(5, 3, 4, 2, routing=MaxRouting())
    v, c = layer(x, return_coupling=True)
    assert v.shape == (2, 4, 2) and bool(((c == 0) | (c == 1)).all())
    with pytest.raises(TypeError, match="routing must be a Routing instance or a name"):
        DenseCaps(5, 3, 4, 2, routing=ForwardOnly())  # type: ignore[arg-type]


def test_dense_caps_bad_input() -> None:
    layer = DenseCaps(1152, 8, 10, 16)
    with pytest.raises(
        ValueError,
        match=r"DenseCaps expected 1152 input capsules of dim 8.*got input of shape \(2, 1151, 8\)",
    ):
        layer(torch.randn(2, 1151, 8))
    with pytest.raises(ValueError, match=r"got input of shape \(2, 1152, 7\)"):
        layer(torch.randn(2, 1152, 7))
    with pytest.raises(ValueError, match=r"got input of shape \(1152, 8\)"):
        layer(torch.randn(1152, 8))
    with pytest.raises(TypeError, match="DenseCaps: input must be a real floating-point tensor"):
        layer(torch.ones(2, 1152, 8, dtype=torch.int64))


def test_dense_caps_bad_config() -> None:
    with pytest.raises(ValueError, match="DenseCaps: in_capsules must be >= 1, got 0"):
        DenseCaps(0, 8, 10, 16)
    with pytest.raises(ValueError, match="could not resolve routing 'magic'"):
        DenseCaps(4, 8, 10, 16, routing="magic")
    with pytest.raises(TypeError, match="routing_kwargs must be a dict"):
        DenseCaps(4, 8, 10, 16, routing_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        DenseCaps(4, 8, 10, 16, routing_kwargs={"iterationz": 2})


def test_dense_caps_factory_kwargs_and_repr() -> None:
    layer = DenseCaps(4, 8, 10, 16, device="meta", dtype=torch.float64)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.float64
    assert layer.extra_repr() == "in_capsules=4, in_dim=8, out_capsules=10, out_dim=16"
    assert "(routing): DynamicRouting(iterations=3)" in repr(layer)
    assert layer.weight_matrices.shape == (4, 10, 16, 8)


def test_on_device(device: torch.device) -> None:
    model = nn.Sequential(Conv2dCaps(3, 4, 4, 3), DenseCaps(4 * 3 * 3, 4, 5, 6)).to(device)
    assert model(torch.randn(2, 3, 5, 5, device=device)).device == device


# -- batch_chunk: routing the batch in chunks gives the unchunked result --------------------------
def _pair(batch_chunk: int | str | None, **kwargs) -> tuple[DenseCaps, DenseCaps]:
    torch.manual_seed(0)
    whole = DenseCaps(6, 3, 4, 5, batch_chunk=None, dtype=torch.float64, **kwargs)
    chunked = DenseCaps(6, 3, 4, 5, batch_chunk=batch_chunk, dtype=torch.float64, **kwargs)
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


@given(batch=st.integers(1, 9), chunk=st.integers(1, 10), iterations=st.integers(1, 4))
def test_chunked_equals_whole_batch(batch: int, chunk: int, iterations: int) -> None:
    whole, chunked = _pair(chunk, routing=DynamicRouting(iterations))
    x = squash(torch.randn(batch, 6, 3, dtype=torch.float64))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v1, c1 = whole(x1, return_coupling=True)
    v2, c2 = chunked(x2, return_coupling=True)
    torch.testing.assert_close(v2, v1, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(c2, c1, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(v1)
    v1.backward(g)
    v2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(chunked.weight.grad, whole.weight.grad, atol=1e-12, rtol=1e-10)


def test_auto_chunk_size_from_the_byte_budget() -> None:
    layer = DenseCaps(1152, 8, 10, 16)  # 1152 * 10 * 16 * 4 bytes = 737,280 per example
    u = torch.zeros(100, 1152, 8)
    assert layer._chunk_size(u) == 16 * 1024 * 1024 // 737_280 == 22
    # 33.5 MB per example, over the budget: no chunking.
    assert DenseCaps(4, 1, 4096, 512)._chunk_size(torch.zeros(3, 4, 1)) == 3
    # 8 MiB per example: chunks of 2 examples, fewer than in_dim = 8, so no chunking ...
    assert DenseCaps(4, 8, 1024, 512)._chunk_size(torch.zeros(5, 4, 8)) == 5
    # ... but with in_dim = 2 chunks of 2.
    assert DenseCaps(4, 2, 1024, 512)._chunk_size(torch.zeros(5, 4, 2)) == 2
    assert DenseCaps(1152, 8, 10, 16, batch_chunk=None)._chunk_size(u) == 100
    assert DenseCaps(1152, 8, 10, 16, batch_chunk=7)._chunk_size(u) == 7


def test_auto_chunks_are_half_as_large_where_autograd_records_nothing() -> None:
    layer = DenseCaps(1152, 8, 10, 16)
    u = torch.zeros(100, 1152, 8)
    with torch.no_grad():
        assert layer._chunk_size(u) == 8 * 1024 * 1024 // 737_280 == 11
    with torch.inference_mode():
        assert layer._chunk_size(u) == 11
    layer.requires_grad_(False)
    assert layer._chunk_size(u) == 11  # frozen weights, an input without grad
    assert layer._chunk_size(u.requires_grad_()) == 22
    # in_dim still bounds the chunk: 4 MiB per example gives 2 < in_dim = 8, no chunking
    with torch.no_grad():
        assert DenseCaps(4, 8, 1024, 256)._chunk_size(torch.zeros(5, 4, 8)) == 5


def test_auto_does_not_chunk_off_cpu_or_when_tracing() -> None:
    layer = DenseCaps(1152, 8, 10, 16, device="meta")
    assert layer._chunk_size(torch.zeros(100, 1152, 8, device="meta")) == 100

    seen: list[int] = []

    class Spy(DenseCaps):
        def _chunk_size(self, u: torch.Tensor) -> int:
            seen.append(super()._chunk_size(u))
            return seen[-1]

    spy = Spy(1152, 8, 10, 16)
    torch.jit.trace(spy, (torch.randn(30, 1152, 8),), check_trace=False)
    assert seen == [30]


def test_auto_chunks_a_large_batch_with_the_same_result() -> None:
    torch.manual_seed(0)
    whole = DenseCaps(1152, 8, 10, 16, batch_chunk=None)
    auto = DenseCaps(1152, 8, 10, 16)
    auto.load_state_dict(whole.state_dict())
    x = squash(torch.randn(50, 1152, 8))  # 3 chunks: 22, 22, 6
    torch.testing.assert_close(auto(x), whole(x), atol=1e-6, rtol=1e-5)


def test_empty_batch() -> None:
    _, chunked = _pair(2)
    v, c = chunked(torch.zeros(0, 6, 3, dtype=torch.float64), return_coupling=True)
    assert v.shape == (0, 4, 5) and c.shape == (0, 6, 4)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"DenseCaps: batch_chunk must be >= 1, got 0"),
        ("fast", ValueError, r"batch_chunk must be a positive int, 'auto' or None, got 'fast'"),
        (2.5, TypeError, r"DenseCaps: batch_chunk must be an int, got float 2.5"),
    ],
)
def test_bad_batch_chunk(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DenseCaps(4, 2, 3, 2, batch_chunk=value)  # type: ignore[arg-type]


def test_batch_chunk_in_repr() -> None:
    assert "batch_chunk=4" in repr(DenseCaps(4, 2, 3, 2, batch_chunk=4))
    assert "batch_chunk" not in repr(DenseCaps(4, 2, 3, 2))


# -- extreme inputs: DenseCaps + DynamicRouting -> lengths -> losses, decoder ---------------------
def _pipeline(x: Tensor, n_out: int = 3, d_out: int = 4, iterations: int = 3) -> dict[str, Tensor]:
    """DenseCaps + DynamicRouting -> lengths -> MarginLoss, MaskedDecoder -> reconstruction."""
    b, n_in, d_in = x.shape
    torch.manual_seed(0)
    caps = DenseCaps(n_in, d_in, n_out, d_out, routing=DynamicRouting(iterations))
    decoder = MaskedDecoder(n_out, d_out, (1, 4, 4), hidden=(8,))
    x = x.clone().requires_grad_(True)
    v = caps(x)
    lengths = capsule_lengths(v)
    target = torch.arange(b) % n_out
    recon = decoder(v, target)
    loss = MarginLoss()(lengths, target) + ReconstructionLoss()(recon, torch.rand(b, 1, 4, 4))
    loss.backward()
    out = {"v": v, "lengths": lengths, "recon": recon, "loss": loss, "grad_x": x.grad}
    for name, p in [*caps.named_parameters(), *decoder.named_parameters()]:
        out[f"grad_{name}"] = p.grad
    # and squash on its own, values and gradients
    s = x.detach().clone().requires_grad_(True)
    sq = squash(s)
    (out["grad_squash"],) = torch.autograd.grad(sq.sum(), s)
    out["squash"] = sq
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "case",
    [
        "zeros",
        "huge-1e4",
        "huge-1e8",
        "huge-1e15",
        "huge-1e30",
        "batch-one",
        "one-input-capsule",
        "one-output-capsule",
        "20-iterations",
        "huge-20-iterations",
        "all-at-once",
    ],
)
def test_extreme_inputs_give_finite_values_and_gradients(case: str) -> None:
    g = torch.Generator().manual_seed(1)
    shape, kwargs = (4, 6, 8), {}
    scale = 1.0
    if case == "zeros":
        scale = 0.0
    elif case.startswith("huge"):
        scale = 1e4 if case == "huge-20-iterations" else float(case.split("-")[1])
    if case == "batch-one":
        shape = (1, 6, 8)
    if case == "one-input-capsule":
        shape = (4, 1, 8)
    if case == "one-output-capsule":
        kwargs["n_out"] = 1
    if "20-iterations" in case:
        kwargs["iterations"] = 20
    if case == "all-at-once":
        shape, kwargs, scale = (1, 1, 8), {"n_out": 1, "iterations": 20}, 1e8
    x = torch.randn(shape, generator=g) * scale
    out = _pipeline(x, **kwargs)
    for name, t in out.items():
        assert t is not None and bool(torch.isfinite(t).all()), f"{case}: {name} not finite"
    assert bool((out["lengths"] <= 1).all())
    if case == "zeros":
        assert bool((out["v"] == 0).all()) and bool((out["squash"] == 0).all())


# -- torch.compile ("aot_eager": graph capture without code generation; fullgraph fails on any
# graph break) --------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_compile_dense_caps_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DenseCaps(32, 8, 4, 6, routing=DynamicRouting(3))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 2, 4, 4, 8, requires_grad=True)
    v, c = compiled(x, return_coupling=True)
    v_ref, c_ref = layer(x, return_coupling=True)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-6, rtol=1e-5)
    (gx,) = torch.autograd.grad(v.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(v_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_compile_inductor_dense_caps_matches_eager() -> None:
    """The default backend once (compiling takes ~10-40 s on 2 CPU cores), inference only."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DenseCaps(32, 8, 4, 6, routing=DynamicRouting(3))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-5)


# -- fuzz ----------------------------------------------------------------------------------------
@given(st.data())
def test_fuzz_dense_caps(data: st.DataObject) -> None:
    ctor = ["in_capsules", "in_dim", "out_capsules", "out_dim", "routing", "routing_kwargs"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "x", "x"]), label="broken")
    args: dict[str, Any] = {
        "in_capsules": data.draw(st.integers(1, 8)),
        "in_dim": data.draw(st.integers(1, 4)),
        "out_capsules": data.draw(st.integers(1, 4)),
        "out_dim": data.draw(st.integers(1, 4)),
    }
    routing_choice = data.draw(st.integers(0, 2))
    if routing_choice == 0:
        args["routing"] = "dynamic"
        args["routing_kwargs"] = data.draw(st.sampled_from([None, {}, {"iterations": 2}]))
    elif routing_choice == 1:
        args["routing"] = data.draw(
            st.sampled_from(["Dynamic-Routing", "dynamic_routing", "DYNAMIC"])
        )
    else:
        args["routing"] = DynamicRouting(data.draw(st.integers(1, 4)))
    kind = ""
    if broken in ("in_capsules", "in_dim", "out_capsules", "out_dim"):
        args[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "routing":
        args["routing"] = data.draw(st.sampled_from(["em", "", 3, None, torch.nn.ReLU()]))
        args.pop("routing_kwargs", None)
    elif broken == "routing_kwargs":
        if isinstance(args["routing"], Routing):
            args["routing_kwargs"] = {"iterations": 2}
        else:
            args["routing_kwargs"] = data.draw(
                st.sampled_from([[("iterations", 2)], "iterations=2", 3])
            )
    if broken in ctor:
        kind = repr(args[broken])
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    layer = check_call(
        "DenseCaps",
        lambda: DenseCaps(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if layer is RAISED:
        return
    b = data.draw(st.integers(0, 3), label="B")
    n_in, d_in = layer.in_capsules, layer.in_dim
    middle = data.draw(st.sampled_from([(n_in,), (1, n_in), (n_in, 1)]), label="middle")
    shape = (b, *middle, d_in)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    x: Any = data.draw(real_tensors(shape, dtype, nonfinite=nonfinite), label="x")
    if broken == "x":
        if data.draw(st.booleans()):
            x, kind = data.draw(bad_tensors(shape))
        else:
            bad_shape = data.draw(
                st.sampled_from([(b, n_in + 1, d_in), (b, n_in, d_in + 1), (n_in, d_in), (b,)])
            )
            x, kind = torch.rand(bad_shape), f"shape {bad_shape}"
    out = check_call(
        "DenseCaps",
        lambda: layer(x, return_coupling=True),
        "x" if broken == "x" else None,
        kind,
        nonfinite="x" if nonfinite else None,
    )
    if out is RAISED:
        return
    v, c = out
    assert v.shape == (b, layer.out_capsules, layer.out_dim)
    assert c.shape == (b, n_in, layer.out_capsules)
    if not nonfinite:
        assert finite(v) and finite(c)


# -- a former gap found by fuzzing, kept as a regression test ------------------------------------
def test_gap_dense_caps_non_tensor_input() -> None:
    with pytest.raises(TypeError, match="input"):
        DenseCaps(4, 3, 2, 2)([[0.0] * 3] * 4)
