"""torchcaps.layers.matrix: the matrix-capsule layers against per-position loops written from the
paper (votes M W, EM routing from tests/reference.py), coordinate addition against hand-computed
offsets, the all-positions E-step normalisation, gradients and errors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from reference import em_routing_ref
from torchcaps import EMRouting, ShapeError
from torchcaps.layers import ClassMatrixCaps, ConvMatrixCaps2d, MatrixCapsules, PrimaryMatrixCaps
from torchcaps.routing import MatrixRouting


def _grid(b: int, n: int, h: int, w: int, seed: int = 0) -> MatrixCapsules:
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(b, n, h, w, 16, generator=g, dtype=torch.float64)
    acts = torch.rand(b, n, h, w, generator=g, dtype=torch.float64)
    return MatrixCapsules(poses, acts)


def _randomise_routing(routing: EMRouting, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        routing.beta_u.copy_(0.3 * torch.randn(routing.out_capsules, generator=g))
        routing.beta_a.copy_(torch.randn(routing.out_capsules, generator=g))


def test_primary_capsules_are_two_1x1_convolutions() -> None:
    layer = PrimaryMatrixCaps(5, 3).double()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    caps = layer(x)
    wp, bp = layer.pose.weight[:, :, 0, 0], layer.pose.bias
    wa, ba = layer.activation.weight[:, :, 0, 0], layer.activation.bias
    for h in range(4):
        for w in range(3):
            pose = (x[:, :, h, w] @ wp.T + bp).view(2, 3, 16)  # capsule n: channels 16n..16n+15
            torch.testing.assert_close(caps.poses[:, :, h, w], pose)
            torch.testing.assert_close(
                caps.activations[:, :, h, w], torch.sigmoid(x[:, :, h, w] @ wa.T + ba)
            )


def _conv_ref(layer: ConvMatrixCaps2d, x: MatrixCapsules) -> MatrixCapsules:
    """Per output position: the window's children (zero, inactive capsules in the padding),
    votes M_n W[ky, kx, n, j] by explicit 4x4 products, EM routing (float64 loops)."""
    poses, acts = x
    b, n_in, h, w, _ = poses.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    h_out, w_out = layer.output_size(h, w)
    n_out = layer.out_capsules
    weights = layer.weight_matrices.detach().double()
    routing = layer.routing
    out_p = torch.zeros(b, n_out, h_out, w_out, 16, dtype=torch.float64)
    out_a = torch.zeros(b, n_out, h_out, w_out, dtype=torch.float64)
    for y in range(h_out):
        for x_ in range(w_out):
            votes = torch.zeros(b, kh * kw * n_in, n_out, 16, dtype=torch.float64)
            child_acts = torch.zeros(b, kh * kw * n_in, dtype=torch.float64)
            for ky in range(kh):
                for kx in range(kw):
                    for n in range(n_in):
                        row, col = y * sh + ky - ph, x_ * sw + kx - pw
                        k = (ky * kw + kx) * n_in + n
                        if 0 <= row < h and 0 <= col < w:
                            m = poses[:, n, row, col].view(b, 4, 4)
                            child_acts[:, k] = acts[:, n, row, col]
                            for j in range(n_out):
                                votes[:, k, j] = (m @ weights[ky, kx, n, j]).reshape(b, 16)
            p, a, _ = em_routing_ref(
                votes,
                child_acts,
                routing.beta_u.detach(),
                routing.beta_a.detach(),
                routing.iterations,
                routing.final_lambda,
                routing.eps,
                routing.mass_scale,
            )
            out_p[:, :, y, x_], out_a[:, :, y, x_] = p, a
    return MatrixCapsules(out_p, out_a)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(3, 1, 0, (4, 4)), (3, 2, 1, (5, 4)), ((2, 3), (2, 1), (0, 1), (4, 3))],
)
@pytest.mark.parametrize("iterations", [1, 3])
def test_conv_per_window_matches_the_per_position_reference(
    kernel: object, stride: object, padding: object, size: tuple[int, int], iterations: int
) -> None:
    torch.manual_seed(0)
    layer = ConvMatrixCaps2d(
        2,
        3,
        kernel,  # type: ignore[arg-type]
        stride,  # type: ignore[arg-type]
        padding,  # type: ignore[arg-type]
        routing_kwargs={"iterations": iterations, "final_lambda": 0.05},
        assignment="per_window",
    ).double()
    _randomise_routing(layer.routing)  # type: ignore[arg-type]
    x = _grid(2, 2, *size)
    got, expected = layer(x), _conv_ref(layer, x)
    torch.testing.assert_close(got.poses, expected.poses, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got.activations, expected.activations, atol=1e-9, rtol=1e-7)


class _ActivationWeightedMean(MatrixRouting):
    """A user routing: every parent the activation-weighted mean of its votes, as active as
    the mean child."""

    def route(
        self, votes: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n_in, n_out, _ = votes.shape
        w = activations / activations.sum(dim=1, keepdim=True)
        poses = torch.einsum("bi,bijp->bjp", w, votes)
        a = activations.mean(dim=1, keepdim=True).expand(b, n_out)
        return poses, a, votes.new_full((b, n_in, n_out), 1.0 / n_out)


def test_conv_takes_any_matrix_routing_per_window() -> None:
    """A routing that is not EM gets each window's votes through its validated forward."""
    torch.manual_seed(0)
    layer = ConvMatrixCaps2d(
        2, 3, 3, stride=2, padding=1, routing=_ActivationWeightedMean(), assignment="per_window"
    ).double()
    em_layer = ConvMatrixCaps2d(
        2, 3, 3, stride=2, padding=1, routing_kwargs={"iterations": 1}, assignment="per_window"
    ).double()
    with torch.no_grad():
        em_layer.weight.copy_(layer.weight)
    x = _grid(2, 2, 5, 4)
    x = MatrixCapsules(x.poses, x.activations + 0.1)  # padding children are inactive (0)
    got = layer(x)
    # one EM iteration from uniform assignments: the same activation-weighted means
    torch.testing.assert_close(got.poses, em_layer(x).poses)
    with pytest.raises(TypeError, match="all_positions"):
        ConvMatrixCaps2d(2, 3, 3, routing=_ActivationWeightedMean())


@pytest.mark.parametrize("assignment", ["all_positions", "per_window"])
def test_evaluation_in_chunks_of_images_is_the_same_function(
    assignment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd the batch is routed a few whole images at a time (here one, with a
    chunk budget of one byte): the same result as the batch in one piece."""
    import torchcaps.layers.matrix as matrix

    torch.manual_seed(0)
    layer = ConvMatrixCaps2d(2, 3, 3, stride=1, padding=1, assignment=assignment).double()
    x = _grid(3, 2, 5, 4)
    whole = layer(x)  # grad mode: one piece
    monkeypatch.setattr(matrix, "CHUNK_BYTES", 1)
    with torch.no_grad():
        chunked = layer(x)
    torch.testing.assert_close(chunked.poses, whole.poses.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.activations, whole.activations.detach())


def test_all_positions_equals_per_window_without_overlap() -> None:
    torch.manual_seed(0)
    a = ConvMatrixCaps2d(2, 3, 2, stride=2, assignment="all_positions").double()
    b = ConvMatrixCaps2d(2, 3, 2, stride=2, assignment="per_window").double()
    b.load_state_dict(a.state_dict())
    x = _grid(2, 2, 4, 6)
    for ya, yb in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(ya, yb)


def test_all_positions_normalises_each_child_over_every_window_that_sees_it() -> None:
    """exp(log_normalize(logits)) summed over all (window, parent) pairs of a child is 1, and
    equals the explicit softmax over that set."""
    layer = ConvMatrixCaps2d(2, 3, 3, stride=1, padding=1)
    b, h, w = 2, 4, 3
    h_out, w_out = layer.output_size(h, w)
    normalize = layer._all_positions_normalizer(b, h, w, h_out, w_out)
    logits = torch.randn(b * h_out * w_out, 9 * 2, 3, dtype=torch.float64) * 5
    r = torch.exp(normalize(logits)).view(b, h_out, w_out, 3, 3, 2, 3)
    logits6 = logits.view(b, h_out, w_out, 3, 3, 2, 3)
    for bb in range(b):
        for row in range(h):
            for col in range(w):
                for n in range(2):
                    entries = [
                        (y, x, ky, kx)
                        for y in range(h_out)
                        for x in range(w_out)
                        for ky in range(3)
                        for kx in range(3)
                        if y + ky - 1 == row and x + kx - 1 == col
                    ]
                    got = torch.stack([r[bb, y, x, ky, kx, n] for y, x, ky, kx in entries])
                    raw = torch.stack([logits6[bb, y, x, ky, kx, n] for y, x, ky, kx in entries])
                    expected = torch.softmax(raw.flatten(), 0).view_as(raw)
                    torch.testing.assert_close(got, expected)
                    assert float(got.sum()) == pytest.approx(1.0)


def test_coordinate_addition_against_hand_computed_offsets() -> None:
    layer = ClassMatrixCaps(2, 3).double()
    poses = torch.zeros(1, 2, 2, 4, 16, dtype=torch.float64)  # zero poses: votes are the offsets
    votes = layer.votes(poses).view(1, 2, 4, 2, 3, 16)  # (B, H, W, N_in, K, 16)
    for h in range(2):
        for w in range(4):
            expected = torch.zeros(16, dtype=torch.float64)
            expected[3] = (h + 0.5) / 2  # pose entry (0, 3): the scaled row
            expected[7] = (w + 0.5) / 4  # pose entry (1, 3): the scaled column
            for n in range(2):
                for j in range(3):
                    torch.testing.assert_close(votes[0, h, w, n, j], expected)
    plain = ClassMatrixCaps(2, 3, coordinate_addition=False).double()
    assert bool((plain.votes(poses) == 0).all())
    # given receptive fields: row h at 0.3 + 0.25 h, column w at 0.1 + 0.2 w
    placed = ClassMatrixCaps(2, 3, receptive_field=((0.3, 0.25), (0.1, 0.2))).double()
    votes = placed.votes(poses).view(1, 2, 4, 2, 3, 16)
    for h in range(2):
        for w in range(4):
            expected = torch.zeros(16, dtype=torch.float64)
            expected[3], expected[7] = 0.3 + 0.25 * h, 0.1 + 0.2 * w
            torch.testing.assert_close(votes[0, h, w], expected.expand(2, 3, 16))


def test_class_capsules_match_the_reference() -> None:
    torch.manual_seed(0)
    layer = ClassMatrixCaps(2, 3, routing_kwargs={"iterations": 2, "final_lambda": 0.05}).double()
    _randomise_routing(layer.routing)  # type: ignore[arg-type]
    x = _grid(2, 2, 3, 2)
    b, n, h, w, _ = x.poses.shape
    votes = torch.zeros(b, h * w * n, 3, 16, dtype=torch.float64)
    acts = torch.zeros(b, h * w * n, dtype=torch.float64)
    weights = layer.weight.detach()
    for row in range(h):
        for col in range(w):
            for t in range(n):
                k = (row * w + col) * n + t
                acts[:, k] = x.activations[:, t, row, col]
                for j in range(3):
                    v = x.poses[:, t, row, col].view(b, 4, 4) @ weights[t, j]
                    v[:, 0, 3] += (row + 0.5) / h
                    v[:, 1, 3] += (col + 0.5) / w
                    votes[:, k, j] = v.reshape(b, 16)
    r = layer.routing
    expected = em_routing_ref(
        votes, acts, r.beta_u.detach(), r.beta_a.detach(), 2, 0.05, r.eps, r.mass_scale
    )
    got = layer(x)
    torch.testing.assert_close(got.poses, expected[0], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got.activations, expected[1], atol=1e-9, rtol=1e-7)


def test_layers_compose_in_sequential_with_finite_gradients() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        PrimaryMatrixCaps(6, 4),
        ConvMatrixCaps2d(4, 5, 3, stride=2),
        ConvMatrixCaps2d(5, 5, 3),
        ClassMatrixCaps(5, 10),
    )
    x = torch.randn(3, 6, 12, 12, requires_grad=True)
    out = net(x)
    assert out.poses.shape == (3, 10, 16) and out.activations.shape == (3, 10)
    out.activations.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


@pytest.mark.parametrize("assignment", ["all_positions", "per_window"])
def test_conv_gradcheck(assignment: str) -> None:
    torch.manual_seed(0)
    layer = ConvMatrixCaps2d(
        1,
        2,
        2,
        routing_kwargs={"iterations": 2, "final_lambda": 0.5, "eps": 0.1},
        assignment=assignment,  # type: ignore[arg-type]
    ).double()
    x = _grid(1, 1, 3, 2)
    poses, acts = x.poses.requires_grad_(True), x.activations.requires_grad_(True)
    assert gradcheck(lambda p, a: tuple(layer(MatrixCapsules(p, a))), (poses, acts), atol=1e-5)


def test_bad_input() -> None:
    layer = ConvMatrixCaps2d(2, 3, 3)
    good = MatrixCapsules(torch.randn(2, 2, 5, 5, 16), torch.rand(2, 2, 5, 5))
    with pytest.raises(TypeError, match="MatrixCapsules"):
        layer(good.poses)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"poses of shape \(B, 2, H, W, 16\)"):
        layer(MatrixCapsules(torch.randn(2, 3, 5, 5, 16), torch.rand(2, 3, 5, 5)))
    with pytest.raises(
        ShapeError,
        match=r"activations of shape \(2, 2, 5, 5\) \(the poses' batch.*got \(2, 2, 5, 4\)",
    ):
        layer(MatrixCapsules(good.poses, torch.rand(2, 2, 5, 4)))
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        layer(MatrixCapsules(torch.randn(2, 2, 2, 2, 16), torch.rand(2, 2, 2, 2)))
    with pytest.raises(ValueError, match="assignment"):
        ConvMatrixCaps2d(2, 3, 3, assignment="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built for 4 parents, the layer has 3"):
        ConvMatrixCaps2d(2, 3, 3, routing=EMRouting(4))
    with pytest.raises(ValueError, match=r"ConvMatrixCaps2d: kernel_size must be >= 1, got 0"):
        ConvMatrixCaps2d(2, 3, 0)
    with pytest.raises(ValueError, match=r"ConvMatrixCaps2d: stride\[1\] must be >= 1, got 0"):
        ConvMatrixCaps2d(2, 3, 3, stride=(1, 0))
    with pytest.raises(ValueError, match=r"ConvMatrixCaps2d: padding must be >= 0, got -1"):
        ConvMatrixCaps2d(2, 3, 3, padding=-1)
    with pytest.raises(TypeError, match=r"ConvMatrixCaps2d: kernel_size must be an int"):
        ConvMatrixCaps2d(2, 3, 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="routing_kwargs must be a dict"):
        ClassMatrixCaps(2, 3, routing_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coordinate_addition must be a bool"):
        ClassMatrixCaps(2, 3, coordinate_addition=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"receptive_field must be None or \(\(y0, dy\),"):
        ClassMatrixCaps(2, 3, receptive_field=(0.5, 0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="receptive_field must be finite"):
        ClassMatrixCaps(2, 3, receptive_field=((0.5, float("nan")), (0.5, 0.1)))
    with pytest.raises(ValueError, match="out_capsules"):
        PrimaryMatrixCaps(4, 0)
    with pytest.raises(ShapeError, match=r"x of shape \(B, 4, H, W\)"):
        PrimaryMatrixCaps(4, 2)(torch.randn(2, 3, 5, 5))


def test_the_benchmarks_straightforward_conv_em_is_the_same_function() -> None:
    """benchmarks/reference_routing.NaiveConvEMCaps (the yardstick of EM benchmarks) computes
    what ConvMatrixCaps2d(assignment="per_window") computes."""
    import reference_routing

    torch.manual_seed(0)
    ours = ConvMatrixCaps2d(3, 4, 3, stride=2, assignment="per_window").double()
    naive = reference_routing.NaiveConvEMCaps(3, 4, 3, stride=2).double()
    with torch.no_grad():
        naive.W.copy_(ours.weight)
    x = _grid(2, 3, 7, 7)
    got, expected = ours(x), naive(x.poses, x.activations)
    torch.testing.assert_close(got.poses, expected[0])
    torch.testing.assert_close(got.activations, expected[1])
