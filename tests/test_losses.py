"""torchcaps.losses: MarginLoss, ReconstructionLoss and SpreadLoss, the functions they call,
and the spread loss margin schedule.

The modules call the public functional forms, so errors raised while validating forward()
inputs name the function (``margin_loss: ...``); constructor errors name the class.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import torchcaps
from _strategies import BAD_FLOATS, RAISED, check_call, check_margin, margin_case
from reference import margin_ref
from torchcaps import MarginLoss, ReconstructionLoss, ShapeError, SpreadLoss, spread_margin
from torchcaps.functional import margin_loss, reconstruction_loss, spread_loss


def test_margin_hand_computed() -> None:
    lengths = torch.tensor([[0.95, 0.05, 0.05], [0.2, 0.9, 0.1]], dtype=torch.float64)
    loss = MarginLoss(reduction="none")(lengths, torch.tensor([0, 1]))
    # sample 0: all margins satisfied; sample 1: absent class 0 at 0.2 -> 0.5 * 0.1^2
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.005], dtype=torch.float64))


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_margin_matches_reference(batch: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.rand(batch, k, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (batch,), generator=g)
    onehot = torch.nn.functional.one_hot(target, k)
    ref = margin_ref(lengths, onehot)
    torch.testing.assert_close(margin_loss(lengths, target, reduction="none"), ref)
    torch.testing.assert_close(margin_loss(lengths, onehot, reduction="none"), ref)
    torch.testing.assert_close(margin_loss(lengths, target), ref.mean())
    torch.testing.assert_close(margin_loss(lengths, target, reduction="sum"), ref.sum())
    # multi-hot with several classes present
    multi = (torch.rand(batch, k, generator=g) < 0.4).long()
    torch.testing.assert_close(
        margin_loss(lengths, multi, reduction="none"), margin_ref(lengths, multi)
    )


def test_margin_custom_constants() -> None:
    lengths = torch.rand(4, 5, dtype=torch.float64)
    t = torch.tensor([1, 0, 4, 2])
    ref = margin_ref(lengths, torch.nn.functional.one_hot(t, 5), 0.8, 0.2, 0.25)
    torch.testing.assert_close(MarginLoss(0.8, 0.2, 0.25, "none")(lengths, t), ref)
    # lambda_ = 0: absent classes cost nothing
    only_present = MarginLoss(lambda_=0.0, reduction="none")(lengths, t)
    torch.testing.assert_close(only_present, (0.9 - lengths[torch.arange(4), t]).clamp_min(0) ** 2)


def test_margin_target_dtypes_agree() -> None:
    lengths = torch.rand(3, 4)
    multi = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    expected = margin_loss(lengths, multi)
    torch.testing.assert_close(margin_loss(lengths, multi.bool()), expected)
    torch.testing.assert_close(margin_loss(lengths, multi.float()), expected)


def test_margin_gradcheck() -> None:
    lengths = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    # keep away from the hinge points where the loss is not differentiable
    with torch.no_grad():
        lengths.mul_(0.6).add_(0.15)
    t = torch.tensor([0, 3, 1])
    assert gradcheck(lambda x: MarginLoss()(x, t), (lengths,))


def test_margin_half_precision() -> None:
    lengths = torch.rand(4, 10)
    t = torch.randint(0, 10, (4,))
    out = margin_loss(lengths.bfloat16(), t)
    assert out.dtype == torch.float32  # losses are computed and returned in float32 at least
    torch.testing.assert_close(
        out.float(), margin_loss(lengths.bfloat16().float(), t), atol=1e-2, rtol=1e-2
    )


def test_margin_bad_input() -> None:
    loss = MarginLoss()
    lengths = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\], got values in \[3, 10\]"):
        loss(lengths, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        loss(lengths, torch.tensor([-1, 2]))
    with pytest.raises(
        ValueError, match=r"target of class indices must have shape \(2,\).*got \(3,\)"
    ):
        loss(lengths, torch.tensor([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"multi-hot target must have shape \(2, 10\) like lengths, got \(2, 9\)"
    ):
        loss(lengths, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="multi-hot target must contain only 0 and 1"):
        loss(lengths, torch.full((2, 10), 0.5))
    with pytest.raises(TypeError, match="target of class indices must be an integer tensor"):
        loss(lengths, torch.tensor([1.0, 2.0]))
    with pytest.raises(
        ValueError,
        match=r"margin_loss expected lengths of shape \(B, K\) with K >= 1 classes, got \(2, 10, 1\)",
    ):
        loss(lengths[..., None], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="target must be class indices of shape"):
        loss(lengths, torch.zeros(2, 10, 1))
    with pytest.raises(TypeError, match="margin_loss: lengths must be a real floating-point"):
        loss(torch.ones(2, 10, dtype=torch.long), torch.tensor([1, 2]))


def test_margin_bad_config() -> None:
    with pytest.raises(ValueError, match="MarginLoss: reduction must be one of"):
        MarginLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="MarginLoss: lambda_ must be >= 0.0, got -0.5"):
        MarginLoss(lambda_=-0.5)
    with pytest.raises(ValueError, match="MarginLoss: m_pos must be finite"):
        MarginLoss(m_pos=float("nan"))
    assert repr(MarginLoss()) == "MarginLoss(m_pos=0.9, m_neg=0.1, lambda_=0.5, reduction='mean')"


def test_reconstruction_module_equals_function() -> None:
    x, y = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(
        ReconstructionLoss(0.01, "sum")(x, y), reconstruction_loss(x, y, 0.01, "sum")
    )
    with pytest.raises(ValueError, match="ReconstructionLoss: weight must be >= 0"):
        ReconstructionLoss(-1.0)


def test_margin_module_equals_function() -> None:
    lengths, t = torch.rand(5, 7), torch.randint(0, 7, (5,))
    torch.testing.assert_close(
        MarginLoss(0.8, 0.3, 0.7, "sum")(lengths, t), margin_loss(lengths, t, 0.8, 0.3, 0.7, "sum")
    )


# -- fuzz ----------------------------------------------------------------------------------------
@given(margin_case())
def test_fuzz_margin_loss_module(case: dict[str, Any]) -> None:
    opts, broken = case["opts"], case["broken"]
    ctor_broken = broken if broken in opts else None
    loss = check_call("MarginLoss", lambda: MarginLoss(**opts), ctor_broken, case["kind"])
    if loss is RAISED:
        return
    fwd_broken = None if broken in opts else broken
    out = check_call(
        "MarginLoss",
        lambda: loss(case["lengths"], case["target"]),
        fwd_broken,
        case["kind"],
        nonfinite="lengths" if case["nonfinite"] else None,
    )
    check_margin(case, out)
    if out is not RAISED and not case["nonfinite"]:
        expected = margin_loss(case["lengths"], case["target"], **opts)
        torch.testing.assert_close(out, expected, equal_nan=True)


@given(st.data())
def test_fuzz_reconstruction_loss_module_options(data: st.DataObject) -> None:
    broken = data.draw(st.sampled_from(["weight", "reduction"]), label="broken")
    value = data.draw(
        st.sampled_from([-1.0, *BAD_FLOATS])
        if broken == "weight"
        else st.sampled_from(["avg", None, 0, "Mean"]),
        label="value",
    )
    check_call(
        "ReconstructionLoss", lambda: ReconstructionLoss(**{broken: value}), broken, repr(value)
    )


# -- spread loss ------------------------------------------------------------------------------
def _spread_ref(a: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-sample sum over the wrong classes i of max(0, m - (a_t - a_i))^2, explicit loops."""
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for b in range(a.shape[0]):
        t = int(target[b])
        for i in range(a.shape[1]):
            if i != t:
                out[b] += max(0.0, margin - (float(a[b, t]) - float(a[b, i]))) ** 2
    return out


def test_spread_hand_computed() -> None:
    a = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.5, 0.4], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1, 0])
    # sample 0: class 2 within 0.1 of the target (0.2 - 0.1)^2; class 1 0.8 below: 0
    # sample 1: class 2 (0.2 - 0.1)^2, class 0 (0.2 - 0.3 < 0): 0; sample 2: (0.2 + 1)^2 + 0.2^2
    expected = torch.tensor([0.01, 0.01, 1.44 + 0.04])
    got = SpreadLoss(0.2, reduction="none")(a, target)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(spread_loss(a, target), expected.mean())
    torch.testing.assert_close(spread_loss(a, target, reduction="sum"), expected.sum())
    assert torchcaps.spread_loss is spread_loss  # importable from the top level too


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 7), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_spread_matches_reference(batch: int, k: int, seed: int, margin: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, k, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (batch,), generator=g)
    got = spread_loss(a, target, margin, reduction="none")
    torch.testing.assert_close(got, _spread_ref(a, target, margin))
    assert bool((got >= 0).all())


def test_spread_margin_is_a_settable_attribute() -> None:
    loss = SpreadLoss()
    a, target = torch.tensor([[0.6, 0.2]]), torch.tensor([0])
    assert float(loss(a, target)) == 0.0  # 0.4 apart: beyond a margin of 0.2
    loss.margin = 0.9
    torch.testing.assert_close(loss(a, target), torch.tensor(0.5**2))
    assert "margin=0.9" in repr(loss)


def test_spread_gradcheck_and_half_precision() -> None:
    a = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 4, 1])
    assert gradcheck(lambda x: spread_loss(x, target, 0.7), (a,))
    half = spread_loss(a.detach().bfloat16(), target, 0.7)
    assert half.dtype == torch.float32
    torch.testing.assert_close(
        half.double(), spread_loss(a.detach(), target, 0.7), atol=0.02, rtol=0.02
    )


def test_spread_margin_schedules() -> None:
    assert spread_margin(0, 1000) == 0.2 and spread_margin(1000, 1000) == 0.9
    assert spread_margin(250, 1000) == pytest.approx(0.375)
    assert spread_margin(5000, 1000) == 0.9  # held after the ramp
    assert spread_margin(10, 20, start=0.0, end=1.0) == pytest.approx(0.5)
    for step in (0, 100_000, 200_000, 500_000, 10**7):
        expected = 0.2 + 0.79 / (1 + math.exp(-min(10.0, step / 50_000 - 4)))
        assert spread_margin(step, schedule="authors") == pytest.approx(expected)
    assert spread_margin(10**9, schedule="authors") == pytest.approx(
        0.2 + 0.79 / (1 + math.exp(-10))
    )


def test_spread_bad_input() -> None:
    a = torch.rand(3, 4)
    with pytest.raises(
        ShapeError,
        match=r"target of shape \(3,\) \(one class index per row of activations\), got \(2,\)",
    ):
        spread_loss(a, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 3\]"):
        spread_loss(a, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="target"):
        spread_loss(a, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ShapeError, match="activations"):
        spread_loss(a[0], torch.tensor([0]))
    with pytest.raises(TypeError, match="activations must be a real floating-point tensor"):
        spread_loss(a.long(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="margin must be finite"):
        SpreadLoss(float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        SpreadLoss(reduction="avg")
    with pytest.raises(TypeError, match="needs total_steps"):
        spread_margin(3)
    with pytest.raises(ValueError, match="step"):
        spread_margin(-1, 10)
    with pytest.raises(ValueError, match="schedule"):
        spread_margin(1, 10, schedule="cosine")  # type: ignore[arg-type]
