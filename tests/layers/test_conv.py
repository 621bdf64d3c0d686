"""torchcaps.layers.conv: ConvCaps2d against a per-position loop over windows (float64,
Procedure 1 reference), against DenseCaps when the kernel covers the grid, with any routing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import torchcaps.layers.conv
from reference import routing_ref
from torchcaps import ConvCaps2d, DenseCaps, SelfAttentionRouting


def _conv_caps_ref(
    layer: ConvCaps2d, inp: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit loops: for each output position, its window's children, W @ u, Procedure 1."""
    b, n_in, h, w, _ = inp.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    h_out, w_out = layer.output_size(h, w)
    weights = layer.weight_matrices.detach().double()  # (kH, kW, N_in, N_out, D_out, D_in)
    n_out, d_out = layer.out_capsules, layer.out_dim
    v = torch.zeros(b, n_out, h_out, w_out, d_out, dtype=torch.float64)
    c = torch.zeros(b, h_out, w_out, kh * kw * n_in, n_out, dtype=torch.float64)
    for y in range(h_out):
        for x in range(w_out):
            u_hat = torch.zeros(b, kh * kw * n_in, n_out, d_out, dtype=torch.float64)
            for ky in range(kh):
                for kx in range(kw):
                    for n in range(n_in):
                        row, col = y * sh + ky - ph, x * sw + kx - pw
                        k = (ky * kw + kx) * n_in + n
                        if 0 <= row < h and 0 <= col < w:  # else a zero capsule: zero predictions
                            for j in range(n_out):
                                u_hat[:, k, j] = (
                                    inp[:, n, row, col].double() @ weights[ky, kx, n, j].T
                                )
            v_pos, c_pos = routing_ref(u_hat, iterations)
            v[:, :, y, x] = v_pos
            c[:, y, x] = c_pos
    return v, c


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(3, 1, 0, (5, 5)), (3, 2, 1, (6, 5)), ((2, 3), (2, 1), (1, 0), (5, 4)), (1, 1, 0, (3, 3))],
)
@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_the_per_position_reference(
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    size: tuple[int, int],
    iterations: int,
) -> None:
    torch.manual_seed(0)
    layer = ConvCaps2d(
        3,
        4,
        2,
        5,
        kernel,
        stride,
        padding,
        routing_kwargs={"iterations": iterations},
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
    inp = torch.randn(2, 3, *size, 4, dtype=torch.float64)
    v_ref, c_ref = _conv_caps_ref(layer, inp, iterations)
    v, c = layer(inp, return_coupling=True)
    assert v.shape == v_ref.shape and c.shape == c_ref.shape
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)


def test_a_kernel_over_the_whole_grid_is_dense_caps() -> None:
    torch.manual_seed(1)
    conv = ConvCaps2d(3, 4, 5, 6, kernel_size=(2, 3), dtype=torch.float64)
    dense = DenseCaps(3 * 2 * 3, 4, 5, 6, batch_chunk=None, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.normal_(0, 0.2)
        # DenseCaps reads a (B, N, H, W, D) grid in (n, h, w) order, ConvCaps2d's children are
        # in (ky, kx, n) order: reorder the same matrices.
        mats = conv.weight_matrices  # (kH, kW, N_in, N_out, D_out, D_in)
        dense_mats = mats.permute(2, 0, 1, 3, 4, 5).reshape(18, 5, 6, 4)  # (N_in*H*W, ...)
        dense.weight.copy_(dense_mats.permute(0, 3, 1, 2).reshape(18, 4, 30))
    inp = torch.randn(4, 3, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(dense.weight_matrices, dense_mats)
    torch.testing.assert_close(conv(inp)[:, :, 0, 0], dense(inp))


def test_weight_matrices_is_a_writable_view() -> None:
    layer = ConvCaps2d(2, 3, 4, 5, kernel_size=3)
    assert layer.weight_matrices.shape == (3, 3, 2, 4, 5, 3)
    with torch.no_grad():
        layer.weight_matrices[1, 2, 0, 3] = 7.0
    assert bool((layer.weight_matrices[1, 2, 0, 3] == 7.0).all())
    assert int((layer.weight == 7.0).sum()) == 5 * 3


def test_any_routing_plugs_in() -> None:
    layer = ConvCaps2d(
        2, 4, 3, 4, kernel_size=3, padding=1, routing=SelfAttentionRouting(learned_prior=(18, 3))
    )
    v, c = layer(torch.randn(2, 2, 4, 4, 4), return_coupling=True)
    assert v.shape == (2, 3, 4, 4, 4) and c.shape == (2, 4, 4, 18, 3)
    assert bool((v.norm(dim=-1) < 1).all())
    inverted = ConvCaps2d(
        2, 4, 3, 6, 2, routing="inverted_dot_product", routing_kwargs={"out_dim": 6}
    )
    assert inverted(torch.randn(1, 2, 3, 3, 4)).shape == (1, 3, 2, 2, 6)


def test_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    layer = ConvCaps2d(3, 4, 2, 5, kernel_size=3, padding=1, dtype=torch.float64)
    inp = torch.randn(3, 3, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    v, c = layer(inp, return_coupling=True)
    (g,) = torch.autograd.grad(v.square().sum(), inp)
    per_row = layer.window_capsules * 2 * 5 * 4
    monkeypatch.setattr(torchcaps.layers.conv, "CHUNK_BYTES", 7 * per_row)  # 7 rows per chunk
    v2, c2 = layer(inp, return_coupling=True)
    (g2,) = torch.autograd.grad(v2.square().sum(), inp)
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(c2, c)
    torch.testing.assert_close(g2, g)


def test_a_32x32_grid_is_routed_in_chunks_within_the_budget() -> None:
    # the default budget: 1024 positions x 144 children x 16 parents x 8D in float32 is 75 MB of
    # predictions, more than CHUNK_BYTES (64 MiB), so the layer routes them in two chunks
    layer = ConvCaps2d(16, 8, 16, 8, kernel_size=3, padding=1)
    sizes: list[int] = []
    layer.routing.register_forward_hook(
        lambda _m, args, _out: sizes.append(args[0].numel() * args[0].element_size())
    )
    with torch.no_grad():
        out = layer(torch.randn(1, 16, 32, 32, 8))
    assert out.shape == (1, 16, 32, 32, 8)
    assert len(sizes) == 2 and max(sizes) <= torchcaps.layers.conv.CHUNK_BYTES
    assert sum(sizes) == 1024 * 144 * 16 * 8 * 4


def test_gradcheck() -> None:
    torch.manual_seed(3)
    layer = ConvCaps2d(2, 3, 2, 3, kernel_size=2, stride=1, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
    inp = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    assert gradcheck(
        lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,)), (inp, weight)
    )


def test_half_precision_and_autocast() -> None:
    layer = ConvCaps2d(2, 4, 3, 4, kernel_size=3)
    inp = torch.randn(2, 2, 4, 4, 4)
    ref = layer(inp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(inp.to(torch.bfloat16))
    assert out.dtype == torch.float32  # float32 compute, as DenseCaps
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_bad_input() -> None:
    layer = ConvCaps2d(3, 4, 2, 5, kernel_size=3)
    with pytest.raises(
        ValueError,
        match=r"ConvCaps2d expected inp of shape \(B, 3, H, W, 4\), got \(2, 3, 5, 5, 5\)",
    ):
        layer(torch.zeros(2, 3, 5, 5, 5))
    with pytest.raises(ValueError, match=r"ConvCaps2d expected inp of shape \(B, 3, H, W, 4\)"):
        layer(torch.zeros(2, 12, 5, 5))
    with pytest.raises(ValueError, match=r"ConvCaps2d: input grid 2x5 is smaller than the kernel"):
        layer(torch.zeros(2, 3, 2, 5, 4))
    with pytest.raises(TypeError, match="ConvCaps2d: inp must be a real floating-point tensor"):
        layer(torch.zeros(2, 3, 5, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ConvCaps2d: kernel_size must be >= 1, got 0"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=0)
    with pytest.raises(ValueError, match=r"ConvCaps2d: padding\[1\] must be >= 0, got -1"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=3, padding=(0, -1))
    with pytest.raises(ValueError, match=r"ConvCaps2d: out_dim must be >= 1, got 0"):
        ConvCaps2d(3, 4, 2, 0, kernel_size=3)
    with pytest.raises(TypeError, match=r"ConvCaps2d: routing_kwargs must be a dict"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=3, routing_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="could not resolve routing 'nope'"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=3, routing="nope")
    with pytest.raises(ValueError, match=r"ConvCaps2d: in_capsules must be >= 1, got 0"):
        ConvCaps2d(0, 4, 2, 5, kernel_size=3)
    with pytest.raises(TypeError, match=r"ConvCaps2d: in_dim must be an int"):
        ConvCaps2d(3, 4.0, 2, 5, kernel_size=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ConvCaps2d: out_capsules must be >= 1, got -2"):
        ConvCaps2d(3, 4, -2, 5, kernel_size=3)
    with pytest.raises(ValueError, match=r"ConvCaps2d: stride\[0\] must be >= 1, got 0"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=3, stride=(0, 1))
    with pytest.raises(TypeError, match=r"ConvCaps2d: stride"):
        ConvCaps2d(3, 4, 2, 5, kernel_size=3, stride="2")  # type: ignore[arg-type]


def test_repr() -> None:
    layer = ConvCaps2d(3, 4, 2, 5, kernel_size=3, stride=2, padding=1)
    assert layer.extra_repr() == (
        "in_capsules=3, in_dim=4, out_capsules=2, out_dim=5, kernel_size=(3, 3), "
        "stride=(2, 2), padding=(1, 1)"
    )


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),  # batch
    st.integers(1, 3),  # input types
    st.integers(1, 3),  # output types
    st.integers(1, 3),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 1),  # padding
    st.integers(0, 3),  # extra grid rows beyond the kernel
    st.integers(0, 3),  # extra grid columns
    st.sampled_from(["dynamic", "self_attention"]),
)
def test_shapes_and_independence_of_examples(
    b: int, n_in: int, n_out: int, k: int, s: int, p: int, dh: int, dw: int, routing: str
) -> None:
    """The output grid is Conv2d's; each example's output is the layer applied to it alone."""
    torch.manual_seed(0)
    layer = ConvCaps2d(n_in, 3, n_out, 4, k, s, p, routing=routing).double()
    h, w = max(k - 2 * p, 1) + dh, max(k - 2 * p, 1) + dw
    inp = torch.randn(b, n_in, h, w, 3, dtype=torch.float64)
    v, c = layer(inp, return_coupling=True)
    conv = torch.nn.Conv2d(1, 1, k, s, p)(torch.zeros(1, 1, h, w))
    assert v.shape == (b, n_out, *conv.shape[-2:], 4)
    assert c.shape == (b, *conv.shape[-2:], k * k * n_in, n_out)
    for i in range(b):
        torch.testing.assert_close(layer(inp[i : i + 1])[0], v[i])
