from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

from reference import routing_ref, squash_ref
from torchcaps import Conv2dCaps, DenseCaps, DynamicRouting, MaskedDecoder, Routing, squash


# -- Conv2dCaps --------------------------------------------------------------------------------
def test_primary_caps_shape_and_params() -> None:
    layer = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)
    u = layer(torch.randn(2, 256, 20, 20))
    assert u.shape == (2, 32, 6, 6, 8)
    assert sum(p.numel() for p in layer.parameters()) == 256 * 256 * 81 + 256


def test_conv_caps_groups_channels_per_position() -> None:
    # Channel n*D + d at (h, w) is dimension d of capsule n at (h, w): not a plain view.
    layer = Conv2dCaps(3, 4, 2, kernel_size=3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y = F.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)  # (2, 8, 5, 6)
    expected = torch.empty(2, 4, 5, 6, 2, dtype=torch.float64)
    for n in range(4):
        for h in range(5):
            for w in range(6):
                expected[:, n, h, w] = squash_ref(y[:, n * 2 : n * 2 + 2, h, w])
    torch.testing.assert_close(layer(x), expected)


def test_conv_caps_accepts_capsule_grid() -> None:
    layer = Conv2dCaps(12, 5, 4, kernel_size=3, dtype=torch.float64)
    grid = torch.randn(2, 3, 7, 7, 4, dtype=torch.float64)  # N=3 capsules of D=4 -> 12 channels
    as_channels = grid.permute(0, 1, 4, 2, 3).reshape(2, 12, 7, 7)
    torch.testing.assert_close(layer(grid), layer(as_channels))
    assert layer(grid).shape == (2, 5, 5, 5, 4)
    # stacking: a Conv2dCaps grid feeds the next Conv2dCaps directly
    nxt = Conv2dCaps(20, 2, 3, kernel_size=3, dtype=torch.float64)
    assert nxt(layer(grid)).shape == (2, 2, 3, 3, 3)


def test_conv_caps_channels_last_same_result() -> None:
    layer = Conv2dCaps(8, 4, 4, kernel_size=3, stride=2)
    x = torch.randn(2, 8, 9, 9)
    out = layer.to(memory_format=torch.channels_last)(
        x.contiguous(memory_format=torch.channels_last)
    )
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-4)


def test_conv_caps_gradcheck() -> None:
    layer = Conv2dCaps(2, 2, 3, kernel_size=2, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(layer, (x,))


def test_conv_caps_bad_input() -> None:
    layer = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2)
    with pytest.raises(
        ValueError,
        match=r"Conv2dCaps expected input of shape \(B, 256, H, W\), got \(2, 255, 20, 20\)",
    ):
        layer(torch.randn(2, 255, 20, 20))
    with pytest.raises(
        ValueError, match=r"N\*D == in_channels == 256, got input of shape \(2, 32, 6, 6, 7\)"
    ):
        layer(torch.randn(2, 32, 6, 6, 7))
    with pytest.raises(
        ValueError,
        match=r"feature map \(B, 256, H, W\) or a capsule grid.*got input of shape \(256, 20\)",
    ):
        layer(torch.randn(256, 20))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(1, 256, 5, 5))
    with pytest.raises(TypeError, match="Conv2dCaps: input must be a real floating-point tensor"):
        layer(torch.ones(1, 256, 20, 20, dtype=torch.uint8))


def test_conv_caps_bad_config() -> None:
    with pytest.raises(ValueError, match="Conv2dCaps: out_capsules must be >= 1, got 0"):
        Conv2dCaps(3, 0, 8, 3)
    with pytest.raises(TypeError, match="Conv2dCaps: capsule_dim must be an int"):
        Conv2dCaps(3, 2, 8.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"padding must be >= 0, got -1"):
        Conv2dCaps(3, 2, 8, 3, padding=-1)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        Conv2dCaps(3, 2, 8, (3, 3, 3))  # type: ignore[arg-type]


def test_conv_caps_factory_kwargs_and_repr() -> None:
    layer = Conv2dCaps(4, 2, 3, 3, device="meta", dtype=torch.float64)
    assert layer.conv.weight.device.type == "meta" and layer.conv.weight.dtype == torch.float64
    assert "out_capsules=2, capsule_dim=3" in repr(layer)


# -- DenseCaps ---------------------------------------------------------------------------------
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
    assert "in_capsules=4, in_dim=8, out_capsules=10, out_dim=16" in repr(layer)
    assert layer.weight_matrices.shape == (4, 10, 16, 8)


def test_paper_model_parameter_counts() -> None:
    encoder = nn.Sequential(
        nn.Conv2d(1, 256, 9),
        nn.ReLU(),
        Conv2dCaps(256, 32, 8, kernel_size=9, stride=2),
        DenseCaps(1152, 8, 10, 16),
    )
    decoder = MaskedDecoder(10, 16, (1, 28, 28))
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_dec = sum(p.numel() for p in decoder.parameters())
    assert n_enc == 6_804_224  # 6.8M as in the paper
    assert n_enc + n_dec == 8_215_568  # 8.2M
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 10, 16)


def test_on_device(device: torch.device) -> None:
    model = nn.Sequential(Conv2dCaps(3, 4, 4, 3), DenseCaps(4 * 3 * 3, 4, 5, 6)).to(device)
    assert model(torch.randn(2, 3, 5, 5, device=device)).device == device


def test_conv_caps_bf16_autocast_forward() -> None:
    layer = Conv2dCaps(8, 4, 4, kernel_size=3, stride=2)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = layer(x)
    assert u.dtype == torch.bfloat16 and bool(torch.isfinite(u).all())
    torch.testing.assert_close(u.float(), layer(x), atol=3e-2, rtol=3e-2)


def test_paper_model_bf16_autocast_forward() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 256, 9),
        nn.ReLU(),
        Conv2dCaps(256, 32, 8, kernel_size=9, stride=2),
        DenseCaps(1152, 8, 10, 16),
    )
    x = torch.rand(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x)
    assert v.dtype == torch.float32  # routing ran in float32
    torch.testing.assert_close(v, model(x), atol=2e-3, rtol=5e-2)


def test_dtype_mismatch_is_a_type_error_outside_autocast() -> None:
    layer = Conv2dCaps(3, 2, 4, kernel_size=3)
    with pytest.raises(
        TypeError,
        match="Conv2dCaps: input has dtype torch.float64 but the parameters have torch.float32",
    ):
        layer(torch.rand(1, 3, 5, 5, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast reconciles the dtypes
        assert layer(torch.rand(1, 3, 5, 5, dtype=torch.bfloat16)).shape == (1, 2, 3, 3, 4)
