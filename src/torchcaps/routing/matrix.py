"""The :class:`MatrixRouting` base class: the contract of routings between matrix capsules."""

from __future__ import annotations

from typing import Any, Literal, overload

from torch import Tensor, nn

from torchcaps._checks import check_shape, check_tensor

__all__ = ["MatrixRouting"]


class MatrixRouting(nn.Module):
    r"""Base class of routings between matrix capsules: votes and activations in and out.

    A matrix capsule is a pose (a 4x4 matrix, flattened to :math:`P = 16` values) and an
    activation in (0, 1). Each child :math:`i` casts a vote :math:`V_{ij}` (a pose) for each
    parent :math:`j`; the routing turns the votes and the children's activations into the
    parents' poses and activations, and reports the final assignment :math:`R_{ij}` of each
    child to the parents. Unlike :class:`~torchcaps.routing.Routing` (vector capsules, whose
    length is their activation), activations are separate inputs and outputs, and algorithms
    such as :class:`~torchcaps.routing.EMRouting` learn per-parent parameters.

    Subclasses implement :meth:`route`; :meth:`forward` validates the input once (so every
    algorithm raises the same errors) and applies ``return_coupling``. Check an algorithm with
    :func:`torchcaps.testing.assert_matrix_routing_contract`.

    Shape:
        - votes: :math:`(B, N_{in}, N_{out}, P)`.
        - activations: :math:`(B, N_{in})`, values in [0, 1].
        - Output ``poses``: :math:`(B, N_{out}, P)`; ``activations``: :math:`(B, N_{out})`.
        - Output ``R`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps.routing import MatrixRouting
        >>> class MeanVotes(MatrixRouting):
        ...     '''Every child sends to every parent equally; parents are as active as children.'''
        ...     def route(self, votes, activations):
        ...         b, n_in, n_out, _ = votes.shape
        ...         r = votes.new_full((b, n_in, n_out), 1.0 / n_out)
        ...         a = activations.mean(dim=1, keepdim=True).expand(b, n_out)
        ...         return votes.mean(dim=1), a, r
        >>> poses, a, r = MeanVotes()(torch.randn(2, 6, 3, 16), torch.rand(2, 6), True)
        >>> poses.shape, a.shape, r.shape
        (torch.Size([2, 3, 16]), torch.Size([2, 3]), torch.Size([2, 6, 3]))
    """

    @classmethod
    def contract_kwargs(cls, in_capsules: int, out_capsules: int, pose_dim: int) -> dict[str, Any]:
        """Constructor arguments that build this class for votes of the given sizes.

        The test suite builds every matrix routing of :mod:`torchcaps.routing` with these
        keyword arguments and checks it with
        :func:`~torchcaps.testing.assert_matrix_routing_contract`. The default is no
        arguments; algorithms with per-parent parameters override it.
        """
        return {}

    def check_input(self, votes: Tensor, activations: Tensor) -> None:
        """Validate votes and activations; raise :class:`ValueError`/:class:`TypeError`."""
        name = type(self).__name__
        check_tensor("votes", votes, owner=name)
        check_tensor("activations", activations, owner=name)
        sizes = check_shape(
            votes, "B N_in N_out P", name="votes", owner=name, note=" with N_in, N_out, P >= 1"
        )
        check_shape(
            activations,
            "B N_in",
            name="activations",
            owner=f"{name} (for votes of shape {tuple(votes.shape)})",
            B=sizes["B"],
            N_in=sizes["N_in"],
        )

    def route(self, votes: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the algorithm on validated input; return ``(poses, activations, R)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement route(votes, activations)")

    @overload
    def forward(
        self, votes: Tensor, activations: Tensor, return_coupling: Literal[False] = ...
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self, votes: Tensor, activations: Tensor, return_coupling: Literal[True]
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def forward(
        self, votes: Tensor, activations: Tensor, return_coupling: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Route; return ``(poses, activations)``, and ``R`` too with ``return_coupling``."""
        self.check_input(votes, activations)
        poses, out_activations, r = self.route(votes, activations)
        if return_coupling:
            return poses, out_activations, r
        return poses, out_activations
