"""torchcaps.models.convcaps: the small model with a routed convolutional capsule layer."""

from __future__ import annotations

import pytest
import torch

from torchcaps import (
    Conv2dCaps,
    ConvCaps2d,
    DenseCaps,
    DynamicRouting,
    InvertedDotProductRouting,
    SelfAttentionRouting,
    capsule_lengths,
)
from torchcaps.errors import ShapeError
from torchcaps.models import ConvCapsNet, get_model
from torchcaps.testing import assert_model_contract

SMALL = {"conv_channels": 16, "primary_capsules": 4, "conv_capsules": 4, "decoder_hidden": (32,)}


def test_layers_and_parameter_count() -> None:
    model = get_model("convcaps_mnist", reconstruction=False)
    assert isinstance(model, ConvCapsNet)
    assert isinstance(model.primary, Conv2dCaps) and isinstance(model.convcaps, ConvCaps2d)
    assert isinstance(model.digits, DenseCaps)
    c = model.convcaps
    assert (c.in_capsules, c.in_dim, c.out_capsules, c.out_dim) == (16, 8, 16, 8)
    assert (c.kernel_size, c.stride, c.padding) == ((3, 3), (1, 1), (0, 0))
    d = model.digits
    assert (d.in_capsules, d.in_dim, d.out_capsules, d.out_dim) == (16 * 3 * 3, 8, 10, 16)
    expected = (
        (1 * 25 + 1) * 64  # conv1, 5x5
        + (64 * 9 + 1) * 16 * 8  # primary capsules, 3x3
        + 9 * 16 * 16 * 8 * 8  # one 8x8 matrix per (kernel position, input type, output type)
        + 144 * 10 * 16 * 8  # class capsules
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 407_296


def test_forward_is_the_composition_of_its_layers() -> None:
    torch.manual_seed(0)
    model = ConvCapsNet(**SMALL).eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([2, 0, 9])
    with torch.no_grad():
        grid = model.convcaps(model.primary(torch.relu(model.conv1(x))))
        assert grid.shape == (3, 4, 3, 3, 8)
        v = model.digits(grid.flatten(1, 3))
        out = model(x, y)
        assert model.decoder is not None
        torch.testing.assert_close(out.capsules, v)
        torch.testing.assert_close(out.scores, capsule_lengths(v))
        torch.testing.assert_close(out.reconstruction, model.decoder(v, y))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("dynamic", DynamicRouting),
        ("self_attention", SelfAttentionRouting),
        ("inverted_dot_product", InvertedDotProductRouting),
    ],
)
def test_each_routed_layer_gets_its_own_routing_sized_for_it(name: str, cls: type) -> None:
    model = ConvCapsNet(routing=name, reconstruction=False, **SMALL)
    conv, dense = model.routings
    assert type(conv) is cls and type(dense) is cls and conv is not dense
    if cls is InvertedDotProductRouting:  # contract_kwargs: out_dim of each layer
        assert (conv.out_dim, dense.out_dim) == (8, 16)


def test_routing_kwargs_reach_both_layers() -> None:
    model = ConvCapsNet(routing="dynamic", routing_kwargs={"iterations": 1}, **SMALL)
    assert [r.iterations for r in model.routings] == [1, 1]
    idr = ConvCapsNet(routing="inverted_dot_product", routing_kwargs={"iterations": 3}, **SMALL)
    assert [r.iterations for r in idr.routings] == [3, 3]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("routing", ["self_attention", "inverted_dot_product"])
def test_model_contract_with_other_routings(routing: str) -> None:
    assert_model_contract(ConvCapsNet(routing=routing, **SMALL))


def test_other_input_sizes() -> None:
    model = ConvCapsNet((3, 32, 32), 5, reconstruction=False, **SMALL)
    # 32 -> conv1 14 -> primary 6 -> convcaps 4
    assert model.digits.in_capsules == 4 * 4 * 4
    assert model(torch.rand(2, 3, 32, 32)).scores.shape == (2, 5)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="routing must be a routing name"):
        ConvCapsNet(routing=DynamicRouting())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="could not resolve routing 'nope'"):
        ConvCapsNet(routing="nope")
    with pytest.raises(ValueError, match="at least 17x17"):
        ConvCapsNet((1, 16, 16))
    with pytest.raises(ValueError, match="conv_capsules"):
        ConvCapsNet(conv_capsules=0)
    with pytest.raises(TypeError, match="reconstruction must be a bool"):
        ConvCapsNet(reconstruction=1)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"x"):
        ConvCapsNet(**SMALL)(torch.rand(2, 1, 27, 28))
