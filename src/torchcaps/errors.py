"""Exceptions raised by torchcaps."""

from __future__ import annotations

__all__ = ["ShapeError"]


class ShapeError(ValueError):
    """A tensor argument has the wrong shape (a :class:`ValueError`).

    The message names the argument, the expected shape and the shape received.

    Examples:
        >>> import torch
        >>> from torchcaps import DynamicRouting
        >>> from torchcaps.errors import ShapeError
        >>> try:
        ...     DynamicRouting()(torch.zeros(2, 3, 4))
        ... except ShapeError as exc:
        ...     print(exc)  # doctest: +ELLIPSIS
        DynamicRouting expected u_hat of shape (B, N_in, N_out, D_out) ..., got (2, 3, 4)
    """
