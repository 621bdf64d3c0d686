"""An affNIST-style test set: random affine transformations of digits on a larger canvas.

Section 5.2 of Sabour et al. (2017) tests MNIST models on affNIST. affNIST cannot be
downloaded where torchcaps is tested, so :func:`affine_mnist` builds a set with affNIST's
ranges from any digits instead; it is not affNIST, and results on it are not affNIST results.
"""

# No ``from __future__ import annotations``: the NamedTuple's field types stay real classes, which
# the API docs resolve.
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import check_float, check_int
from torchcaps.datasets._images import image_batch, label_vector
from torchcaps.datasets.shift import content_margins

__all__ = ["AffineMNIST", "affine_mnist"]

_CHUNK = 1024  # images per grid_sample call (the sampling grid is 8 bytes per output pixel)


class AffineMNIST(NamedTuple):
    r"""The transformed images, their labels and each image's transformation.

    The map from input pixel :math:`p` (pixel centres at integer coordinates ``(x, y)``) to
    canvas pixel :math:`q` is :math:`q = A (p - c_{in}) + c_{out} + t` with
    :math:`A = R(\theta)\, \mathrm{Sh}(s)\, \mathrm{diag}(s_x, s_y)`, :math:`R` a
    counter-clockwise rotation (as seen on screen, y pointing down), :math:`\mathrm{Sh}(s) =
    \begin{pmatrix} 1 & s \\ 0 & 1 \end{pmatrix}`, and :math:`c_{in}, c_{out}` the centres of
    the input image and of the canvas.

    Fields: ``images``, float in [0, 1]; ``labels``; ``angles`` in degrees; ``shears``;
    ``scales``, :math:`(s_x, s_y)`; ``translations``, :math:`t = (t_x, t_y)` in pixels.

    Shape:
        - ``images``: :math:`(N, 1, S, S)`, :math:`S` the canvas side.
        - ``labels``, ``angles``, ``shears``: :math:`(N,)`.
        - ``scales``, ``translations``: :math:`(N, 2)`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import AffineMNIST, affine_mnist
        >>> out = affine_mnist(torch.rand(4, 28, 28), torch.tensor([0, 1, 2, 3]), seed=1)
        >>> isinstance(out, AffineMNIST), out.images.shape, out.scales.shape
        (True, torch.Size([4, 1, 40, 40]), torch.Size([4, 2]))
    """

    images: Tensor
    labels: Tensor
    angles: Tensor
    shears: Tensor
    scales: Tensor
    translations: Tensor


def affine_mnist(
    images: Tensor,
    labels: Tensor,
    *,
    seed: int = 0,
    canvas: int = 40,
    max_rotation: float = 20.0,
    max_shear: float = 0.1,
    scale: tuple[float, float] = (0.8, 1.2),
) -> AffineMNIST:
    r"""A fixed-seed affNIST-style test set: each digit randomly transformed on a larger canvas.

    Every image gets its own rotation, uniform in :math:`\pm` ``max_rotation`` degrees, shear
    uniform in :math:`\pm` ``max_shear``, horizontal and vertical scales drawn independently
    from ``scale`` (affNIST's ranges: 20 degrees, 0.8-1.2), and a translation within the
    ``canvas`` x ``canvas`` square: uniform over the offsets that keep the transformed digit's
    bounding box (its non-zero pixels) inside the canvas, or 0 where no offset does. Pixels are
    sampled bilinearly with zero fill (:class:`AffineMNIST` has the map). The parameters are
    drawn from one generator seeded with ``seed``, six numbers per image in image order, so
    the set is deterministic in ``seed`` and image :math:`k` does not depend on how many images
    follow. It is **not affNIST** (which cannot be downloaded here): name it as this function
    does, an affNIST-style set.

    Args:
        images: digits, :math:`(N, 1, H, W)` or :math:`(N, H, W)`, float in [0, 1] or uint8.
        labels: their classes, :math:`(N,)`, in 0-9.
        seed: seed of the transformations.
        canvas: side of the output square (40, affNIST's).
        max_rotation: largest rotation in degrees, either way.
        max_shear: largest shear factor, either way.
        scale: range of the horizontal and vertical scale factors.

    Shape:
        - Output: :class:`AffineMNIST` with ``images`` :math:`(N, 1, S, S)`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import affine_mnist
        >>> digits = torch.zeros(3, 28, 28)
        >>> digits[:, 8:20, 12:16] = 1.0
        >>> out = affine_mnist(digits, torch.tensor([1, 1, 7]), seed=0)
        >>> out.images.shape, bool((out.angles.abs() <= 20).all())
        (torch.Size([3, 1, 40, 40]), True)
        >>> torch.equal(affine_mnist(digits, torch.tensor([1, 1, 7]), seed=0).images, out.images)
        True
    """
    owner = "affine_mnist"
    x = image_batch(images, owner)
    n, c, h, w = x.shape
    y = label_vector(labels, n, owner)
    seed = check_int("seed", seed, minimum=0, owner=owner)
    canvas = check_int("canvas", canvas, owner=owner)
    if canvas < max(h, w):
        raise ValueError(f"{owner}: canvas {canvas} is smaller than the images, {h}x{w}")
    max_rotation = check_float("max_rotation", max_rotation, minimum=0.0, owner=owner)
    max_shear = check_float("max_shear", max_shear, minimum=0.0, owner=owner)
    if not isinstance(scale, (tuple, list)) or len(scale) != 2:
        raise TypeError(f"{owner}: scale must be a pair (low, high), got {scale!r}")
    low, high = (check_float("scale", v, minimum=0.0, strict_min=True, owner=owner) for v in scale)
    if low > high:
        raise ValueError(
            f"{owner}: scale must be a range (low, high) with 0 < low <= high, got {scale!r}"
        )
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 6, generator=g, dtype=torch.float64)
    angles = (2 * u[:, 0] - 1) * max_rotation
    shears = (2 * u[:, 1] - 1) * max_shear
    scales = low + (high - low) * u[:, 2:4]
    theta = torch.deg2rad(angles)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # A = R Sh S; on screen (y down) a counter-clockwise rotation is [[cos, sin], [-sin, cos]]
    rot = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    shear = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shear[:, 0, 1] = shears
    a = rot @ shear @ torch.diag_embed(scales)  # (N, 2, 2)
    c_in = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    c_out = torch.full((2,), (canvas - 1) / 2, dtype=torch.float64)
    translations = _translations(x, a, c_in, c_out, canvas, u[:, 4:6])
    out = torch.empty(n, c, canvas, canvas, dtype=x.dtype, device=x.device)
    for s in range(0, n, _CHUNK):
        sl = slice(s, s + _CHUNK)
        out[sl] = _warp(x[sl], a[sl], c_in, c_out + translations[sl], canvas)
    return AffineMNIST(out, y, angles, shears, scales, translations)


def _translations(
    x: Tensor, a: Tensor, c_in: Tensor, c_out: Tensor, canvas: int, u: Tensor
) -> Tensor:
    """Offsets (N, 2) that keep each transformed digit's bounding box inside the canvas.

    ``u`` (N, 2): uniforms in [0, 1), the fraction of each axis's free range.
    """
    h, w = x.shape[2:]
    top, below, left, beside = content_margins(x.detach().cpu())
    bottom, right = h - 1 - below, w - 1 - beside  # the content's last row and column
    empty = top == h
    # corners of the content's pixel extent, relative to the input centre: (N, 4, 2)
    xs = torch.stack([left - 0.5, right + 0.5], 1).double() - c_in[0]
    ys = torch.stack([top - 0.5, bottom + 0.5], 1).double() - c_in[1]
    corners = torch.stack(
        [torch.stack([xs[:, i], ys[:, j]], 1) for i in range(2) for j in range(2)], 1
    )
    moved = corners @ a.transpose(1, 2) + c_out  # (N, 4, 2) on the canvas
    low = -0.5 - moved.min(dim=1).values  # smallest offset keeping the box inside, per axis
    high = canvas - 0.5 - moved.max(dim=1).values
    fits = (low <= high).all(dim=1) & ~empty
    t = low + (high - low) * u
    return torch.where(fits.unsqueeze(1), t, torch.zeros_like(t))


def _warp(x: Tensor, a: Tensor, c_in: Tensor, centre: Tensor, canvas: int) -> Tensor:
    """Sample canvas pixel q from input pixel p = A^-1 (q - centre) + c_in, bilinearly."""
    b, _, h, w = x.shape
    coords = torch.arange(canvas, dtype=torch.float64)
    qy, qx = torch.meshgrid(coords, coords, indexing="ij")
    q = torch.stack([qx, qy], -1).view(1, canvas * canvas, 2) - centre.view(b, 1, 2)
    p = q @ torch.linalg.inv(a).transpose(1, 2) + c_in  # (B, S*S, 2) as (x, y)
    # grid_sample's normalised coordinates with align_corners=True: -1 and 1 are the centres of
    # the first and last pixels
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], dtype=torch.float64)
    grid = (p * scale - 1).view(b, canvas, canvas, 2).to(device=x.device, dtype=x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
