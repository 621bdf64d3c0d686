"""Training-time augmentation of the examples, batched on the training device.

An augmentation maps a float batch ``(B, C, H, W)`` in [0, 1] to one of the same shape, drawing
its randomness from the run's data generator. Under data parallelism each rank holds a shard of
a global batch: every random number is drawn for the whole global batch (the same draw on every
rank) and the rank keeps its slice, so an image gets the same augmentation as in a
single-process run with the same seed.

- :class:`Shift`: the CapsNet paper's random shifts of up to 2 pixels (zero fill).
- :class:`CanvasShift`: each image centred on a larger canvas, then shifted as :class:`Shift`
  (the training digits of the affine-robustness experiment, 28x28 on 40x40).
- :class:`EfficientCapsNetAugment`: the MNIST augmentation of the Efficient-CapsNet code
  (rotation, shift within the free margin, width squish, a 4x4 erase).
- :class:`SmallNORBAugment`: the matrix-capsule paper's smallNORB training preprocessing
  (48x48, standardised, random 32x32 crops with brightness and contrast); it changes the
  images' size, as an augmentation may (the model's input is its output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps.datasets import (
    content_margins,
    crop_brightness_contrast,
    pad_to_canvas,
    preprocess_smallnorb,
    random_crop_parameters,
    random_shift_offsets,
    smallnorb_downsample,
    standardize_images,
    translate,
)

# (images (B, C, H, W) float in [0, 1], generator, rank, world) -> the model's input batch
Augment = Callable[[Tensor, torch.Generator, int, int], Tensor]


def _draw(
    sample: Callable[[int], Tensor], b: int, rank: int, world: int, device: torch.device
) -> Tensor:
    """``sample(world * b)`` (random numbers for the global batch), this rank's slice of it."""
    return sample(b * world)[rank * b : (rank + 1) * b].to(device)


def random_shift(
    images: Tensor, max_shift: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> Tensor:
    """Shift each image independently by up to ``max_shift`` pixels in x and y, zero padded.

    ``images``: (B, ..., H, W) of any dtype -> the same shape and dtype; the offsets of
    :func:`torchcaps.datasets.random_shift_offsets`, drawn for the global batch of
    ``world * B`` images (see the module documentation), applied by
    :func:`torchcaps.datasets.translate`. With one process it is
    :func:`torchcaps.datasets.random_shift`.
    """
    offsets = _draw(
        lambda n: random_shift_offsets(n, max_shift, generator=generator),
        images.shape[0],
        rank,
        world,
        images.device,
    )
    return translate(images, offsets[:, 0], offsets[:, 1])


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate image ``k`` counter-clockwise by ``degrees[k]`` about its centre, zero fill.

    As OpenCV's ``warpAffine`` with a rotation matrix: the output pixel at (x, y) (pixel
    centres at integer coordinates, centre ``c = ((W - 1) / 2, (H - 1) / 2)``) reads the input
    at ``c + R(-degrees) (p - c)``, bilinearly, with zeros outside.
    """
    b, _, h, w = images.shape
    t = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(t), torch.sin(t)
    # In the normalised coordinates of align_corners=True, x_n = 2 x / (W - 1) - 1 (same for y).
    ry, rx = (h - 1) / max(w - 1, 1), (w - 1) / max(h - 1, 1)
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos, -sin * ry, zero], 1), torch.stack([sin * rx, cos, zero], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def squish(images: Tensor, width_cut: Tensor, offset: Tensor, max_cut: int) -> Tensor:
    """Shrink image ``k``'s width by ``width_cut[k]`` pixels, place it ``offset[k]`` from the left.

    Each image is resized to (H, W - width_cut[k]) (bilinear, antialiased), zero padded back to
    width W on the right and moved right by ``offset[k]``; ``width_cut`` takes values in
    ``0..max_cut``.
    """
    h, w = images.shape[-2:]
    out = images.clone()
    for cut in range(1, max_cut + 1):
        resized = F.interpolate(images, size=(h, w - cut), mode="bilinear", antialias=True)
        resized = F.pad(resized, (0, cut))
        out = torch.where((width_cut == cut).view(-1, 1, 1, 1), resized, out)
    return translate(out, torch.zeros_like(offset), offset)


def erase(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Set the ``size`` x ``size`` patch at (``top[k]``, ``left[k]``) of image ``k`` to zero."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device) - top.view(-1, 1)
    cols = torch.arange(w, device=images.device) - left.view(-1, 1)
    inside = ((rows >= 0) & (rows < size)).unsqueeze(2) & ((cols >= 0) & (cols < size)).unsqueeze(1)
    return images * (~inside).unsqueeze(1).to(images.dtype)


def shift_within_margins(images: Tensor, amount: Tensor, forth: Tensor) -> Tensor:
    """Shift each image by a fraction of its empty margin, so that its content is never cut.

    ``amount`` (2, B) in [0, 1) and ``forth`` (2, B) bool, row 0 for the vertical axis and row 1
    for the horizontal one: image ``k`` moves by ``floor(amount m)`` pixels towards the end of
    the axis (down/right) when ``forth``, ``m`` the empty margin there plus one, and by
    ``floor(amount m)`` towards its start otherwise, ``m`` the empty margin there (the
    official code's rounding).
    """
    top, bottom, left, right = content_margins(images)
    steps = []
    for axis, (before, after) in enumerate(((top, bottom), (left, right))):
        back = torch.floor(-amount[axis] * before)
        ahead = torch.floor(amount[axis] * (after + 1))
        steps.append(torch.where(forth[axis], ahead, back).long())
    return translate(images, steps[0], steps[1])


@dataclass(frozen=True)
class Shift:
    """Random shifts of up to ``max_shift`` pixels in x and y, per image (:func:`random_shift`)."""

    max_shift: int = 2

    def __call__(
        self, images: Tensor, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> Tensor:
        if self.max_shift <= 0:
            return images
        return random_shift(images, self.max_shift, generator, rank, world)


@dataclass(frozen=True)
class CanvasShift:
    """Each image centred on a ``canvas`` x ``canvas`` square
    (:func:`torchcaps.datasets.pad_to_canvas`), then shifted by up to ``max_shift`` pixels in
    x and y (:class:`Shift`)."""

    canvas: int = 40
    max_shift: int = 2

    def __call__(
        self, images: Tensor, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> Tensor:
        placed = pad_to_canvas(images, self.canvas)
        return Shift(self.max_shift)(placed, generator, rank, world)


@dataclass(frozen=True)
class EfficientCapsNetAugment:
    """The MNIST augmentation of the Efficient-CapsNet code (after Byerly et al.), batched.

    In this order, each with its own draws per image (``N`` a normal of standard deviation
    ``spread`` = 0.33):

    1. with probability 1/2, rotate by ``trunc(30 clip(N, -0.9999, 0.9999))`` degrees
       (:func:`rotate`; whole degrees, as the official code passes the angle through ``int``);
    2. shift along each axis, in a random direction, by ``floor(a m)`` pixels (towards the
       top/left) or ``floor(a (m + 1))`` (towards the bottom/right), ``a = min(|N|, 0.9999)``
       and ``m`` the empty margin on that side, so the digit is never cut;
    3. squish: shrink the width by ``floor(a W / 4 + 1)`` pixels (``a = min(|N|, 0.9999)``) and
       place the result ``cut // 2 + floor(2 a')`` pixels from the left (:func:`squish`);
    4. erase a 4x4 patch at a uniform position in ``[4, H - 6] x [4, W - 6]``.

    Deviations from the official code: rotation about the true centre ``((W-1)/2, (H-1)/2)``
    (OpenCV's call there uses (14, 14) for 28x28) and bilinear antialiased resizing in the
    squish instead of Lanczos-3.
    """

    spread: float = 0.33
    max_degrees: float = 30.0
    erase_size: int = 4

    def __call__(
        self, images: Tensor, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device

        def normal(n: int) -> Tensor:
            return torch.randn(n, generator=generator, device=generator.device) * self.spread

        def uniform(n: int) -> Tensor:
            return torch.rand(n, generator=generator, device=generator.device)

        def draw(fn: Callable[[int], Tensor]) -> Tensor:
            return _draw(fn, b, rank, world, dev)

        # 1. rotation
        angle = torch.trunc(draw(normal).clamp(-0.9999, 0.9999) * self.max_degrees)
        angle = torch.where(draw(normal) > 0, torch.zeros_like(angle), angle)
        images = rotate(images, angle)
        # 2. shift within the free margins (draws: y amount, y direction, x amount, x direction)
        draws = [(draw(normal).abs().clamp(max=0.9999), draw(uniform) >= 0.5) for _ in range(2)]
        images = shift_within_margins(
            images,
            torch.stack([a for a, _ in draws]),
            torch.stack([f for _, f in draws]),
        )
        # 3. squish
        max_cut = math.floor(0.9999 * w / 4 + 1)
        cut = torch.floor(draw(normal).abs().clamp(max=0.9999) * (w / 4) + 1).long()
        offset = cut // 2 + torch.floor(draw(normal).abs().clamp(max=0.9999) * 2).long()
        images = squish(images, cut, offset, max_cut)
        # 4. erase
        span = h - 2 * self.erase_size - 1, w - 2 * self.erase_size - 1
        erase_top = torch.floor(draw(uniform) * span[0]).long() + self.erase_size
        erase_left = torch.floor(draw(uniform) * span[1]).long() + self.erase_size
        return erase(images, erase_top, erase_left, self.erase_size)


@dataclass(frozen=True)
class SmallNORBAugment:
    """The training preprocessing of Hinton et al. (2018) for smallNORB, batched.

    Downsample to 48x48 (:func:`torchcaps.datasets.smallnorb_downsample`), standardise each
    image, then a random ``size`` x ``size`` crop with random brightness and contrast
    (:func:`torchcaps.datasets.random_crop_parameters`, drawn for the global batch, and
    :func:`torchcaps.datasets.crop_brightness_contrast`): what
    :func:`torchcaps.datasets.preprocess_smallnorb` does with ``train=True``.
    :meth:`test_input` is its test-time counterpart (the centre crop).
    """

    size: int = 32
    max_brightness: float = 0.25
    contrast: tuple[float, float] = (0.5, 1.5)

    def __call__(
        self, images: Tensor, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> Tensor:
        x = standardize_images(smallnorb_downsample(images, 48))
        b = x.shape[0]
        drawn = random_crop_parameters(
            b * world,
            (x.shape[2], x.shape[3]),
            self.size,
            max_brightness=self.max_brightness,
            contrast=self.contrast,
            generator=generator,
            device=generator.device,
        )
        top, left, contrast, brightness = (t[rank * b : (rank + 1) * b].to(x.device) for t in drawn)
        return crop_brightness_contrast(x, top, left, contrast, brightness, self.size)

    def test_input(self, images: Tensor) -> Tensor:
        """The test batch: downsampled, standardised, the centre ``size`` x ``size`` crop."""
        return preprocess_smallnorb(images, train=False, size=self.size)
