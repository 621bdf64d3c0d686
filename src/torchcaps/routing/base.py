"""The :class:`Routing` base class: one forward contract for every routing algorithm."""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor, nn

from torchcaps._checks import check_shape, check_tensor

__all__ = ["Routing"]


class Routing(nn.Module):
    r"""Base class of every routing algorithm between two capsule layers.

    A routing algorithm turns the prediction vectors :math:`\hat{u}_{j|i}` that each child
    capsule :math:`i` makes for each parent capsule :math:`j` into the parents' outputs
    :math:`v_j`, and reports the final coupling coefficients :math:`c_{ij}`.

    Subclasses implement :meth:`route`; :meth:`forward` validates ``u_hat`` once (so every
    algorithm raises the same errors) and applies the ``return_coupling`` flag. A subclass that
    overrides :meth:`forward` itself with the same contract also works with
    :class:`~torchcaps.DenseCaps`; check either kind with
    :func:`torchcaps.testing.assert_routing_contract`.

    Shape:
        - u_hat: :math:`(B, N_{in}, N_{out}, D_{out})`, prediction vectors :math:`\hat{u}_{j|i}`.
        - Output ``v``: :math:`(B, N_{out}, D_{out})`.
        - Output ``c`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import Routing, squash
        >>> class MeanRouting(Routing):
        ...     '''Uniform coupling: every child sends to every parent equally.'''
        ...     def route(self, u_hat):
        ...         b, n_in, n_out, _ = u_hat.shape
        ...         c = u_hat.new_full((b, n_in, n_out), 1.0 / n_out)
        ...         return squash(u_hat.mean(dim=1)), c
        >>> v, c = MeanRouting()(torch.randn(2, 6, 3, 4), return_coupling=True)
        >>> v.shape, c.shape
        (torch.Size([2, 3, 4]), torch.Size([2, 6, 3]))
    """

    def check_input(self, u_hat: Tensor) -> None:
        """Validate the prediction vectors; raise :class:`ValueError`/:class:`TypeError`."""
        name = type(self).__name__
        check_tensor("u_hat", u_hat, owner=name)
        check_shape(
            u_hat,
            "B N_in N_out D_out",
            name="u_hat",
            owner=name,
            note=" with N_in, N_out, D_out >= 1",
        )

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Run the algorithm on validated input; return ``(v, c)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement route(u_hat)")

    @overload
    def forward(self, u_hat: Tensor, return_coupling: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, u_hat: Tensor, return_coupling: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(
        self, u_hat: Tensor, return_coupling: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Route ``u_hat``; return ``v``, or ``(v, c)`` when ``return_coupling`` is true."""
        self.check_input(u_hat)
        v, c = self.route(u_hat)
        return (v, c) if return_coupling else v
