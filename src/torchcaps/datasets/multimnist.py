"""MultiMNIST (Sabour, Frosst & Hinton 2017, section 6): pairs of overlapping shifted digits."""

# No ``from __future__ import annotations``: the NamedTuple's field types stay real classes, which
# the API docs resolve.
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchcaps._checks import check_generator, check_int
from torchcaps.datasets._images import image_batch, label_vector
from torchcaps.datasets.shift import pad_to_canvas, random_shift_offsets, translate

__all__ = [
    "MultiMNIST",
    "MultiMNISTBatches",
    "MultiMNISTSample",
    "multimnist_batch",
    "overlay_pairs",
]

_NUM_CLASSES = 10


class MultiMNISTSample(NamedTuple):
    r"""One MultiMNIST item, or a batch of them (a leading batch dimension on every field).

    Fields: ``image``, the clipped sum of the two digits on the canvas of side :math:`S`;
    ``target``, multi-hot (1 at both classes); ``components``, each digit alone, shifted as in
    the composite; ``labels``, the two classes.

    Shape:
        - ``image``: :math:`(1, S, S)`.
        - ``target``: :math:`(10,)`.
        - ``components``: :math:`(2, 1, S, S)`.
        - ``labels``: :math:`(2,)`.
        - A batch of :math:`B` items: :math:`(B, \ldots)` on every field.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import MultiMNIST
        >>> data = MultiMNIST(torch.rand(20, 28, 28), torch.arange(20) % 10)
        >>> item = data[3]
        >>> item.image.shape, item.target.shape, item.components.shape, item.labels.shape
        (torch.Size([1, 36, 36]), torch.Size([10]), torch.Size([2, 1, 36, 36]), torch.Size([2]))
        >>> int(item.target.sum()), bool(item.labels[0] != item.labels[1])
        (2, True)
    """

    image: Tensor
    target: Tensor
    components: Tensor
    labels: Tensor


def overlay_pairs(
    images: Tensor,
    labels: Tensor,
    first: Tensor,
    second: Tensor,
    shifts: Tensor,
    canvas: int = 36,
) -> MultiMNISTSample:
    r"""Compose pairs of digits: both centred on a ``canvas``-sized square, shifted, summed.

    The deterministic part of :class:`MultiMNIST` and :func:`multimnist_batch`: pair ``b`` is
    ``images[first[b]]`` moved by ``shifts[b, 0]`` and ``images[second[b]]`` moved by
    ``shifts[b, 1]`` (``(dy, dx)`` pixels from the centre, zero fill), composite
    :math:`\min(1, x_a + x_b)` as in the official generator.

    Shape:
        - images: :math:`(N, 1, H, W)` or :math:`(N, H, W)`, float in [0, 1] or uint8.
        - labels: :math:`(N,)`.
        - first, second: :math:`(B,)` indices into ``images``.
        - shifts: :math:`(B, 2, 2)` integer, ``shifts[b, d] = (dy, dx)`` of digit ``d``.
        - Output: :class:`MultiMNISTSample` with a leading :math:`B` on every field.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import overlay_pairs
        >>> digits = torch.zeros(2, 28, 28)
        >>> digits[0, 10:18, 4:8] = 1.0
        >>> digits[1, 10:18, 6:10] = 1.0
        >>> pair = overlay_pairs(digits, torch.tensor([3, 7]), torch.tensor([0]),
        ...                      torch.tensor([1]), torch.zeros(1, 2, 2, dtype=torch.long))
        >>> pair.image.shape, pair.labels.tolist(), float(pair.image.sum())  # overlap clipped
        (torch.Size([1, 1, 36, 36]), [[3, 7]], 48.0)
    """
    owner = "overlay_pairs"
    x = image_batch(images, owner)
    n, _, h, w = x.shape
    y = label_vector(labels, n, owner)
    canvas = check_int("canvas", canvas, owner=owner)
    if canvas < max(h, w):
        raise ValueError(f"{owner}: canvas {canvas} is smaller than the images, {h}x{w}")
    b = _check_indices(first, "first", n, owner)
    if _check_indices(second, "second", n, owner) != b:
        raise ValueError(
            f"{owner}: first and second must have the same length, got {b} and {second.shape[0]}"
        )
    if not isinstance(shifts, Tensor) or shifts.is_floating_point() or shifts.shape != (b, 2, 2):
        got = f"{shifts.dtype} {tuple(shifts.shape)}" if isinstance(shifts, Tensor) else shifts
        raise ValueError(
            f"{owner}: shifts must be an integer tensor (B, 2, 2) = ({b}, 2, 2), got {got}"
        )
    return _overlay(x, y, first, second, shifts, canvas)


def _overlay(
    x: Tensor, y: Tensor, first: Tensor, second: Tensor, shifts: Tensor, canvas: int
) -> MultiMNISTSample:
    """:func:`overlay_pairs` on checked input (no check reads the device)."""
    c = x.shape[1]
    b = first.shape[0]
    dev = x.device
    pairs = torch.stack([first.to(dev), second.to(dev)], dim=1)  # (B, 2)
    placed = pad_to_canvas(x[pairs.flatten()], canvas)
    moves = shifts.to(dev).reshape(2 * b, 2)
    components = translate(placed, moves[:, 0], moves[:, 1]).view(b, 2, c, canvas, canvas)
    pair_labels = y.to(dev)[pairs]
    target = torch.zeros(b, _NUM_CLASSES, device=dev, dtype=x.dtype)
    target.scatter_(1, pair_labels, 1.0)
    image = components.sum(dim=1).clamp(max=1.0)
    return MultiMNISTSample(image, target, components, pair_labels)


def _check_indices(t: Any, name: str, n: int, owner: str) -> int:
    if not isinstance(t, Tensor) or t.is_floating_point() or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{owner}: {name} must be an integer tensor (B,), got {got}")
    if t.numel() and bool(((t < 0) | (t >= n)).any()):
        raise ValueError(
            f"{owner}: {name} must index the {n} images, got {int(t.min())}..{int(t.max())}"
        )
    return t.shape[0]


_MASK64 = 2**64 - 1


def _uniforms(key: int, count: int) -> list[float]:
    """``count`` uniforms in [0, 1) that depend only on ``key``: SplitMix64 from that state.

    A counter-based draw, so item k of a dataset needs no generator state of the items before
    it (PyTorch's CPU generator would keep only 32 bits of a seed made of (seed, k)).
    """
    state, out = key & _MASK64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append((z >> 11) * 2.0**-53)
    return out


class _Partners:
    """Draws, for a digit of class c, a digit of another class: uniform over those images."""

    def __init__(self, labels: Tensor) -> None:
        self.order = torch.argsort(labels, stable=True)  # image indices grouped by class
        self.counts = torch.bincount(labels, minlength=_NUM_CLASSES)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.n = labels.shape[0]

    def pick(self, classes: Tensor, u: Tensor) -> Tensor:
        """The partners of digits of ``classes`` from uniforms ``u`` in [0, 1), one each."""
        others = (self.n - self.counts[classes]).to(u.dtype)
        rank = torch.floor(u * others).long().clamp(max=self.n - 1)
        # the rank-th image outside the class's block of ``order``: skip the block
        skip = rank >= self.starts[classes]
        return self.order[rank + skip.long() * self.counts[classes]]


class MultiMNIST(Dataset[MultiMNISTSample]):
    r"""The paper's MultiMNIST generator over a set of digits, as a fixed, indexable dataset.

    Item :math:`k` is deterministic in ``(seed, k)`` (its draws are a hash of both, independent
    of the other items): its first digit is source image
    :math:`k \bmod N`; its second is drawn uniformly from the source images of a different
    class; each is placed at the centre of a ``canvas`` x ``canvas`` square (36: 4 pixels of
    margin around a 28x28 digit) and moved by its own integer offset, uniform in
    ``[-max_shift, max_shift]^2``; the composite is their sum clipped to 1 (as the official
    generator). ``length`` (default :math:`N`) may exceed :math:`N`: with ``length = P N``
    every source digit is the first of :math:`P` pairs. The paper's test set pairs each test
    digit with 1,000 others (:math:`P` = 1,000, ten million images); pass the :math:`P` you
    use and say so. For training, :class:`MultiMNISTBatches` draws fresh pairs every step.

    Args:
        images: the source digits, :math:`(N, 1, H, W)` or :math:`(N, H, W)`, float in [0, 1]
            or uint8 (scaled to [0, 1]); at least two classes.
        labels: their classes, :math:`(N,)`, in 0-9.
        canvas: side of the square canvas.
        max_shift: the largest shift in each direction, in pixels.
        seed: seed of the pairing and shifts.
        length: number of items (default :math:`N`).

    Shape:
        - ``dataset[k]``: :class:`MultiMNISTSample` ``(image (1, S, S), target (10,),
          components (2, 1, S, S), labels (2,))``; :meth:`batch` the same with a leading
          batch dimension.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import MultiMNIST
        >>> digits, labels = torch.rand(20, 28, 28), torch.arange(20) % 10
        >>> data = MultiMNIST(digits, labels, seed=0, length=40)
        >>> item = data[5]
        >>> item.image.shape, item.components.shape, int(item.target.sum())
        (torch.Size([1, 36, 36]), torch.Size([2, 1, 36, 36]), 2)
        >>> bool(item.labels[0] != item.labels[1]), torch.equal(data[5].image, item.image)
        (True, True)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        canvas: int = 36,
        max_shift: int = 4,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        owner = "MultiMNIST"
        self.images = image_batch(images, owner)
        n = self.images.shape[0]
        self.labels = label_vector(labels, n, owner)
        if int(torch.unique(self.labels).numel()) < 2:
            raise ValueError(f"{owner}: the images must hold at least two classes")
        self.canvas = check_int("canvas", canvas, owner=owner)
        h, w = self.images.shape[2:]
        if self.canvas < max(h, w):
            raise ValueError(f"{owner}: canvas {canvas} is smaller than the images, {h}x{w}")
        self.max_shift = check_int("max_shift", max_shift, minimum=0, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        if self.seed >= 2**31:
            raise ValueError(f"{owner}: seed must be < 2**31, got {seed}")
        self.length = n if length is None else check_int("length", length, owner=owner)
        if self.length >= 2**32:
            raise ValueError(f"{owner}: length must be < 2**32, got {length}")
        self._partners_labels = self.labels.cpu()
        self._partners = _Partners(self._partners_labels)

    def __len__(self) -> int:
        return self.length

    def batch(self, indices: Tensor | list[int]) -> MultiMNISTSample:
        """Items ``indices`` at once (the same values as one by one), on the images' device.

        Each item's five uniforms come from a hash of (seed, k): the partner's, then the two
        digits' (dy, dx) shifts; the rest is computed for all items together.
        """
        ks = [_item_index(k, self.length) for k in indices]
        for k in ks:
            if not 0 <= k < self.length:
                raise IndexError(f"MultiMNIST: index {k} out of range for {self.length} items")
        u = torch.tensor(
            [_uniforms(self.seed * 2**32 + k, 5) for k in ks], dtype=torch.float64
        ).view(len(ks), 5)
        first = torch.tensor(ks, dtype=torch.long) % self.images.shape[0]
        second = self._partners.pick(self._partners_labels[first], u[:, 0])
        span = 2 * self.max_shift + 1
        moves = torch.floor(u[:, 1:] * span).long().clamp(max=span - 1)
        shifts = (self.max_shift - moves).view(len(ks), 2, 2)
        dev = self.images.device
        return _overlay(
            self.images, self.labels.to(dev), first.to(dev), second.to(dev), shifts, self.canvas
        )

    def __getitem__(self, index: int) -> MultiMNISTSample:
        index = _item_index(index, self.length)
        if index < 0:
            index += self.length
        one = self.batch([index])
        return MultiMNISTSample(*(field[0] for field in one))

    def __repr__(self) -> str:
        return (
            f"MultiMNIST({self.images.shape[0]} source digits, {self.length} items, "
            f"canvas={self.canvas}, max_shift={self.max_shift}, seed={self.seed})"
        )


def _item_index(k: Any, length: int) -> int:
    """``k`` as an item index: a Python or NumPy integer, or a one-element integer tensor."""
    if isinstance(k, Tensor) and k.numel() == 1 and not (k.is_floating_point() or k.is_complex()):
        return int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(
            f"MultiMNIST: an index must be an integer in [0, {length}), got {type(k).__name__}"
        )
    return int(k)


class MultiMNISTBatches:
    """Fresh random MultiMNIST pairs for training, drawn and composed on the images' device.

    For training, as the paper's 60M pairs: every :meth:`sample` draws ``batch_size`` first
    digits uniformly from ``images``, a partner of a different class for each (uniform over
    those images) and the shifts of both, from ``generator`` (on the images' device; the default
    generator when ``None``), then composes them as :class:`MultiMNIST` does
    (:func:`overlay_pairs`). The images are checked once, here; :meth:`sample` reads nothing
    back from the device.

    Args:
        images: the source digits, :math:`(N, 1, H, W)` or :math:`(N, H, W)`, float in [0, 1]
            or uint8 (scaled to [0, 1] once); at least two classes.
        labels: their classes, :math:`(N,)`, in 0-9.
        canvas: side of the square canvas.
        max_shift: the largest shift in each direction, in pixels.

    Shape:
        - :meth:`sample`: :class:`MultiMNISTSample` with a leading ``batch_size`` on every
          field.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import MultiMNISTBatches
        >>> batches = MultiMNISTBatches(torch.rand(50, 28, 28), torch.arange(50) % 10)
        >>> out = batches.sample(8, torch.Generator().manual_seed(0))
        >>> out.image.shape, bool((out.labels[:, 0] != out.labels[:, 1]).all())
        (torch.Size([8, 1, 36, 36]), True)
    """

    def __init__(
        self, images: Tensor, labels: Tensor, *, canvas: int = 36, max_shift: int = 4
    ) -> None:
        owner = "MultiMNISTBatches"
        self.images = image_batch(images, owner)
        n, _, h, w = self.images.shape
        self.labels = label_vector(labels, n, owner).to(self.images.device)
        if int(torch.unique(self.labels).numel()) < 2:
            raise ValueError(f"{owner}: the images must hold at least two classes")
        self.canvas = check_int("canvas", canvas, owner=owner)
        if self.canvas < max(h, w):
            raise ValueError(f"{owner}: canvas {canvas} is smaller than the images, {h}x{w}")
        self.max_shift = check_int("max_shift", max_shift, minimum=0, owner=owner)
        self._partners = _Partners(self.labels)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> MultiMNISTSample:
        """``batch_size`` fresh pairs drawn from ``generator``."""
        owner = "MultiMNISTBatches.sample"
        b = check_int("batch_size", batch_size, owner=owner)
        generator = check_generator("generator", generator, owner=owner)
        dev = self.images.device
        n = self.images.shape[0]
        first = torch.randint(0, n, (b,), generator=generator, device=dev)
        u = torch.rand(b, generator=generator, device=dev, dtype=torch.float64)
        second = self._partners.pick(self.labels[first], u)
        shifts = random_shift_offsets(2 * b, self.max_shift, generator=generator, device=dev)
        return _overlay(self.images, self.labels, first, second, shifts.view(b, 2, 2), self.canvas)

    def __repr__(self) -> str:
        return (
            f"MultiMNISTBatches({self.images.shape[0]} source digits, canvas={self.canvas}, "
            f"max_shift={self.max_shift})"
        )


def multimnist_batch(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    canvas: int = 36,
    max_shift: int = 4,
) -> MultiMNISTSample:
    """One batch of fresh pairs: ``MultiMNISTBatches(images, labels, ...).sample(...)``.

    For a training loop, build :class:`MultiMNISTBatches` once (it checks the images once) and
    call its :meth:`~MultiMNISTBatches.sample` every step.

    Shape:
        - images: :math:`(N, 1, H, W)` or :math:`(N, H, W)`, float in [0, 1] or uint8.
        - labels: :math:`(N,)`.
        - Output: :class:`MultiMNISTSample` with a leading ``batch_size`` on every field.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import multimnist_batch
        >>> g = torch.Generator().manual_seed(0)
        >>> out = multimnist_batch(torch.rand(50, 28, 28), torch.arange(50) % 10, 8, generator=g)
        >>> out.image.shape, bool((out.labels[:, 0] != out.labels[:, 1]).all())
        (torch.Size([8, 1, 36, 36]), True)
    """
    batches = MultiMNISTBatches(images, labels, canvas=canvas, max_shift=max_shift)
    return batches.sample(batch_size, generator)
