"""torchcaps.errors: ShapeError, a ValueError that the library raises for wrong shapes."""

from __future__ import annotations

import pytest
import torch

import torchcaps
from torchcaps import DenseCaps, DynamicRouting, errors
from torchcaps.errors import ShapeError
from torchcaps.functional import margin_loss


def test_shape_error_is_a_public_value_error() -> None:
    assert issubclass(ShapeError, ValueError)
    assert torchcaps.ShapeError is ShapeError
    assert errors.__all__ == ["ShapeError"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: DynamicRouting()(torch.zeros(2, 3, 4)),
            r"DynamicRouting expected u_hat of shape \(B, N_in, N_out, D_out\) with N_in, N_out, "
            r"D_out >= 1, got \(2, 3, 4\)",
        ),
        (
            lambda: DenseCaps(4, 3, 2, 2)(torch.zeros(2, 5, 3)),
            r"DenseCaps expected 4 input capsules of dim 3.*got input of shape \(2, 5, 3\)",
        ),
        (
            lambda: margin_loss(torch.zeros(2, 3, 1), torch.tensor([0, 1])),
            r"margin_loss expected lengths of shape \(B, K\) with K >= 1 classes, got \(2, 3, 1\)",
        ),
    ],
    ids=["routing", "dense", "margin_loss"],
)
def test_the_library_raises_shape_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShapeError, match=message):
        call()
