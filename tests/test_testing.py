from __future__ import annotations

import pytest
import torch

from torchcaps import Routing, squash
from torchcaps.testing import assert_routing_contract


class _Uniform(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2], dtype=u_hat.dtype)
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


class _WrongAxis(Routing):
    """Softmax over the children instead of the parents: the classic bug."""

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.softmax(u_hat.sum(-1), dim=1)
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


class _MixesBatch(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2], dtype=u_hat.dtype)
        s = torch.einsum("bij,bijd->bjd", c, u_hat)
        return squash(s - s.mean(0, keepdim=True)), c


class _WrongShape(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return u_hat.sum(1).transpose(1, 2), u_hat.sum(-1)


def test_accepts_a_correct_user_routing() -> None:
    assert_routing_contract(_Uniform())


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (_WrongAxis(), "sum to 1 over the parents"),
        (_MixesBatch(), "batch elements must be independent"),
        (_WrongShape(), "v must have shape"),
    ],
)
def test_rejects_broken_routings(routing: Routing, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_routing_contract(routing)
