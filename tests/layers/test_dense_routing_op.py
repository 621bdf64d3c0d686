"""torchcaps.layers._dense_routing_op: DenseCaps + DynamicRouting as one operator under compile.

The operator against the eager layer (float64 values, gradcheck), torch.library's own checks
of its fake and autograd registrations, and DenseCaps under torch.compile: which graphs hold
the operator, and that they compute what eager mode does.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from _helpers import compiled_graph_targets
from torchcaps import DenseCaps, DynamicRouting, SelfAttentionRouting
from torchcaps.layers._common import predictions
from torchcaps.layers._dense_routing_op import _forward_op, dense_dynamic_routing
from torchcaps.routing.dynamic import _rounds

OP = torch.ops.torchcaps.dense_dynamic_routing.default

# (iterations, stop_gradient, learned prior)
ROUTINGS = [
    (1, False, False),
    (3, False, False),
    (3, True, False),
    (2, False, True),
    (3, True, True),
]


def _layer(
    iterations: int, stop_gradient: bool, prior: bool, dtype: torch.dtype = torch.float64
) -> DenseCaps:
    routing = DynamicRouting(
        iterations, stop_gradient=stop_gradient, learned_prior=(6, 4) if prior else None
    )
    layer = DenseCaps(6, 3, 4, 5, routing=routing, batch_chunk=None).to(dtype)
    if prior:
        torch.nn.init.normal_(layer.routing.log_prior)  # zero would hide a transposed prior
    return layer


def _options(layer: DenseCaps) -> tuple[int, float, bool]:
    r = layer.routing
    return r.iterations, r.eps, r.stop_gradient


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_operator_matches_the_eager_layer_in_float64(routing: tuple, chunk: int) -> None:
    torch.manual_seed(0)
    layer = _layer(*routing)
    x = torch.randn(7, 6, 3, dtype=torch.float64)
    got = dense_dynamic_routing(
        x, layer.weight, layer.routing.log_prior, 4, 5, _options(layer), chunk
    )
    torch.testing.assert_close(got, layer(x), atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("routing", [r for r in ROUTINGS if not r[1]])
def test_operator_gradcheck(routing: tuple) -> None:
    """The hand-written backward chunk by chunk: gradients of the input, weight and prior."""
    torch.manual_seed(0)
    layer = _layer(*routing)
    x = torch.randn(5, 6, 3, dtype=torch.float64, requires_grad=True)
    prior = layer.routing.log_prior
    inputs = (x, layer.weight) if prior is None else (x, layer.weight, prior)

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        p = ts[2] if len(ts) == 3 else None
        return dense_dynamic_routing(ts[0], ts[1], p, 4, 5, _options(layer), 2)

    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("routing", [r for r in ROUTINGS if r[1]])
def test_operator_stopped_gradient_matches_autograd(routing: tuple) -> None:
    """stop_gradient=True is not the derivative of the forward by design (gradcheck does not
    apply): against autograd through the predictions and the plain rounds, in float64."""
    torch.manual_seed(0)
    layer = _layer(*routing)
    x = torch.randn(5, 6, 3, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    grad = torch.randn(5, 4, 5, dtype=torch.float64)
    prior = layer.routing.log_prior
    got = dense_dynamic_routing(x, layer.weight, prior, 4, 5, _options(layer), 2)
    u = predictions(x, layer.weight, 4, 5).transpose(1, 2)
    logits = None if prior is None else prior.t()
    expected = _rounds(u, logits, *_options(layer))[0]
    torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-12)
    for a, b in zip(
        torch.autograd.grad(got, params, grad),
        torch.autograd.grad(expected, params, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-10)


@pytest.mark.parametrize("prior", [False, True])
def test_opcheck(prior: bool) -> None:
    """torch.library's checks: the fake (meta) shapes, autograd registration, AOT dispatch."""
    torch.manual_seed(0)
    layer = _layer(3, False, prior, dtype=torch.float32)
    x = torch.randn(5, 6, 3, requires_grad=True)
    args = (x, layer.weight, layer.routing.log_prior, 4, 5, *_options(layer), 2, True)
    torch.library.opcheck(_forward_op, args)
    nograd = (x.detach(), layer.weight.detach(), None, 4, 5, *_options(layer), 2, False)
    torch.library.opcheck(_forward_op, nograd)


def test_saves_nothing_where_no_graph_is_recorded() -> None:
    layer = _layer(3, False, True, dtype=torch.float32)
    x = torch.randn(5, 6, 3)
    with torch.no_grad():
        outs = OP(x, layer.weight, layer.routing.log_prior, 4, 5, *_options(layer), 2, False)
        expected = layer(x)
    assert [t.numel() for t in outs[1:]] == [0, 0, 0, 0]
    torch.testing.assert_close(outs[0], expected, atol=1e-6, rtol=1e-5)
    saved = OP(x, layer.weight, layer.routing.log_prior, 4, 5, *_options(layer), 2, True)
    assert [tuple(t.shape) for t in saved[1:]] == [(5, 4, 6, 5), (3, 5, 4, 6), (3, 5, 4, 5)] + [
        (3, 5, 4, 5)
    ]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_compiled_dense_caps_runs_the_operator_and_matches_eager(routing: tuple) -> None:
    torch.manual_seed(0)
    layer = _layer(*routing, dtype=torch.float32)
    layer.batch_chunk = "auto"
    x = torch.randn(7, 6, 3)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    targets, got = compiled_graph_targets(layer, xc)
    assert OP in targets, targets
    expected = layer(xe)
    grad = torch.randn_like(expected)
    params = list(layer.parameters())
    got_grads = torch.autograd.grad(got, [xc, *params], grad)
    expected_grads = torch.autograd.grad(expected, [xe, *params], grad)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compiled_under_bf16_autocast_matches_eager() -> None:
    """A bf16 input (as a bf16-autocast layer before it leaves it) routes in float32."""
    torch.manual_seed(0)
    layer = _layer(3, False, False, dtype=torch.float32)
    x = torch.randn(5, 6, 3).bfloat16()
    results = []
    for compiled in (True, False):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if compiled:
                targets, v = compiled_graph_targets(layer, xr)
                assert OP in targets, targets
            else:
                v = layer(xr)
        results.append((v, *torch.autograd.grad(v, (xr, layer.weight), torch.ones_like(v))))
    for got, expected in zip(*results, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_other_routings_and_couplings_keep_the_plain_graph() -> None:
    """The operator runs DynamicRouting's rounds only: a subclass (which may change them), another
    routing algorithm and return_coupling=True are compiled as plain operations."""

    class MyRouting(DynamicRouting):
        pass

    x = torch.randn(3, 6, 3)
    for routing in (MyRouting(2), SelfAttentionRouting((6, 4))):
        targets, _ = compiled_graph_targets(DenseCaps(6, 3, 4, 5, routing=routing), x)
        assert OP not in targets, targets

    class WithCoupling(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.caps = DenseCaps(6, 3, 4, 5)

        def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.caps(t, return_coupling=True)

    targets, _ = compiled_graph_targets(WithCoupling(), x)
    assert OP not in targets, targets


def test_export_keeps_the_plain_operations() -> None:
    layer = DenseCaps(6, 3, 4, 5).eval()
    program = torch.export.export(layer, (torch.randn(2, 6, 3),))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("torchcaps" in t for t in targets), targets


def test_inductor_compiles_around_the_operator() -> None:
    """The default backend, forward and backward, in training and evaluation."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = _layer(3, False, True, dtype=torch.float32)
    layer.batch_chunk = 2
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 6, 3, requires_grad=True)
    got = compiled(x)
    expected = layer(x)
    grads = [torch.autograd.grad(v, (x, layer.weight), torch.ones_like(v)) for v in (got, expected)]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-5)
