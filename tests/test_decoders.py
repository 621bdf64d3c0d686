"""torchcaps.decoders: MaskedDecoder (the paper's reconstruction network)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

from _strategies import (
    BAD_INTS,
    MODULE_DTYPES,
    NON_TENSORS,
    RAISED,
    bad_tensors,
    check_call,
    finite,
    real_tensors,
)
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


def test_decoder_several_targets_per_sample_decode_each_capsule_alone() -> None:
    dec = MaskedDecoder(5, 3, (1, 4, 4), hidden=(7,), dtype=torch.float64)
    v = torch.randn(3, 5, 3, dtype=torch.float64)
    target = torch.tensor([[4, 0], [1, 1], [2, 3]])
    out = dec(v, target)
    assert out.shape == (3, 2, 1, 4, 4)
    for m in range(2):  # the m-th reconstruction is the one masked by target[:, m]
        torch.testing.assert_close(out[:, m], dec(v, target[:, m]))
    assert dec(v, target[:, :1]).shape == (3, 1, 1, 4, 4)
    vg = v.clone().requires_grad_(True)
    assert gradcheck(lambda x: dec(x, target), (vg,))


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
    # MaskedDecoder calls the public mask_capsules, which names itself
    with pytest.raises(
        ValueError, match=r"mask_capsules expected target of shape \(2,\), got \(2, 1, 1\)"
    ):
        dec(torch.randn(2, 10, 16), torch.tensor([[[0]], [[1]]]))
    with pytest.raises(
        ValueError, match=r"MaskedDecoder expected target of shape \(2, M\), got \(1, 2\)"
    ):
        dec(torch.randn(2, 10, 16), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\], got values in \[0, 12\]"):
        dec(torch.randn(2, 10, 16), torch.tensor([[0, 1], [12, 3]]))
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


# -- fuzz ----------------------------------------------------------------------------------------
@given(st.data())
def test_fuzz_masked_decoder(data: st.DataObject) -> None:
    ctor = ["num_capsules", "capsule_dim", "out_shape", "hidden"]
    broken = data.draw(
        st.sampled_from([None, None, None, *ctor, "v", "target", "target"]), label="broken"
    )
    args: dict[str, Any] = {
        "num_capsules": data.draw(st.integers(1, 5)),
        "capsule_dim": data.draw(st.integers(1, 4)),
        "out_shape": data.draw(
            st.one_of(
                st.integers(1, 6), st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
            )
        ),
        "hidden": data.draw(st.lists(st.integers(1, 6), max_size=2).map(tuple)),
    }
    kind = ""
    if broken in ("num_capsules", "capsule_dim"):
        args[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "out_shape":
        args[broken] = data.draw(
            st.sampled_from([0, -2, (), (2, 0), (2, -1), (1.5,), None, True, 2.0])
        )
    elif broken == "hidden":
        args[broken] = data.draw(st.sampled_from([(0,), (4, -1), (2.5,), 3, None]))
    if broken in ctor:
        kind = repr(args[broken])
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    dec = check_call(
        "MaskedDecoder",
        lambda: MaskedDecoder(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if dec is RAISED:
        return
    b = data.draw(st.integers(0, 3), label="B")
    k, d = dec.num_capsules, dec.capsule_dim
    v: Any = data.draw(real_tensors((b, k, d), mdtype), label="v")
    target: Any = None
    if data.draw(st.booleans()):
        target = torch.tensor(
            data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)), dtype=torch.int64
        )
    if broken == "v":
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            v, kind = data.draw(bad_tensors((b, k, d)))
        elif choice == 1:
            bad_shape = data.draw(
                st.sampled_from([(b, k + 1, d), (b, k, d + 1), (b, k * d), (k, d)])
            )
            v, kind = torch.rand(bad_shape, dtype=mdtype), f"shape {bad_shape}"
        else:
            other = torch.float64 if mdtype == torch.float32 else torch.float32
            v, kind = (
                torch.rand(b, k, d, dtype=data.draw(st.sampled_from([other, torch.bfloat16]))),
                "dtype mismatch",
            )
    elif broken == "target":
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            bad = data.draw(st.sampled_from([k, k + 5, -1]))
            v = torch.rand(max(b, 1), k, d, dtype=mdtype)
            target = torch.zeros(max(b, 1), dtype=torch.int64)
            target[0] = bad
            kind = f"index {bad} for K={k}"
        elif choice == 1:
            dt = data.draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))
            target, kind = torch.zeros(b, dtype=dt), f"dtype {dt}"
        elif choice == 2:
            shape = data.draw(st.sampled_from([(b + 1,), (b, k), ()]))
            target, kind = torch.zeros(shape, dtype=torch.int64), f"shape {shape}"
        else:
            target, kind = data.draw(st.sampled_from(NON_TENSORS[1:])), "non-tensor"
    out = check_call(
        "MaskedDecoder", lambda: dec(v, target), broken if broken in ("v", "target") else None, kind
    )
    if out is RAISED:
        return
    assert out.shape == (b, *dec.out_shape) and out.dtype == mdtype
    assert finite(out) and bool(((out >= 0) & (out <= 1)).all())


# -- a former gap found by fuzzing, kept as a regression test ------------------------------------
def test_gap_dtype_mismatch_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="input|v"):
        MaskedDecoder(3, 4, 6)(torch.rand(2, 3, 4, dtype=torch.float64))
