"""The matrix-capsule network of Hinton, Sabour & Frosst (2018), assembled from torchcaps layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps._checks import check_choice, check_float, check_int
from torchcaps.layers import ClassMatrixCaps, ConvMatrixCaps2d, PrimaryMatrixCaps
from torchcaps.models._api import (
    CapsuleOutput,
    check_image_model_args,
    check_images,
    register_model,
)
from torchcaps.routing import EMRouting

__all__ = [
    "MatrixCapsNet",
    "matrix_capsnet_mnist",
    "matrix_capsnet_small_mnist",
    "matrix_capsnet_small_smallnorb",
    "matrix_capsnet_smallnorb",
]


class MatrixCapsNet(nn.Module):
    r"""Matrix capsules with EM routing: the paper's smallNORB architecture, any input size.

    From `Hinton, Sabour & Frosst 2018 <https://openreview.net/forum?id=HJWLfGWRb>`_
    (section 4, Figure 1), with :math:`A, B, C, D` the sizes of its layers:

    1. ``conv1``: :class:`torch.nn.Conv2d` (:math:`A` channels, 5x5, stride 2) and a ReLU;
    2. ``primary``: :class:`~torchcaps.PrimaryMatrixCaps` (:math:`B` capsule types);
    3. ``convcaps1``: :class:`~torchcaps.ConvMatrixCaps2d` (:math:`C` types, K=3, stride 2);
    4. ``convcaps2``: :class:`~torchcaps.ConvMatrixCaps2d` (:math:`D` types, K=3, stride 1);
    5. ``classcaps``: :class:`~torchcaps.ClassMatrixCaps` (one capsule per class, weights
       shared over positions, coordinate addition: the centre of each child's receptive field
       in the image, scaled by the image's height and width, as the paper says).

    Every routed layer runs :class:`~torchcaps.EMRouting` with ``routing_iterations`` and
    ``routing_kwargs``, except that the class layer's :math:`\lambda` (``final_lambda``) is
    ``class_lambda_scale`` times the others' (a quarter by default, as in the authors' code).
    The class layer's weights start small (:math:`\mathcal{N}(0, 0.01^2)`, also the authors'),
    so at initialisation its votes' variances sit near the floor :math:`\epsilon` and every
    class has the same mass: with the full :math:`\lambda` the MNIST class activations start
    above 0.999 (2 iterations), the sigmoid's gradient is near 0 and training does not recover;
    with a quarter they start near 0.89 (:doc:`/matrix_capsules` has the measurements).
    Every routed layer also scales :math:`\beta_a` by 5000 in the logit (``beta_a_scale``, as
    the authors' code scales its activation bias), unless ``routing_kwargs`` says otherwise:
    with the paper's unscaled :math:`\beta_a` a class that receives no mass stays at
    activation 1/2, which held the spread loss at 1.6 in a full MNIST run.

    The class scores are the class capsules' activations (train them with
    :class:`~torchcaps.SpreadLoss`); ``capsules`` are their poses, flattened to 16. There is no
    decoder (``reconstruction`` is always ``None``). For a 32x32 input the grids are 14x14,
    6x6 and 4x4; for 28x28 (MNIST) 12x12, 5x5 and 3x3.

    Args:
        in_shape: shape ``(C, H, W)`` of one input image, at least 19x19.
        num_classes: number of class capsules :math:`K`.
        conv_channels: :math:`A`.
        primary_capsules: :math:`B`.
        convcaps1_capsules: :math:`C`.
        convcaps2_capsules: :math:`D`.
        routing_iterations: EM iterations of every routed layer.
        routing_kwargs: further :class:`~torchcaps.EMRouting` arguments (``final_lambda``,
            ``eps``, ``mass_scale``, ``beta_a_scale``, by default 5000) of every routed layer.
        class_lambda_scale: the class layer's ``final_lambda`` relative to the other layers'.
        assignment: the E-step normalisation of the convolutional layers (see
            :class:`~torchcaps.ConvMatrixCaps2d`).
        coordinate_addition: whether the class layer adds the children's coordinates.
        coordinates: which coordinates: ``"receptive_field"`` (default, the paper's: the centre
            of each child's receptive field in the image, scaled by its height and width) or
            ``"grid"`` (the centres of the class layer's input grid cells, IBM's reproduction;
            this model's only coordinates before 2026-12-07).
        reconstruction: must be ``False`` (accepted for the registry's common arguments).

    Shape:
        - x: :math:`(B, C, H, W)` = ``(B, *in_shape)``.
        - target: ignored (no decoder); accepted for the common ``forward(x, target)``.
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, K)` (the
          activations), ``capsules`` :math:`(B, K, 16)` and ``reconstruction`` ``None``.

    Examples:
        >>> import torch
        >>> from torchcaps.models import MatrixCapsNet
        >>> model = MatrixCapsNet((1, 28, 28), 10, conv_channels=64, primary_capsules=8,
        ...                       convcaps1_capsules=16, convcaps2_capsules=16)
        >>> out = model(torch.rand(2, 1, 28, 28))
        >>> out.scores.shape, out.capsules.shape, out.reconstruction
        (torch.Size([2, 10]), torch.Size([2, 10, 16]), None)
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (2, 32, 32),
        num_classes: int = 5,
        *,
        conv_channels: int = 32,
        primary_capsules: int = 32,
        convcaps1_capsules: int = 32,
        convcaps2_capsules: int = 32,
        routing_iterations: int = 3,
        routing_kwargs: dict[str, Any] | None = None,
        class_lambda_scale: float = 0.25,
        assignment: Literal["all_positions", "per_window"] = "all_positions",
        coordinate_addition: bool = True,
        coordinates: Literal["receptive_field", "grid"] = "receptive_field",
        reconstruction: bool = False,
    ) -> None:
        super().__init__()
        owner = "MatrixCapsNet"
        self.in_shape, self.num_classes = check_image_model_args(
            owner, in_shape, num_classes, reconstruction
        )
        if reconstruction:
            raise ValueError(f"{owner}: has no decoder; reconstruction must be False")
        sizes = {
            "conv_channels": conv_channels,
            "primary_capsules": primary_capsules,
            "convcaps1_capsules": convcaps1_capsules,
            "convcaps2_capsules": convcaps2_capsules,
        }
        for name, value in sizes.items():
            check_int(name, value, owner=owner)
        if routing_kwargs is not None and not isinstance(routing_kwargs, dict):
            raise TypeError(
                f"{owner}: routing_kwargs must be a dict or None, got "
                f"{type(routing_kwargs).__name__}"
            )
        channels, height, width = self.in_shape
        if min(height, width) < 19:
            raise ValueError(
                f"{owner}: in_shape {self.in_shape} must be at least 19x19 (conv1 and the two "
                "convolutional capsule layers need it)"
            )
        check_float(
            "class_lambda_scale", class_lambda_scale, minimum=0.0, strict_min=True, owner=owner
        )
        check_choice("coordinates", coordinates, ("receptive_field", "grid"), owner=owner)
        em = {"iterations": routing_iterations, "beta_a_scale": 5000.0, **(routing_kwargs or {})}
        self.conv1 = nn.Conv2d(channels, conv_channels, 5, stride=2)
        self.primary = PrimaryMatrixCaps(conv_channels, primary_capsules)
        self.convcaps1 = ConvMatrixCaps2d(
            primary_capsules, convcaps1_capsules, 3, 2, routing_kwargs=em, assignment=assignment
        )
        self.convcaps2 = ConvMatrixCaps2d(
            convcaps1_capsules, convcaps2_capsules, 3, 1, routing_kwargs=em, assignment=assignment
        )
        below = (self.conv1, self.convcaps1, self.convcaps2)  # the 1x1 primary caps move nothing
        self.classcaps = ClassMatrixCaps(
            convcaps2_capsules,
            self.num_classes,
            routing_kwargs=em,
            coordinate_addition=coordinate_addition,
            receptive_field=(
                (_centres(below, 0, height), _centres(below, 1, width))
                if coordinates == "receptive_field"
                else None
            ),
        )
        cast(EMRouting, self.classcaps.routing).final_lambda *= class_lambda_scale

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        """Class activations (the scores) and class poses."""
        check_images(x, self.in_shape, "MatrixCapsNet")
        caps = self.primary(F.relu(self.conv1(x)))
        out = self.classcaps(self.convcaps2(self.convcaps1(caps)))
        return CapsuleOutput(out.activations, out.poses, None)


def _centres(layers: Sequence[nn.Module], axis: int, size: int) -> tuple[float, float]:
    """``(c_0, step)``: the receptive-field centre of the last layer's output cells along ``axis``.

    Cell :math:`h` of a layer's output (kernel :math:`k`, stride :math:`s`, padding :math:`p`),
    in input coordinates where pixel :math:`i` spans :math:`[i, i + 1)`, is centred at
    :math:`h s - p + k / 2`; composed down to the image and divided by its ``size``.
    """
    centre, step = 0.5, 1.0  # cell h of the top grid: centre 0.5 + h in its own units
    for layer in reversed(layers):
        k, s, p = (getattr(layer, name)[axis] for name in ("kernel_size", "stride", "padding"))
        centre, step = s * (centre - 0.5) - p + k / 2, step * s
    return centre / size, step / size


_LARGE = {"conv_channels": 32, "primary_capsules": 32, "convcaps1_capsules": 32,
          "convcaps2_capsules": 32}  # fmt: skip
_SMALL = {"conv_channels": 64, "primary_capsules": 8, "convcaps1_capsules": 16,
          "convcaps2_capsules": 16}  # fmt: skip


@register_model("matrix_capsnet_smallnorb")
def matrix_capsnet_smallnorb(**kwargs: Any) -> MatrixCapsNet:
    """The paper's smallNORB model (A=B=C=D=32): 2x32x32 stereo crops, 5 classes.

    317,194 parameters (the paper: "310K"). Keyword arguments override the defaults.

    Shape:
        - x: :math:`(B, 2, 32, 32)`.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 5)` (the
          class activations), ``capsules`` :math:`(B, 5, 16)` and ``reconstruction`` ``None``.

    Examples:
        >>> from torchcaps.models import matrix_capsnet_smallnorb
        >>> sum(p.numel() for p in matrix_capsnet_smallnorb().parameters())
        317194
    """
    return MatrixCapsNet(**{"in_shape": (2, 32, 32), "num_classes": 5, **_LARGE, **kwargs})


@register_model("matrix_capsnet_small_smallnorb")
def matrix_capsnet_small_smallnorb(**kwargs: Any) -> MatrixCapsNet:
    """The paper's small smallNORB model (A=64, B=8, C=D=16): 2x32x32 crops, 5 classes.

    68,754 parameters (the paper: "68K").

    Shape:
        - x: :math:`(B, 2, 32, 32)`.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 5)` (the
          class activations), ``capsules`` :math:`(B, 5, 16)` and ``reconstruction`` ``None``.

    Examples:
        >>> from torchcaps.models import matrix_capsnet_small_smallnorb
        >>> sum(p.numel() for p in matrix_capsnet_small_smallnorb().parameters())
        68754
    """
    return MatrixCapsNet(**{"in_shape": (2, 32, 32), "num_classes": 5, **_SMALL, **kwargs})


@register_model("matrix_capsnet_mnist")
def matrix_capsnet_mnist(**kwargs: Any) -> MatrixCapsNet:
    """The large model (A=B=C=D=32) for 28x28 digits and 10 classes.

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)` (the
          class activations), ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` ``None``.

    Examples:
        >>> from torchcaps.models import matrix_capsnet_mnist
        >>> sum(p.numel() for p in matrix_capsnet_mnist().parameters())
        318964
    """
    return MatrixCapsNet(**{"in_shape": (1, 28, 28), "num_classes": 10, **_LARGE, **kwargs})


@register_model("matrix_capsnet_small_mnist")
def matrix_capsnet_small_mnist(**kwargs: Any) -> MatrixCapsNet:
    """The small model (A=64, B=8, C=D=16) for 28x28 digits and 10 classes.

    Shape:
        - x: :math:`(B, 1, 28, 28)`.
        - target: ignored (no decoder).
        - Output: :class:`~torchcaps.models.CapsuleOutput` with ``scores`` :math:`(B, 10)` (the
          class activations), ``capsules`` :math:`(B, 10, 16)` and ``reconstruction`` ``None``.

    Examples:
        >>> from torchcaps.models import matrix_capsnet_small_mnist
        >>> sum(p.numel() for p in matrix_capsnet_small_mnist().parameters())
        68444
    """
    return MatrixCapsNet(**{"in_shape": (1, 28, 28), "num_classes": 10, **_SMALL, **kwargs})
