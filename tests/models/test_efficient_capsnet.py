"""torchcaps.models.efficient_capsnet: Efficient-CapsNet's MNIST model, layer by layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchcaps import Conv2dCaps, DenseCaps, SelfAttentionRouting, capsule_lengths, exp_squash
from torchcaps.models import EfficientCapsNet, get_model


def test_parameter_counts_are_the_papers() -> None:
    model = get_model("efficient_capsnet_mnist", reconstruction=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 161_824
    with_decoder = get_model("efficient_capsnet_mnist")
    assert sum(p.numel() for p in with_decoder.parameters()) == 161_824 + 1_411_344


def test_architecture() -> None:
    model = EfficientCapsNet()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 32, (5, 5), (1, 1), (0, 0)),
        (32, 64, (3, 3), (1, 1), (0, 0)),
        (64, 64, (3, 3), (1, 1), (0, 0)),
        (64, 128, (3, 3), (2, 2), (0, 0)),
    ]
    kinds = [type(m) for m in model.features]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d] * 4  # Conv -> ReLU -> BatchNorm
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in norms)  # Keras' defaults
    assert isinstance(model.primary, Conv2dCaps)
    assert (model.primary.groups, model.primary.kernel_size) == (128, (9, 9))
    assert (model.primary.out_capsules, model.primary.capsule_dim) == (16, 8)
    assert model.primary.squash is exp_squash
    assert isinstance(model.digits, DenseCaps)
    d = model.digits
    assert (d.in_capsules, d.in_dim, d.out_capsules, d.out_dim) == (16, 8, 10, 16)
    assert isinstance(d.routing, SelfAttentionRouting) and d.routing.prior is not None
    assert tuple(d.routing.prior.shape) == (16, 10)
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 128, 9, 9)


def test_forward_is_the_composition_of_its_layers() -> None:
    torch.manual_seed(0)
    model = EfficientCapsNet().eval()
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([1, 4, 7])
    with torch.no_grad():
        v = model.digits(model.primary(model.features(x)))
        out = model(x, y)
        assert model.decoder is not None
        torch.testing.assert_close(out.capsules, v)
        torch.testing.assert_close(out.scores, capsule_lengths(v))
        torch.testing.assert_close(out.reconstruction, model.decoder(v, y))
        assert bool((out.scores < 1).all())


@torch.no_grad()
def test_initialisation_follows_the_official_code() -> None:
    torch.manual_seed(0)
    model = EfficientCapsNet()
    for conv in [m for m in model.features if isinstance(m, nn.Conv2d)] + [model.primary.conv]:
        fan_in = conv.weight[0].numel()
        std = float(conv.weight.std())
        assert std == pytest.approx(math.sqrt(2 / fan_in), rel=0.25)  # he_normal
        assert float(conv.weight.abs().max()) <= 2 * math.sqrt(2 / fan_in) / 0.8796 + 1e-6
        assert conv.bias is not None and bool((conv.bias == 0).all())
    w = model.digits.weight
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (10 * 16 * 8)), rel=0.1)
    assert bool((model.digits.routing.prior == 0).all())  # type: ignore[union-attr]


def test_bad_config() -> None:
    with pytest.raises(TypeError, match=r"EfficientCapsNet: in_shape must be a triple"):
        EfficientCapsNet((28, 28))
    with pytest.raises(
        ValueError, match=r"EfficientCapsNet: in_shape \(1, 10, 10\) must be square"
    ):
        EfficientCapsNet((1, 10, 10))
    with pytest.raises(ValueError, match=r"EfficientCapsNet: num_classes must be >= 1, got 0"):
        EfficientCapsNet(num_classes=0)
    with pytest.raises(TypeError, match="EfficientCapsNet: reconstruction must be a bool"):
        EfficientCapsNet(reconstruction=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EfficientCapsNet expected x of shape \(B, 1, 28, 28\)"):
        EfficientCapsNet()(torch.zeros(2, 1, 27, 28))


def test_other_input_sizes() -> None:
    model = EfficientCapsNet((3, 32, 32), 5, reconstruction=False)
    assert model.primary.kernel_size == (11, 11)  # the feature grid of 32x32 input
    assert model(torch.rand(2, 3, 32, 32)).capsules.shape == (2, 5, 16)
