"""torchcaps.routing.base: the Routing base class, one forward contract for every algorithm."""

from __future__ import annotations

import pytest
import torch

from torchcaps import Routing, squash
from torchcaps.errors import ShapeError


class _Mean(Routing):
    """Uniform coupling; counts the calls of route."""

    calls = 0

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        type(self).calls += 1
        b, n_in, n_out, _ = u_hat.shape
        return squash(u_hat.mean(dim=1)), u_hat.new_full((b, n_in, n_out), 1.0 / n_out)


def test_base_class_requires_route() -> None:
    with pytest.raises(NotImplementedError, match="must implement route"):
        Routing()(torch.randn(1, 2, 3, 4))


def test_forward_applies_return_coupling() -> None:
    u = torch.randn(2, 6, 3, 4)
    v = _Mean()(u)
    v2, c = _Mean()(u, return_coupling=True)
    assert isinstance(v, torch.Tensor) and v.shape == (2, 3, 4)
    torch.testing.assert_close(v2, v)
    assert c.shape == (2, 6, 3) and bool((c == 1 / 3).all())


@pytest.mark.parametrize(
    ("u_hat", "error", "message"),
    [
        (
            torch.zeros(2, 3, 4),
            ShapeError,
            r"^_Mean expected u_hat of shape \(B, N_in, N_out, D_out\) with N_in, N_out, D_out "
            r">= 1, got \(2, 3, 4\)$",
        ),
        (torch.zeros(2, 3, 0, 4), ShapeError, r"_Mean expected u_hat .* got \(2, 3, 0, 4\)"),
        (
            torch.zeros(2, 3, 4, 5, dtype=torch.int64),
            TypeError,
            r"^_Mean: u_hat must be a real floating-point tensor, got dtype torch.int64$",
        ),
        ([0.0], TypeError, r"^_Mean: u_hat must be a torch.Tensor, got list$"),
    ],
    ids=["rank3", "no-parents", "int64", "list"],
)
def test_input_is_checked_for_every_subclass_before_route(
    u_hat: object, error: type[Exception], message: str
) -> None:
    """A subclass gets the base class's validation, naming itself, and route never runs."""
    _Mean.calls = 0
    with pytest.raises(error, match=message):
        _Mean()(u_hat)  # type: ignore[arg-type]
    assert _Mean.calls == 0


def test_an_empty_batch_reaches_route() -> None:
    v, c = _Mean()(torch.zeros(0, 3, 2, 4), return_coupling=True)
    assert v.shape == (0, 2, 4) and c.shape == (0, 3, 2)
