"""The :class:`Routing` base class: one forward contract for every routing algorithm."""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from torchcaps._checks import check_int, check_shape, check_tensor

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

    #: Whether the coupling coefficients of every child are a distribution over the parents
    #: (non-negative, summing to 1); not so when a routing adds a learned prior after its
    #: softmax. :func:`~torchcaps.testing.assert_routing_contract` checks it only when true.
    couplings_sum_to_one: bool = True
    #: Whether every output capsule is shorter than 1 (squashed); false for routings that
    #: normalise their outputs otherwise (e.g. with a layer norm).
    #: :func:`~torchcaps.testing.assert_routing_contract` checks the lengths only when true.
    squashes_output: bool = True

    @classmethod
    def contract_kwargs(cls, in_capsules: int, out_capsules: int, dim: int) -> dict[str, Any]:
        """Constructor arguments that build this class for predictions of the given sizes.

        The test suite builds every routing algorithm of :mod:`torchcaps.routing` with these
        keyword arguments and checks it with :func:`~torchcaps.testing.assert_routing_contract`.
        The default, no arguments, suits algorithms whose every argument has a default;
        algorithms that need sizes (a learned ``out_dim``, say) override it.
        """
        return {}

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

    def _prior_parameter(
        self,
        learned_prior: tuple[int, int] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> nn.Parameter | None:
        """A learned ``(N_in, N_out)`` parameter (left uninitialised) for ``learned_prior``."""
        if learned_prior is None:
            return None
        owner = type(self).__name__
        if not isinstance(learned_prior, (tuple, list)) or len(learned_prior) != 2:
            raise TypeError(
                f"{owner}: learned_prior must be a pair (in_capsules, out_capsules) or None, "
                f"got {learned_prior!r}"
            )
        n_in = check_int("learned_prior[0]", learned_prior[0], owner=owner)
        n_out = check_int("learned_prior[1]", learned_prior[1], owner=owner)
        return nn.Parameter(torch.empty(n_in, n_out, device=device, dtype=dtype))

    def _check_prior_shape(self, u_hat: Tensor, prior: Tensor | None) -> None:
        """With a learned prior, ``u_hat`` must have its ``(N_in, N_out)``."""
        if prior is not None:
            n_in, n_out = prior.shape
            check_shape(
                u_hat,
                "B N_in N_out D_out",
                name="u_hat",
                owner=f"{type(self).__name__} with learned_prior={(n_in, n_out)}",
                N_in=n_in,
                N_out=n_out,
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
