"""Integer translations of image batches: the shift augmentation of the CapsNet paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import check_generator, check_int, shape_str
from torchcaps.datasets._images import image_batch

__all__ = [
    "content_margins",
    "pad_to_canvas",
    "random_shift",
    "random_shift_offsets",
    "translate",
]


def translate(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    r"""Move image ``k`` down by ``dy[k]`` and right by ``dx[k]`` pixels, with zero fill.

    :math:`\text{out}[k, \dots, y, x] = \text{images}[k, \dots, y - dy_k, x - dx_k]` where that
    pixel is inside the image, 0 elsewhere; pixels moved out of the image are dropped. Any
    dtype, any number of dimensions between the batch and the last two; batched, on the
    images' device.

    Shape:
        - images: :math:`(N, *, H, W)`.
        - dy, dx: :math:`(N,)`, integer.
        - Output: the shape and dtype of ``images``.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import translate
        >>> x = torch.arange(1, 10).view(1, 3, 3)
        >>> translate(x, torch.tensor([1]), torch.tensor([-1]))
        tensor([[[0, 0, 0],
                 [2, 3, 0],
                 [5, 6, 0]]])
    """
    owner = "translate"
    if not isinstance(images, Tensor):
        raise TypeError(f"{owner}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 3:
        raise ValueError(
            f"{owner}: images must be a tensor of shape (N, *, H, W), got {shape_str(images.shape)}"
        )
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    for name, t in (("dy", dy), ("dx", dx)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or tuple(t.shape) != (b,):
            got = f"{t.dtype} {shape_str(t.shape)}"
            raise ValueError(
                f"{owner}: {name} must be an integer tensor of shape (N,) = ({b},), got {got}"
            )
    dev = images.device
    rows = torch.arange(h, device=dev) - dy.to(dev).view(b, 1)  # (N, H) source rows
    cols = torch.arange(w, device=dev) - dx.to(dev).view(b, 1)
    valid = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
    k = torch.arange(b, device=dev).view(b, 1, 1)
    src_rows, src_cols = rows.clamp(0, h - 1).unsqueeze(2), cols.clamp(0, w - 1).unsqueeze(1)
    moved = images.movedim((-2, -1), (1, 2))[k, src_rows, src_cols]  # (N, H, W, ...)
    mask = valid.view(b, h, w, *([1] * (images.dim() - 3))).to(images.dtype)
    return (moved * mask).movedim((1, 2), (-2, -1))


def pad_to_canvas(images: Tensor, canvas: int) -> Tensor:
    r"""Centre every image on a ``canvas`` x ``canvas`` square of zeros.

    The image's top-left pixel lands at row :math:`\lfloor (S - H) / 2 \rfloor` and column
    :math:`\lfloor (S - W) / 2 \rfloor` (an odd margin leaves the extra row below and the
    extra column to the right), so a 28x28 digit fills rows and columns 6-33 of a 40x40
    canvas, as MultiMNIST's and the affine set's digits before they move. Any dtype, any
    number of dimensions between the batch and the last two.

    Shape:
        - images: :math:`(N, *, H, W)` with :math:`H, W \le S` = ``canvas``.
        - Output: :math:`(N, *, S, S)`, the dtype of ``images``.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import pad_to_canvas
        >>> x = torch.ones(2, 1, 28, 28)
        >>> y = pad_to_canvas(x, 40)
        >>> y.shape, float(y[0, 0, 6:34, 6:34].sum()), float(y.sum())
        (torch.Size([2, 1, 40, 40]), 784.0, 1568.0)
    """
    owner = "pad_to_canvas"
    if not isinstance(images, Tensor):
        raise TypeError(f"{owner}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 3:
        raise ValueError(
            f"{owner}: images must be a tensor of shape (N, *, H, W), got {shape_str(images.shape)}"
        )
    canvas = check_int("canvas", canvas, owner=owner)
    h, w = images.shape[-2], images.shape[-1]
    if canvas < max(h, w):
        raise ValueError(
            f"{owner}: canvas {canvas} is smaller than the images, {h}x{w} "
            f"(images {shape_str(images.shape)})"
        )
    top, left = (canvas - h) // 2, (canvas - w) // 2
    return F.pad(images, (left, canvas - w - left, top, canvas - h - top))


def content_margins(images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The empty rows and columns on each side of each image's content.

    A pixel is content where it is non-zero in any channel. For image :math:`k` with content
    in rows :math:`y_0 \dots y_1` and columns :math:`x_0 \dots x_1`, the margins are
    :math:`(y_0, H - 1 - y_1, x_0, W - 1 - x_1)`; an image without content has margins
    :math:`(H, H, W, W)` (every row and column is empty). Shifting an image by at most its
    margin towards a side never cuts its content.

    Shape:
        - images: :math:`(N, *, H, W)`, any dtype.
        - Output: ``(top, bottom, left, right)``, each :math:`(N,)`, int64, on the images'
          device.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import content_margins
        >>> x = torch.zeros(2, 1, 4, 5)
        >>> x[0, 0, 1:3, 2] = 1.0
        >>> [m.tolist() for m in content_margins(x)]
        [[1, 4], [1, 4], [2, 5], [2, 5]]
    """
    if not isinstance(images, Tensor):
        raise TypeError(
            f"content_margins: images must be a torch.Tensor, got {type(images).__name__}"
        )
    if images.dim() < 3:
        raise ValueError(
            "content_margins: images must be a tensor of shape (N, *, H, W), "
            f"got {shape_str(images.shape)}"
        )
    h, w = images.shape[-2], images.shape[-1]
    content = images.ne(0).flatten(1, -3).any(dim=1) if images.dim() > 3 else images.ne(0)
    rows, cols = content.any(dim=2), content.any(dim=1)  # (N, H), (N, W)
    empty = ~rows.any(dim=1)

    def first(mask: Tensor, size: int) -> Tensor:
        return torch.where(empty, size, mask.int().argmax(dim=1))

    return first(rows, h), first(rows.flip(1), h), first(cols, w), first(cols.flip(1), w)


def random_shift_offsets(
    n: int,
    max_shift: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` random ``(dy, dx)`` pairs, each uniform in ``[-max_shift, max_shift]``, int64.

    Drawn as one ``(2, n)`` block from ``generator`` (the row of ``dy`` first); the pairs are
    its columns. Drawing ``world * n`` offsets and keeping a slice gives each of several
    processes its share of one global batch.

    Shape:
        - Output: :math:`(n, 2)`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import random_shift_offsets
        >>> off = random_shift_offsets(1000, 2, generator=torch.Generator().manual_seed(0))
        >>> off.shape, int(off.min()), int(off.max())
        (torch.Size([1000, 2]), -2, 2)
    """
    owner = "random_shift_offsets"
    n = check_int("n", n, minimum=0, owner=owner)
    max_shift = check_int("max_shift", max_shift, minimum=0, owner=owner)
    generator = check_generator("generator", generator, owner=owner)
    if device is None and generator is not None:
        device = generator.device
    drawn = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=device)
    # a draw o selects the window starting at o of the image padded by max_shift: a move by
    # max_shift - o
    return (max_shift - drawn).T


def random_shift(
    images: Tensor, max_shift: int, generator: torch.Generator | None = None
) -> Tensor:
    """Shift every image by its own random integer offset in ``[-max_shift, max_shift]^2``.

    The CapsNet paper's augmentation (up to 2 pixels in each direction, zero fill):
    :func:`random_shift_offsets` drawn from ``generator`` (on its device; the default
    generator when ``None``), applied by :func:`translate`. Batched, on the images' device.

    Shape:
        - images: :math:`(N, C, H, W)` or :math:`(N, H, W)`, float in [0, 1] or uint8 (scaled
          to [0, 1]).
        - Output: :math:`(N, C, H, W)` float (:math:`C = 1` for 3-d input).

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import random_shift
        >>> x = torch.zeros(4, 28, 28, dtype=torch.uint8)
        >>> x[:, 10:18, 10:18] = 255
        >>> y = random_shift(x, 2, torch.Generator().manual_seed(0))
        >>> y.shape, y.dtype, float(y.sum(dim=(1, 2, 3)).min())
        (torch.Size([4, 1, 28, 28]), torch.float32, 64.0)
    """
    owner = "random_shift"
    x = image_batch(images, owner)
    max_shift = check_int("max_shift", max_shift, minimum=0, owner=owner)
    generator = check_generator("generator", generator, owner=owner)
    offsets = random_shift_offsets(
        x.shape[0],
        max_shift,
        generator=generator,
        device=generator.device if generator is not None else x.device,
    ).to(x.device)
    return translate(x, offsets[:, 0], offsets[:, 1])
