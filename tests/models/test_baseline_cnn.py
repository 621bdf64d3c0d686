"""torchcaps.models.baseline_cnn: the paper's MNIST baseline CNN (layer sizes, parameter count,
forward against the layers composed by hand, dropout only in training, bad arguments)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchcaps.models import BaselineCNN, get_model


def test_the_papers_sizes_and_parameter_count() -> None:
    model = get_model("baseline_cnn_mnist")
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
            for c in model.convs] == [
        (1, 256, (5, 5), (1, 1), (2, 2)),
        (256, 256, (5, 5), (1, 1), (2, 2)),
        (256, 128, (5, 5), (1, 1), (2, 2)),
    ]  # fmt: skip
    assert (model.fc1.in_features, model.fc1.out_features) == (128 * 28 * 28, 328)
    assert (model.fc2.out_features, model.out.out_features) == (192, 10)
    # 6,656 + 1,638,656 + 819,328 + 32,915,784 + 63,168 + 1,930: the paper's "35.4M"
    assert sum(p.numel() for p in model.parameters()) == 35_445_522
    wide = get_model("baseline_cnn_mnist", in_shape=(1, 40, 40))
    assert wide.fc1.in_features == 128 * 40 * 40


def test_forward_is_the_layers_composed_by_hand_and_dropout_only_trains() -> None:
    torch.manual_seed(0)
    model = BaselineCNN((2, 9, 7), 4, channels=(3, 5, 2), hidden=(6, 5), dropout=0.5).double()
    x = torch.rand(3, 2, 9, 7, dtype=torch.float64)
    h = x
    for conv in model.convs:
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, padding=2))
    h = F.relu(h.flatten(1) @ model.fc1.weight.T + model.fc1.bias)
    h = F.relu(h @ model.fc2.weight.T + model.fc2.bias)
    expected = h @ model.out.weight.T + model.out.bias
    model.eval()
    out = model(x)
    torch.testing.assert_close(out.scores, expected)
    assert out.capsules is None and out.reconstruction is None
    model.train()
    a, b = model(x).scores, model(x).scores
    assert not torch.allclose(a, b)  # dropout is on in training
    assert torch.equal(model.eval()(x).scores, out.scores)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no decoder"):
        BaselineCNN(reconstruction=True)
    with pytest.raises(TypeError, match="channels must be a sequence of 3 ints"):
        BaselineCNN(channels=(8, 8))
    with pytest.raises(ValueError, match=r"hidden\[1\] must be >= 1"):
        BaselineCNN(hidden=(8, 0))
    with pytest.raises(ValueError, match="dropout must be <= 1"):
        BaselineCNN(dropout=1.5)
    with pytest.raises(ValueError, match="x"):
        get_model("baseline_cnn_mnist")(torch.rand(2, 1, 32, 32))
