"""The convolutional baseline of Sabour, Frosst & Hinton (2017) for MNIST."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import check_float, check_int
from torchcaps.models._api import (
    CapsuleOutput,
    check_image_model_args,
    check_images,
    register_model,
)

__all__ = ["BaselineCNN", "baseline_cnn_mnist"]


class BaselineCNN(nn.Module):
    r"""The paper's baseline CNN: three 5x5 convolutions, two hidden fully connected layers.

    From `Sabour, Frosst & Hinton 2017 <https://arxiv.org/abs/1710.09829>`_, section 5: "three
    convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The
    last convolutional layers are followed by two fully connected layers of size 328, 192. The
    last fully connected layer is connected with dropout to a 10 class softmax layer with cross
    entropy loss." Every convolution keeps the grid size (padding 2) and is followed by a ReLU,
    as are the hidden layers; no pooling, which is what gives the paper's 35.4M parameters for
    28x28 input (35,445,522 here). The scores are the logits (train them with
    :func:`torch.nn.functional.cross_entropy`); there are no capsules and no decoder
    (``capsules`` and ``reconstruction`` are ``None``).

    Args:
        in_shape: shape ``(C, H, W)`` of one input image.
        num_classes: number of classes :math:`K`.
        channels: channels of the three convolutions.
        hidden: sizes of the two hidden fully connected layers.
        dropout: dropout probability before the output layer (the paper does not give it).
        reconstruction: must be ``False`` (accepted for the registry's common arguments).

    Shape:
        - x: :math:`(B, C, H, W)` = ``(B, *in_shape)``.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, K)`,
          the logits, and ``capsules`` and ``reconstruction`` ``None``.

    Examples:
        >>> import torch
        >>> from torchcaps.models import BaselineCNN
        >>> model = BaselineCNN((1, 28, 28), 10, channels=(8, 8, 4), hidden=(16, 8))
        >>> out = model(torch.rand(2, 1, 28, 28))
        >>> out.scores.shape, out.capsules, out.reconstruction
        (torch.Size([2, 10]), None, None)
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (256, 256, 128),
        hidden: Sequence[int] = (328, 192),
        dropout: float = 0.5,
        reconstruction: bool = False,
    ) -> None:
        super().__init__()
        owner = "BaselineCNN"
        self.in_shape, self.num_classes = check_image_model_args(
            owner, in_shape, num_classes, reconstruction
        )
        if reconstruction:
            raise ValueError(f"{owner}: has no decoder; reconstruction must be False")
        for name, sizes, count in (("channels", channels, 3), ("hidden", hidden, 2)):
            if not isinstance(sizes, Sequence) or len(sizes) != count:
                raise TypeError(
                    f"{owner}: {name} must be a sequence of {count} ints, got {sizes!r}"
                )
            for i, v in enumerate(sizes):
                check_int(f"{name}[{i}]", v, owner=owner)
        self.dropout = check_float("dropout", dropout, minimum=0.0, maximum=1.0, owner=owner)
        c, h, w = self.in_shape
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 5, padding=2)
            for cin, cout in zip((c, *channels[:-1]), channels, strict=True)
        )
        self.fc1 = nn.Linear(channels[-1] * h * w, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], self.num_classes)

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        """Class logits (the scores); no capsules, no reconstruction."""
        check_images(x, self.in_shape, "BaselineCNN")
        for conv in self.convs:
            x = F.relu(conv(x))
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        x = F.dropout(x, self.dropout, self.training)
        return CapsuleOutput(self.out(x), None, None)


@register_model("baseline_cnn_mnist")
def baseline_cnn_mnist(**kwargs: Any) -> BaselineCNN:
    """The paper's MNIST baseline CNN for 28x28 digits: 35,445,522 parameters ("35.4M").

    Keyword arguments override the defaults (``in_shape=(1, 40, 40)`` for a 40x40 canvas).

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)`,
          the logits, and ``capsules`` and ``reconstruction`` ``None``.

    Examples:
        >>> from torchcaps.models import baseline_cnn_mnist
        >>> sum(p.numel() for p in baseline_cnn_mnist().parameters())
        35445522
    """
    return BaselineCNN(**{"in_shape": (1, 28, 28), "num_classes": 10, **kwargs})
