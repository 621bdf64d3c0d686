"""torchcaps.models.matrix_capsnet: the paper's matrix-capsule architecture and its builders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchcaps import ClassMatrixCaps, ConvMatrixCaps2d, EMRouting, PrimaryMatrixCaps
from torchcaps.errors import ShapeError
from torchcaps.models import MatrixCapsNet, get_model

_SMALL_SIZES = {"conv_channels": 8, "primary_capsules": 2, "convcaps1_capsules": 2,
                "convcaps2_capsules": 2}  # fmt: skip


def _count(c_in: int, a: int, b: int, c: int, d: int, k: int) -> int:
    """Parameters of the architecture, layer by layer."""
    conv1 = c_in * 25 * a + a
    primary = a * b * 16 + b * 16 + a * b + b  # 1x1 convolutions to poses and activations
    em = 2  # beta_u, beta_a per parent type
    convcaps1 = 9 * b * c * 16 + em * c
    convcaps2 = 9 * c * d * 16 + em * d
    classcaps = d * k * 16 + em * k
    return conv1 + primary + convcaps1 + convcaps2 + classcaps


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("matrix_capsnet_smallnorb", (2, 32, 32, 32, 32, 5)),
        ("matrix_capsnet_small_smallnorb", (2, 64, 8, 16, 16, 5)),
        ("matrix_capsnet_mnist", (1, 32, 32, 32, 32, 10)),
        ("matrix_capsnet_small_mnist", (1, 64, 8, 16, 16, 10)),
    ],
)
def test_builders_and_parameter_counts(name: str, sizes: tuple[int, ...]) -> None:
    model = get_model(name)
    assert isinstance(model, MatrixCapsNet)
    c_in, a, b, c, d, k = sizes
    assert model.in_shape[0] == c_in and model.num_classes == k
    assert sum(p.numel() for p in model.parameters()) == _count(*sizes)


def test_paper_counts() -> None:
    # the paper's "310K" (large) and "68K" (small) smallNORB models
    assert sum(p.numel() for p in get_model("matrix_capsnet_smallnorb").parameters()) == 317_194
    small = get_model("matrix_capsnet_small_smallnorb")
    assert sum(p.numel() for p in small.parameters()) == 68_754


def test_architecture_and_grids() -> None:
    model = get_model("matrix_capsnet_smallnorb")
    assert (model.conv1.kernel_size, model.conv1.stride) == ((5, 5), (2, 2))
    assert isinstance(model.primary, PrimaryMatrixCaps)
    c1, c2 = model.convcaps1, model.convcaps2
    assert isinstance(c1, ConvMatrixCaps2d) and isinstance(c2, ConvMatrixCaps2d)
    assert (c1.kernel_size, c1.stride, c2.kernel_size, c2.stride) == (
        (3, 3),
        (2, 2),
        (3, 3),
        (1, 1),
    )
    assert isinstance(model.classcaps, ClassMatrixCaps) and model.classcaps.coordinate_addition
    # 32x32 -> 14x14 -> 6x6 -> 4x4
    x = torch.rand(2, 2, 32, 32)
    grid = model.primary(torch.relu(model.conv1(x)))
    assert grid.poses.shape == (2, 32, 14, 14, 16)
    g1 = c1(grid)
    assert g1.poses.shape == (2, 32, 6, 6, 16)
    assert c2(g1).poses.shape == (2, 32, 4, 4, 16)


def test_forward_is_the_composition_and_scores_are_activations() -> None:
    torch.manual_seed(0)
    model = get_model("matrix_capsnet_small_mnist")
    x = torch.rand(3, 1, 28, 28)
    out = model(x, torch.tensor([1, 2, 3]))
    caps = model.classcaps(
        model.convcaps2(model.convcaps1(model.primary(torch.relu(model.conv1(x)))))
    )
    torch.testing.assert_close(out.scores, caps.activations)
    torch.testing.assert_close(out.capsules, caps.poses)
    assert out.reconstruction is None
    assert bool(((out.scores > 0) & (out.scores < 1)).all())


def test_routing_arguments_reach_every_routed_layer() -> None:
    model = MatrixCapsNet(
        (1, 28, 28), 10, conv_channels=8, primary_capsules=2, convcaps1_capsules=3,
        convcaps2_capsules=3, routing_iterations=2, routing_kwargs={"final_lambda": 0.1},
        assignment="per_window",
    )  # fmt: skip
    routings = [model.convcaps1.routing, model.convcaps2.routing, model.classcaps.routing]
    assert all(isinstance(r, EMRouting) for r in routings)
    lambdas = [(r.iterations, r.final_lambda) for r in routings]  # type: ignore[union-attr]
    assert lambdas == [(2, 0.1), (2, 0.1), (2, 0.1 * 0.25)]  # the class layer's is a quarter
    assert model.convcaps1.assignment == "per_window"


def test_beta_a_scale_default_and_override() -> None:
    routed = ("convcaps1", "convcaps2", "classcaps")
    model = get_model("matrix_capsnet_small_mnist")
    assert [getattr(model, n).routing.beta_a_scale for n in routed] == [5000.0] * 3
    paper = get_model("matrix_capsnet_small_mnist", routing_kwargs={"beta_a_scale": 1.0})
    assert [getattr(paper, n).routing.beta_a_scale for n in routed] == [1.0] * 3


@pytest.mark.parametrize("scale", [0.25, 1.0, 0.5])
def test_class_lambda_scale_default_and_override(scale: float) -> None:
    model = get_model("matrix_capsnet_small_mnist", class_lambda_scale=scale)
    assert model.convcaps1.routing.final_lambda == 0.01  # type: ignore[union-attr]
    assert model.convcaps2.routing.final_lambda == 0.01  # type: ignore[union-attr]
    assert model.classcaps.routing.final_lambda == pytest.approx(0.01 * scale)  # type: ignore[union-attr]
    assert get_model("matrix_capsnet_mnist").classcaps.routing.final_lambda == 0.0025  # type: ignore[union-attr]


@pytest.mark.parametrize("coordinates", ["receptive_field", "grid"])
def test_class_activations_start_out_of_saturation(coordinates: str) -> None:
    """At initialisation the full lambda saturates every class capsule; a quarter does not."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        quarter = get_model("matrix_capsnet_small_mnist", coordinates=coordinates)(x).scores
        torch.manual_seed(0)
        full = get_model(
            "matrix_capsnet_small_mnist", class_lambda_scale=1.0, coordinates=coordinates
        )(x).scores
    assert bool((full > 0.99).all())
    assert bool((quarter < 0.91).all())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no decoder"):
        MatrixCapsNet(reconstruction=True)
    with pytest.raises(ValueError, match="at least 19x19"):
        MatrixCapsNet((1, 18, 18))
    with pytest.raises(ValueError, match="convcaps1_capsules"):
        MatrixCapsNet(convcaps1_capsules=0)
    with pytest.raises(TypeError, match="routing_kwargs must be a dict"):
        MatrixCapsNet(routing_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_lambda_scale"):
        MatrixCapsNet(class_lambda_scale=0.0)
    with pytest.raises(ShapeError, match="x"):
        get_model("matrix_capsnet_small_mnist")(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize(
    ("in_shape", "sizes"), [((1, 28, 28), _SMALL_SIZES), ((2, 32, 32), {}), ((1, 28, 36), {})]
)
def test_coordinate_addition_uses_the_receptive_field_centres(
    in_shape: tuple[int, int, int], sizes: dict[str, int]
) -> None:
    # The paper's coordinates: the centre of each class-layer child's receptive field in the
    # image, scaled by the image's size. The field is found here as the support of the gradient
    # of one cell through a chain of all-ones convolutions with the model's kernels and strides.
    model = MatrixCapsNet(in_shape, 10, **sizes)
    layers = (model.conv1, model.convcaps1, model.convcaps2)
    convs = [nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, bias=False) for m in layers]
    for conv in convs:
        nn.init.ones_(conv.weight)
    _, h, w = in_shape
    x = torch.ones(1, 1, h, w, dtype=torch.float64, requires_grad=True)
    y = x
    for conv in convs:
        y = conv.double()(y)
    (y0, dy), (x0, dx) = model.classcaps.receptive_field
    for row, col in [(0, 0), (y.shape[2] - 1, y.shape[3] - 1), (1, 0)]:
        (grad,) = torch.autograd.grad(y[0, 0, row, col], x, retain_graph=True)
        rows, cols = grad[0, 0].ne(0).any(dim=1).nonzero(), grad[0, 0].ne(0).any(dim=0).nonzero()
        # pixel i spans [i, i + 1): the support's centre
        assert (y0 + row * dy) * h == pytest.approx((rows.min() + rows.max() + 1).item() / 2)
        assert (x0 + col * dx) * w == pytest.approx((cols.min() + cols.max() + 1).item() / 2)


def test_grid_coordinates_are_the_grid_cells() -> None:
    model = get_model("matrix_capsnet_small_mnist", coordinates="grid")
    assert model.classcaps.receptive_field is None
    rows, cols = model.classcaps.coordinates(3, 3)
    torch.testing.assert_close(rows, torch.tensor([1 / 6, 3 / 6, 5 / 6], dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"coordinates must be one of \('receptive_field', 'grid'\)"
    ):
        get_model("matrix_capsnet_small_mnist", coordinates="pixels")
