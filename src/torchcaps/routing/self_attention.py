"""Self-attention routing of Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchcaps._checks import float32_compute, no_autocast
from torchcaps.functional import exp_squash
from torchcaps.routing.base import Routing

__all__ = ["SelfAttentionRouting"]


class SelfAttentionRouting(Routing):
    r"""Self-attention routing: one pass, coupling by agreement with the summed predictions.

    From `Mazzia et al. 2021 <https://arxiv.org/abs/2101.12491>`_ (Efficient-CapsNet). With
    :math:`D` the capsule dimension, for every parent :math:`j`:

    .. math::
        S_j = \sum_k \hat{u}_{j|k}, \qquad
        A_{ij} = \frac{\langle \hat{u}_{j|i}, S_j \rangle}{\sqrt{D}}, \qquad
        c_{ij} = \operatorname{softmax}_j(A_{ij}),

    .. math::
        s_j = \sum_i (c_{ij} + B_{ij}) \hat{u}_{j|i}, \qquad
        v_j = \operatorname{exp\_squash}(s_j).

    :math:`A_{ij}` is the row sum of parent :math:`j`'s self-attention matrix
    :math:`\hat{U}_j \hat{U}_j^\top`; it is computed through :math:`S_j`, in
    :math:`O(N_{in} N_{out} D)`, never as the :math:`N_{in} \times N_{in}` matrix. The softmax
    runs over the parents. :math:`B` is a learned prior of shape ``learned_prior = (N_in,
    N_out)``, zero-initialised and added *after* the softmax, as in the official code (the
    paper calls it log priors); without it (``learned_prior=None``) :math:`B = 0`.
    ``return_coupling=True`` returns the weights actually used, :math:`c + B`, which do not sum
    to 1 over the parents once :math:`B` has been trained (see
    :attr:`couplings_sum_to_one`). Routing runs in float32 for half-precision input and returns
    the input's dtype.

    Args:
        learned_prior: ``(in_capsules, out_capsules)`` to learn the prior :math:`B`, or ``None``.
        device: device of the prior.
        dtype: dtype of the prior.

    Shape:
        - u_hat: :math:`(B, N_{in}, N_{out}, D)`.
        - Output ``v``: :math:`(B, N_{out}, D)`.
        - Output ``c`` (with ``return_coupling=True``): :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import SelfAttentionRouting
        >>> routing = SelfAttentionRouting(learned_prior=(16, 10))
        >>> v, c = routing(torch.randn(2, 16, 10, 16), return_coupling=True)
        >>> v.shape, c.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 16, 10]))
        >>> bool((v.norm(dim=-1) < 1).all())
        True
    """

    prior: Tensor | None

    def __init__(
        self,
        learned_prior: tuple[int, int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prior = self._prior_parameter(learned_prior, device, dtype)
        self.reset_parameters()

    @property
    def couplings_sum_to_one(self) -> bool:  # type: ignore[override]
        """Whether :math:`c + B` sums to 1 over the parents, as it does only without a prior."""
        return self.prior is None

    def reset_parameters(self) -> None:
        """Reset the learned prior (if any) to zero."""
        if self.prior is not None:
            nn.init.zeros_(self.prior)

    def extra_repr(self) -> str:
        return "" if self.prior is None else f"learned_prior={tuple(self.prior.shape)}"

    def check_input(self, u_hat: Tensor) -> None:
        super().check_input(u_hat)
        self._check_prior_shape(u_hat, self.prior)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        x = float32_compute(u_hat)
        with no_autocast(x.device):
            dim = x.shape[-1]
            total = x.sum(dim=1, keepdim=True)  # S_j: (B, 1, N_out, D)
            agreement = (x * total).sum(dim=-1) * (1.0 / math.sqrt(dim))  # A: (B, N_in, N_out)
            c = torch.softmax(agreement, dim=2)  # over the parents j
            if self.prior is not None:
                c = c + self.prior.to(c.dtype)
            s = (c.unsqueeze(-1) * x).sum(dim=1)  # (B, N_out, D)
            v = exp_squash(s, dim=-1)
        return v.to(u_hat.dtype), c.to(u_hat.dtype)
