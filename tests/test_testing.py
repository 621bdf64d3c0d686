"""torchcaps.testing: the contract helpers accept correct routings and models, and reject broken
ones with an AssertionError that names the broken rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from torchcaps import MatrixRouting, Routing, squash
from torchcaps.models import CapsuleOutput
from torchcaps.testing import (
    assert_matrix_routing_contract,
    assert_model_contract,
    assert_routing_contract,
)


# -- routings ------------------------------------------------------------------------------------
class _Uniform(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2], dtype=u_hat.dtype)
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


class _WrongAxis(Routing):
    """Softmax over the children instead of the parents: the classic bug."""

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.softmax(u_hat.sum(-1), dim=1)
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


class _Unnormalised(Routing):
    """Couplings of 1 for every parent: they sum to N_out, not 1."""

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.ones(u_hat.shape[:3], dtype=u_hat.dtype)
        return squash(torch.einsum("bij,bijd->bjd", c, u_hat)), c


class _Negative(_Uniform):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = super().route(u_hat)
        c = c.clone()
        c[..., 0] += 1.0
        c[..., 1] -= 1.0  # still sums to 1
        return v, c


class _MixesBatch(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2], dtype=u_hat.dtype)
        s = torch.einsum("bij,bijd->bjd", c, u_hat)
        return squash(s - s.mean(0, keepdim=True)), c


class _WrongShape(Routing):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return u_hat.sum(1).transpose(1, 2), u_hat.sum(-1)


class _Float32(_Uniform):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = super().route(u_hat)
        return v.float(), c


class _NonFinite(_Uniform):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = super().route(u_hat)
        return v / 0.0, c


class _Detached(_Uniform):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().route(u_hat.detach())


class _DetachedWithPrior(_Detached):
    """Gradients reach a parameter, but not u_hat."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = super().route(u_hat)
        return v * self.gain, c


class _NanGradient(_Uniform):
    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = super().route(u_hat)
        return v + 0.0 * torch.sqrt(u_hat - u_hat).sum(1), c  # d sqrt(x)/dx at 0 is inf


class _Unchecked(_Uniform):
    """Skips the base class's input validation: a wrong rank fails with an IndexError."""

    def check_input(self, u_hat: torch.Tensor) -> None:
        pass

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if u_hat.dim() != 4:
            raise IndexError("rank")  # not a ValueError/TypeError
        return super().route(u_hat)


class _AcceptsIntegers(_Uniform):
    """Converts integer input instead of refusing it."""

    def check_input(self, u_hat: torch.Tensor) -> None:
        if u_hat.dim() != 4:
            raise ValueError("u_hat must be 4-d")

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().route(u_hat.double())


class _NoPair(_Uniform):
    def forward(self, u_hat: Tensor, return_coupling: bool = False) -> Any:  # type: ignore[override]
        return self.route(u_hat)[0]


def test_accepts_a_correct_user_routing() -> None:
    assert_routing_contract(_Uniform())
    assert_routing_contract(_Uniform(), dtype=torch.float32, atol=1e-5)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (_WrongAxis(), "_WrongAxis: coupling coefficients must sum to 1 over the parents"),
        (_Unnormalised(), "_Unnormalised: coupling coefficients must sum to 1 over the parents"),
        (_Negative(), "_Negative: coupling coefficients must be >= 0"),
        (_MixesBatch(), "batch elements must be independent"),
        (_WrongShape(), r"_WrongShape: v must have shape \(3, 4, 5\), got \(3, 5, 4\)"),
        (_Float32(), "v must have u_hat's dtype torch.float64, got torch.float32"),
        (_NonFinite(), "v has non-finite values for finite u_hat"),
        (_Detached(), "no gradient flows from v back to u_hat"),
        (_DetachedWithPrior(), "no gradient flows from v back to u_hat"),
        (_NanGradient(), "gradient of v w.r.t. u_hat is not finite"),
        (_Unchecked(), "rank-3 u_hat must raise ValueError/TypeError, got IndexError: rank"),
        (
            _AcceptsIntegers(),
            "integer u_hat must raise ValueError/TypeError, nothing was raised",
        ),
        (_NoPair(), r"return_coupling=True\) must return a pair \(v, c\), got Tensor"),
    ],
    ids=lambda p: type(p).__name__ if isinstance(p, nn.Module) else "",
)
def test_rejects_broken_routings(routing: Routing, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_routing_contract(routing)


# -- matrix routings ---------------------------------------------------------------------------
class _MeanVotes(MatrixRouting):
    """Uniform assignments: each parent the activation-weighted mean of its votes."""

    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = torch.full(votes.shape[:3], 1.0 / votes.shape[2], dtype=votes.dtype)
        w = r * activations.unsqueeze(2)
        poses = torch.einsum("bij,bijp->bjp", w, votes) / w.sum(1).unsqueeze(2)
        return poses, torch.sigmoid(w.sum(1)), r


class _ActivationsAboveOne(_MeanVotes):
    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        poses, a, r = super().route(votes, activations)
        return poses, a + 1.0, r


class _AssignmentsOverChildren(_MeanVotes):
    """R normalised over the children instead of the parents."""

    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        poses, a, _ = super().route(votes, activations)
        return poses, a, torch.softmax(votes.sum(-1), dim=1)


class _MatrixMixesBatch(_MeanVotes):
    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        poses, a, r = super().route(votes, activations)
        return poses - poses.mean(0, keepdim=True), a, r


class _OrderedChildren(_MeanVotes):
    """Adds the first child's votes to the poses: the children are not a set."""

    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        poses, a, r = super().route(votes, activations)
        return poses + votes[:, 0], a, r


class _DetachedActivations(_MeanVotes):
    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return super().route(votes, activations.detach())


class _MatrixUnchecked(_MeanVotes):
    def check_input(self, votes: Tensor, activations: Tensor) -> None:
        if votes.dim() != 4:
            raise IndexError("rank")


def test_accepts_a_correct_user_matrix_routing() -> None:
    assert_matrix_routing_contract(_MeanVotes())


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (_ActivationsAboveOne(), "_ActivationsAboveOne: output activations must lie in"),
        (_AssignmentsOverChildren(), "assignments R must sum to 1 over the parents"),
        (_MatrixMixesBatch(), "batch elements must be independent"),
        (_OrderedChildren(), "permuting the children must permute R"),
        (_DetachedActivations(), "no gradient flows back to the input activations"),
        (_MatrixUnchecked(), "rank-3 votes must raise ValueError/TypeError, got IndexError"),
    ],
    ids=lambda p: type(p).__name__ if isinstance(p, nn.Module) else "",
)
def test_rejects_broken_matrix_routings(routing: MatrixRouting, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_matrix_routing_contract(routing)


# -- models --------------------------------------------------------------------------------------
class _TinyModel(nn.Module):
    """A registered-model look-alike: (B, 1, 4, 4) -> 3 capsules of 2 dimensions and a decoder.

    ``bug`` breaks one rule of the model contract.
    """

    def __init__(self, bug: str = "") -> None:
        super().__init__()
        self.bug = bug
        if bug != "no-in_shape":
            self.in_shape = (1, 4, 4)
        self.num_classes = 3
        self.caps = nn.Linear(16, 6)
        self.decoder = nn.Linear(6, 16)
        self.zero = nn.Parameter(torch.zeros(()))

    @staticmethod
    def _exporting() -> bool:
        return bool(torch.compiler.is_exporting())

    def forward(self, x: Tensor, target: Tensor | None = None) -> Any:
        v = squash(self.caps(x.flatten(1)).view(-1, 3, 2))
        scores = v.norm(dim=-1)
        if self.bug == "nan-gradient":
            scores = scores + 0.0 * torch.sqrt(self.zero)
        if self.bug == "non-finite":
            scores = scores / 0.0
        if self.bug == "compile" and torch.compiler.is_compiling() and not self._exporting():
            scores = scores + 1.0
        if self.bug == "export" and self._exporting():
            scores = scores + 1.0
        if target is None:
            target = scores.argmax(dim=1)
            if self.bug == "unmasked":
                target = (target + 1) % 3
        mask = nn.functional.one_hot(target, 3).unsqueeze(-1).to(v.dtype)
        recon = torch.sigmoid(self.decoder((v * mask).flatten(1)))
        recon = recon.view(-1, 16) if self.bug == "recon-shape" else recon.view(-1, 1, 4, 4)
        if self.bug == "scores-shape":
            scores = scores[:, :2]
        if self.bug == "capsules-shape":
            v = v.flatten(1)
        if self.bug == "tuple":
            return scores, v, recon
        if self.bug == "detached":
            scores, v, recon = scores.detach(), v.detach(), recon.detach()
        return CapsuleOutput(scores, v, None if self.bug == "no-decoder" else recon)


def test_accepts_a_correct_model() -> None:
    assert_model_contract(_TinyModel())
    assert_model_contract(_TinyModel("no-decoder"), batch=3)  # reconstruction may be None


@pytest.mark.parametrize(
    ("bug", "message"),
    [
        (
            "tuple",
            r"forward must return a CapsuleOutput\(scores, capsules, reconstruction\), got tuple",
        ),
        ("no-in_shape", "a registered model needs in_shape"),
        ("scores-shape", r"scores must be \(B, K\) = \(2, 3\)"),
        ("capsules-shape", r"capsules must be \(B, K, D\), got \(2, 6\)"),
        ("recon-shape", r"reconstruction must be \(B, \*in_shape\) = \(2, 1, 4, 4\)"),
        ("non-finite", "outputs are not finite for finite input"),
        ("detached", "no parameter receives a gradient"),
        ("nan-gradient", "gradients are not finite"),
        ("unmasked", "without a target the decoder must be masked by the prediction"),
        ("compile", "scores of the torch.compile model differs from eager mode"),
        ("export", "scores of the torch.export model differs from eager mode"),
    ],
)
def test_rejects_broken_models(bug: str, message: str) -> None:
    with pytest.raises(AssertionError, match=f"_TinyModel: {message}"):
        assert_model_contract(_TinyModel(bug))


def test_compile_and_export_checks_can_be_skipped() -> None:
    assert_model_contract(_TinyModel("compile"), check_compile=False)
    assert_model_contract(_TinyModel("export"), check_export=False)
