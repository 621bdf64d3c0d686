"""torchcaps.layers._single_channel_conv: a one-channel convolution under compile with autocast.

Which graphs hold the operator, that they compute what eager autocast does (values, layout,
gradients), and torch.library's own checks of the operator.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _helpers import compiled_graph_targets
from torchcaps.layers._single_channel_conv import _forward_op, conv2d
from torchcaps.models import CapsNet

OP = torch.ops.torchcaps.single_channel_conv2d.default


class _Stem(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(conv2d(self.conv, x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_args", [(3, 1, 0), (5, 2, 1)], ids=["3x3", "5x5-s2-p1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_matches_eager_autocast(
    bias: bool, conv_args: tuple[int, int, int], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    k, stride, padding = conv_args
    conv = nn.Conv2d(1, 6, k, stride=stride, padding=padding, bias=bias)
    conv = conv.to(memory_format=torch.channels_last)
    stem = _Stem(conv)
    x = torch.randn(3, 1, 11, 12)
    results = []
    for compiled in (True, False):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            if compiled:
                targets, y = compiled_graph_targets(stem, xr)
                assert OP in targets, targets
            else:
                y = stem(xr)
        params = [xr, *conv.parameters()]
        grads = torch.autograd.grad(y, params, torch.ones_like(y))
        results.append((y, *grads))
    for got, expected in zip(*results, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)


def test_plain_convolution_elsewhere() -> None:
    """Outside autocast, with more than one input channel, and under export: plain graphs."""
    x1, x3 = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 8, 8)
    targets, _ = compiled_graph_targets(_Stem(nn.Conv2d(1, 4, 3)), x1)
    assert OP not in targets
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets, _ = compiled_graph_targets(_Stem(nn.Conv2d(3, 4, 3)), x3)
        assert OP not in targets
        program = torch.export.export(_Stem(nn.Conv2d(1, 4, 3)), (x1,))
    assert not any("torchcaps" in str(node.target) for node in program.graph.nodes)
    # eager: the module's own forward, whatever the dtype
    conv = nn.Conv2d(1, 4, 3)
    torch.testing.assert_close(conv2d(conv, x1), conv(x1), atol=0, rtol=0)


def test_opcheck() -> None:
    """torch.library's checks: fake (meta) shapes and strides, autograd registration."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 9, 8, requires_grad=True)
    args = (x, conv.weight, conv.bias, [2, 2], [1, 1], 1, torch.bfloat16)
    torch.library.opcheck(_forward_op, args)


def test_capsnet_compiled_under_autocast_runs_its_first_convolution_as_the_operator() -> None:
    torch.manual_seed(0)
    model = CapsNet(in_shape=(1, 20, 20), conv_channels=8, primary_capsules=2, primary_dim=4)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 20, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        targets, got = compiled_graph_targets(model, x)
        expected = model(x)
    assert OP in targets, targets
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=1e-5)
