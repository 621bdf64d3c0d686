"""The public contracts over everything the library can build by name.

Every routing algorithm the resolver finds (``routing_algorithms()``) must pass
:func:`torchcaps.testing.assert_routing_contract`, every matrix routing
(``matrix_routing_algorithms()``) :func:`torchcaps.testing.assert_matrix_routing_contract`,
and every registered model (``list_models()``) :func:`torchcaps.testing.assert_model_contract`
(forward/backward shapes, finite outputs and gradients, torch.compile, torch.export). A new routing or model is tested here as soon as it is
exported or registered; its own numbers go in ``tests/routing/`` or ``tests/models/``.

A routing algorithm is built with the keyword arguments of its ``Routing.contract_kwargs(
in_capsules, out_capsules, dim)`` classmethod for the probe sizes of the contract (none by
default).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchcaps import Routing, squash
from torchcaps.models import get_model, list_models
from torchcaps.routing import MatrixRouting, matrix_routing_algorithms, routing_algorithms
from torchcaps.testing import (
    assert_matrix_routing_contract,
    assert_model_contract,
    assert_routing_contract,
)

IN_CAPSULES, OUT_CAPSULES, DIM = 7, 4, 5  # the probe sizes passed to assert_routing_contract
ROUTINGS = routing_algorithms()
MATRIX_ROUTINGS = matrix_routing_algorithms()
MODELS = list_models()


def build_for_contract(cls: type[Routing]) -> Routing:
    """``cls`` built with the keyword arguments of its ``contract_kwargs`` hook."""
    return cls(**cls.contract_kwargs(in_capsules=IN_CAPSULES, out_capsules=OUT_CAPSULES, dim=DIM))


def test_there_is_something_to_check() -> None:
    assert ROUTINGS and MATRIX_ROUTINGS and MODELS  # an empty parametrisation would pass


@pytest.mark.parametrize("cls", list(ROUTINGS.values()), ids=list(ROUTINGS))
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_routing_contract(cls: type[Routing], dtype: torch.dtype, atol: float) -> None:
    assert_routing_contract(
        build_for_contract(cls),
        in_capsules=IN_CAPSULES,
        out_capsules=OUT_CAPSULES,
        dim=DIM,
        dtype=dtype,
        atol=atol,
    )


@pytest.mark.parametrize("cls", list(MATRIX_ROUTINGS.values()), ids=list(MATRIX_ROUTINGS))
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_matrix_routing_contract(cls: type[MatrixRouting], dtype: torch.dtype, atol: float) -> None:
    kwargs = cls.contract_kwargs(in_capsules=IN_CAPSULES, out_capsules=OUT_CAPSULES, pose_dim=16)
    assert_matrix_routing_contract(
        cls(**kwargs),
        in_capsules=IN_CAPSULES,
        out_capsules=OUT_CAPSULES,
        dtype=dtype,
        atol=atol,
    )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name: str) -> None:
    assert_model_contract(get_model(name))


class _SizedRouting(Routing):
    """Needs its sizes: learned initial logits of shape (N_in, N_out)."""

    def __init__(self, in_capsules: int, out_capsules: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(in_capsules, out_capsules))

    @classmethod
    def contract_kwargs(cls, in_capsules: int, out_capsules: int, dim: int) -> dict[str, Any]:
        return {"in_capsules": in_capsules, "out_capsules": out_capsules}

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.softmax(self.logits.to(u_hat.dtype), dim=1).expand(u_hat.shape[:3])
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


def test_the_kwargs_hook_builds_a_routing_that_needs_arguments() -> None:
    routing = build_for_contract(_SizedRouting)
    assert routing.logits.shape == (IN_CAPSULES, OUT_CAPSULES)
    assert_routing_contract(routing, in_capsules=IN_CAPSULES, out_capsules=OUT_CAPSULES)
    with pytest.raises(TypeError):
        _SizedRouting()  # type: ignore[call-arg]  # what the hook is for
