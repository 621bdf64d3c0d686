from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchcaps import MaskedDecoder


def test_paper_decoder_shape_and_params() -> None:
    dec = MaskedDecoder(10, 16, (1, 28, 28))
    assert dec(torch.randn(3, 10, 16), torch.tensor([0, 5, 9])).shape == (3, 1, 28, 28)
    assert (
        sum(p.numel() for p in dec.parameters())
        == 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
    )
    sizes = [m.out_features for m in dec.net if isinstance(m, torch.nn.Linear)]
    assert sizes == [512, 1024, 784]


def test_decoder_equals_mlp_on_masked_input() -> None:
    dec = MaskedDecoder(4, 3, 6, hidden=(5,), dtype=torch.float64)
    v = torch.randn(2, 4, 3, dtype=torch.float64)
    t = torch.tensor([2, 0])
    masked = torch.zeros_like(v)
    masked[0, 2], masked[1, 0] = v[0, 2], v[1, 0]
    l1, l2 = dec.net[0], dec.net[2]
    expected = torch.sigmoid(l2(torch.relu(l1(masked.flatten(1)))))
    torch.testing.assert_close(dec(v, t), expected)
    # only the selected capsule matters
    v2 = v.clone()
    v2[0, 1] += 10
    v2[1, 3] -= 10
    torch.testing.assert_close(dec(v2, t), dec(v, t))


def test_decoder_none_target_uses_longest_capsule() -> None:
    dec = MaskedDecoder(5, 4, (2, 3))
    v = torch.randn(6, 5, 4)
    torch.testing.assert_close(dec(v), dec(v, v.norm(dim=-1).argmax(-1)))
    out = dec(v)
    assert out.shape == (6, 2, 3) and bool(((out > 0) & (out < 1)).all())


def test_decoder_gradcheck() -> None:
    dec = MaskedDecoder(3, 2, 4, hidden=(5, 3), dtype=torch.float64)
    v = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2])
    assert gradcheck(lambda x: dec(x, t), (v,))


def test_decoder_bad_input() -> None:
    dec = MaskedDecoder(10, 16, (1, 28, 28))
    with pytest.raises(
        ValueError, match=r"MaskedDecoder expected v of shape \(B, 10, 16\), got \(2, 10, 8\)"
    ):
        dec(torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\], got values in \[0, 10\]"):
        dec(torch.randn(2, 10, 16), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"target must have shape \(2,\)"):
        dec(torch.randn(2, 10, 16), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="MaskedDecoder: v must be a real floating-point tensor"):
        dec(torch.ones(2, 10, 16, dtype=torch.int32))


def test_decoder_bad_config() -> None:
    with pytest.raises(ValueError, match=r"MaskedDecoder: out_shape\[1\] must be >= 1, got 0"):
        MaskedDecoder(10, 16, (1, 0))
    with pytest.raises(
        TypeError, match="MaskedDecoder: out_shape must be an int or a non-empty tuple"
    ):
        MaskedDecoder(10, 16, ())
    with pytest.raises(ValueError, match=r"hidden\[0\] must be >= 1"):
        MaskedDecoder(10, 16, 784, hidden=(0,))
    dec = MaskedDecoder(10, 16, 784, hidden=())
    assert dec(torch.randn(1, 10, 16)).shape == (1, 784)
    assert "out_shape=(784,)" in repr(dec)
