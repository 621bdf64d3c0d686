"""The masked reconstruction decoder of the paper."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from torchcaps._checks import check_int, check_param_dtype, check_shape, check_tensor
from torchcaps.functional import mask_capsules

__all__ = ["MaskedDecoder"]


class MaskedDecoder(nn.Module):
    r"""Reconstruct the input from one capsule, masking all others (section 4.1 of the paper).

    Every capsule but the selected one is zeroed; the flattened :math:`K \times D` vector goes
    through ``Linear + ReLU`` layers of sizes ``hidden`` and a final ``Linear`` to
    :math:`\prod` ``out_shape`` outputs with a sigmoid. Train with ``target`` = the true label;
    at test time pass ``None`` to select each sample's longest capsule (the prediction). A
    ``target`` of shape :math:`(B, M)` asks for :math:`M` reconstructions per sample, the
    :math:`m`-th from capsule ``target[:, m]`` alone (the paper's MultiMNIST training
    reconstructs both digits of a pair, each from its own capsule). The
    paper's decoder is ``MaskedDecoder(10, 16, (1, 28, 28))``: 512 and 1024 hidden units,
    784 sigmoid outputs, 1.4M parameters.

    Args:
        num_capsules: number of capsules :math:`K`.
        capsule_dim: dimension :math:`D` of each capsule.
        out_shape: shape of one reconstruction, e.g. ``(1, 28, 28)`` (or an int).
        hidden: sizes of the hidden layers.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - v: :math:`(B, K, D)`.
        - target: :math:`(B,)` or :math:`(B, M)` integer indices in :math:`[0, K)`, or
          ``None``.
        - Output: :math:`(B, *\text{out\_shape})`, or :math:`(B, M, *\text{out\_shape})`
          for a :math:`(B, M)` ``target``; values in :math:`(0, 1)`.

    Examples:
        >>> import torch
        >>> from torchcaps import MaskedDecoder
        >>> decoder = MaskedDecoder(10, 16, (1, 28, 28))
        >>> x_hat = decoder(torch.randn(2, 10, 16), torch.tensor([3, 7]))
        >>> x_hat.shape
        torch.Size([2, 1, 28, 28])
        >>> decoder(torch.randn(2, 10, 16), torch.tensor([[3, 5], [7, 0]])).shape
        torch.Size([2, 2, 1, 28, 28])
        >>> sum(p.numel() for p in decoder.parameters())
        1411344
    """

    def __init__(
        self,
        num_capsules: int,
        capsule_dim: int,
        out_shape: int | Sequence[int],
        hidden: Sequence[int] = (512, 1024),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "MaskedDecoder"
        self.num_capsules = check_int("num_capsules", num_capsules, owner=owner)
        self.capsule_dim = check_int("capsule_dim", capsule_dim, owner=owner)
        if isinstance(out_shape, int) and not isinstance(out_shape, bool):
            out_shape = (out_shape,)
        if not isinstance(out_shape, Sequence) or len(out_shape) == 0:
            raise TypeError(
                f"{owner}: out_shape must be an int or a non-empty tuple of ints, got {out_shape!r}"
            )
        self.out_shape = tuple(
            check_int(f"out_shape[{i}]", s, owner=owner) for i, s in enumerate(out_shape)
        )
        if not isinstance(hidden, Sequence):
            raise TypeError(f"{owner}: hidden must be a sequence of ints, got {hidden!r}")
        self.hidden = tuple(check_int(f"hidden[{i}]", h, owner=owner) for i, h in enumerate(hidden))
        sizes = (num_capsules * capsule_dim, *self.hidden)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [
                nn.Linear(fan_in, fan_out, device=device, dtype=dtype),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.Linear(sizes[-1], math.prod(self.out_shape), device=device, dtype=dtype)]
        layers += [nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """Re-initialise every linear layer as :class:`torch.nn.Linear` does."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"num_capsules={self.num_capsules}, capsule_dim={self.capsule_dim}, "
            f"out_shape={self.out_shape}, hidden={self.hidden}"
        )

    def forward(self, v: Tensor, target: Tensor | None = None) -> Tensor:
        """Mask ``v`` to one capsule per sample and decode it."""
        owner = "MaskedDecoder"
        check_tensor("v", v, owner=owner)
        check_shape(v, "B K D", name="v", owner=owner, K=self.num_capsules, D=self.capsule_dim)
        check_param_dtype("v", v, cast(nn.Linear, self.net[0]).weight, owner=owner)
        lead: tuple[int, ...] = (v.shape[0],)
        if isinstance(target, Tensor) and target.dim() == 2:
            # M reconstructions per sample: sample b's capsules once per entry of target[b]
            m = check_shape(target, "B M", name="target", owner=owner, B=v.shape[0])["M"]
            v, target, lead = v.repeat_interleave(m, dim=0), target.reshape(-1), (v.shape[0], m)
        masked = mask_capsules(v, target)
        out = self.net(masked.flatten(1))
        return out.view(*lead, *self.out_shape)
