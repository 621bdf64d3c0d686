"""smallNORB (LeCun, Huang & Bottou 2004): a reader of its binary files, and preprocessing.

The preprocessing is that of the matrix-capsules paper (Hinton, Sabour & Frosst 2018).
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from torchcaps._checks import check_choice, check_int, check_shape, check_tensor, shape_str

__all__ = [
    "SMALLNORB_CLASSES",
    "SmallNORB",
    "center_crop",
    "crop_brightness_contrast",
    "preprocess_smallnorb",
    "random_crop_brightness_contrast",
    "random_crop_parameters",
    "read_norb_matrix",
    "smallnorb_downsample",
    "standardize_images",
]

SMALLNORB_CLASSES = ("animal", "human", "airplane", "truck", "car")

# magic number of a binary matrix -> (element dtype, bytes per element); little-endian
_MATRIX_TYPES = {
    0x1E3D4C51: (torch.float32, 4),
    0x1E3D4C53: (torch.float64, 8),
    0x1E3D4C54: (torch.int32, 4),
    0x1E3D4C55: (torch.uint8, 1),
    0x1E3D4C56: (torch.int16, 2),
}

_PREFIX = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it is gzipped (``.gz``)."""
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def read_norb_matrix(path: str | Path) -> Tensor:
    """Read one NORB binary matrix file (``.mat``, or gzipped ``.mat.gz``) into a tensor.

    The format (little-endian): an int32 magic number naming the element type (byte, short,
    int, float or double matrix), the int32 number of dimensions, at least three int32
    sizes (unused trailing ones are padding when there are fewer dimensions), then the
    elements in C order.

    Raises:
        ValueError: an unknown magic number, or fewer bytes than the header announces.

    Examples:
        >>> import tempfile, struct, torch
        >>> from pathlib import Path
        >>> from torchcaps.datasets import read_norb_matrix
        >>> path = Path(tempfile.mkdtemp()) / "labels.mat"
        >>> header = struct.pack("<5i", 0x1E3D4C54, 1, 3, 1, 1)  # int matrix, 1 dim: 3
        >>> _ = path.write_bytes(header + struct.pack("<3i", 4, 0, 2))
        >>> read_norb_matrix(path)
        tensor([4, 0, 2], dtype=torch.int32)
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, not a NORB binary matrix (no header)")
    magic, ndim = struct.unpack_from("<ii", data)
    if magic not in _MATRIX_TYPES:
        raise ValueError(
            f"{path}: magic number {magic:#x} is not a NORB matrix type; expected one of "
            f"{', '.join(f'{m:#x}' for m in _MATRIX_TYPES)}"
        )
    if not 0 <= ndim <= 16:
        raise ValueError(f"{path}: {ndim} dimensions in the header, expected 0 to 16")
    slots = max(ndim, 3)
    header = 8 + 4 * slots
    if len(data) < header:
        raise ValueError(f"{path}: the header needs {header} bytes, the file has {len(data)}")
    shape = struct.unpack_from(f"<{slots}i", data, 8)[:ndim]
    dtype, size = _MATRIX_TYPES[magic]
    count = math.prod(shape)
    if len(data) - header < count * size:
        raise ValueError(
            f"{path}: the header announces shape {tuple(shape)} ({count * size} bytes of data), "
            f"the file has {len(data) - header}"
        )
    flat = torch.frombuffer(bytearray(data[header : header + count * size]), dtype=dtype)
    return flat.reshape(shape).clone()


def _find(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz`` (also under ``root/smallnorb``)."""
    for base in (root, root / "smallnorb"):
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"SmallNORB: {name} (or {name}.gz) not found under {root} or {root / 'smallnorb'}; "
        "download the six files of https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/ there"
    )


class SmallNORB(Dataset[tuple[Tensor, Tensor]]):
    """The smallNORB dataset, read from its official binary files.

    ``root`` (or ``root/smallnorb``) holds ``smallnorb-5x46789x9x18x6x2x96x96-training-{dat,
    cat,info}.mat`` and ``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat``, plain
    or gzipped: 24,300 stereo pairs of 96x96 grey images per split, of 5 classes
    (:data:`SMALLNORB_CLASSES`), with the instance, elevation, azimuth and lighting of each.
    Nothing is downloaded.

    Attributes:
        images: uint8 tensor :math:`(N, 2, 96, 96)`, the two cameras as channels.
        labels: int64 tensor :math:`(N,)`, class indices 0-4.
        info: int64 tensor :math:`(N, 4)`: instance (0-9), elevation (0-8), azimuth (0-34, even),
            lighting (0-5).

    Args:
        root: the directory of the files.
        split: ``"train"`` or ``"test"``.
        transform: applied to each image (a uint8 :math:`(2, 96, 96)` tensor) by
            ``__getitem__``; the preprocessing functions of this module work on whole batches
            and are meant to be applied to :attr:`images` at once instead.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is not a NORB matrix, or the three files disagree.

    Shape:
        - ``dataset[k]``: ``(image (2, 96, 96) uint8, label ())``.

    Examples:
        >>> from torchcaps.datasets import SmallNORB
        >>> SmallNORB("/nonexistent", "train")
        Traceback (most recent call last):
            ...
        FileNotFoundError: SmallNORB: smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat (or ...
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = check_choice("split", split, ("train", "test"), owner="SmallNORB")
        self.transform = transform
        prefix = _PREFIX[self.split]
        paths = {kind: _find(self.root, f"{prefix}-{kind}.mat") for kind in ("dat", "cat", "info")}
        images = read_norb_matrix(paths["dat"])
        labels = read_norb_matrix(paths["cat"])
        info = read_norb_matrix(paths["info"])
        n = images.shape[0] if images.dim() == 4 else -1
        problems = []
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 2:
            problems.append(
                f"images {images.dtype} {shape_str(images.shape)}, expected uint8 (N, 2, H, W)"
            )
        if labels.dtype != torch.int32 or tuple(labels.shape) != (n,):
            problems.append(
                f"labels {labels.dtype} {shape_str(labels.shape)}, expected int32 ({n},)"
            )
        if info.dtype != torch.int32 or tuple(info.shape) != (n, 4):
            got = f"{info.dtype} {shape_str(info.shape)}"
            problems.append(f"info {got}, expected int32 ({n}, 4)")
        if not problems and labels.numel() and not bool(((labels >= 0) & (labels < 5)).all()):
            problems.append("labels outside 0-4")
        if problems:
            raise ValueError(f"SmallNORB({self.root}, {self.split!r}): " + "; ".join(problems))
        self.images = images
        self.labels = labels.long()
        self.info = info.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def extra_repr(self) -> str:
        return f"root={self.root}, split={self.split!r}, {len(self)} images"

    def __repr__(self) -> str:
        return f"SmallNORB({self.extra_repr()})"


def _check_batch(images: Any, owner: str) -> Tensor:
    """A batch of images: a float or uint8 tensor of shape (N, C, H, W)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{owner}: images must be a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        check_tensor("images", images, owner=owner)
    check_shape(images, "N C H W", name="images", owner=owner)
    return images


def smallnorb_downsample(images: Tensor, size: int = 48) -> Tensor:
    r"""Resize a batch to ``size`` x ``size`` (the paper's 96 -> 48), bilinear with antialiasing.

    uint8 input is scaled to [0, 1] first; the result is float32.

    Shape:
        - images: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, \text{size}, \text{size})`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import smallnorb_downsample
        >>> smallnorb_downsample(torch.zeros(3, 2, 96, 96, dtype=torch.uint8)).shape
        torch.Size([3, 2, 48, 48])
    """
    owner = "smallnorb_downsample"
    _check_batch(images, owner)
    size = check_int("size", size, owner=owner)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def standardize_images(images: Tensor, eps: float = 1e-5) -> Tensor:
    """Each image to zero mean and unit variance (over its channels and pixels).

    ``eps`` is added to the variance, so a constant image becomes 0, not NaN.

    Shape:
        - images: :math:`(N, C, H, W)`; output the same.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import standardize_images
        >>> x = standardize_images(torch.rand(4, 2, 8, 8))
        >>> bool(x.mean(dim=(1, 2, 3)).abs().max() < 1e-5)
        True
    """
    _check_batch(images, "standardize_images")
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def center_crop(images: Tensor, size: int = 32) -> Tensor:
    r"""The central ``size`` x ``size`` window of every image (the paper's test crop).

    With an odd margin the window starts at ``(H - size) // 2``.

    Shape:
        - images: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, \text{size}, \text{size})`, a view.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import center_crop
        >>> center_crop(torch.arange(16.).view(1, 1, 4, 4), 2)
        tensor([[[[ 5.,  6.],
                  [ 9., 10.]]]])
    """
    owner = "center_crop"
    _check_batch(images, owner)
    size = _check_crop(images, size, owner)
    top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
    return images[:, :, top : top + size, left : left + size]


def _check_crop(images: Tensor, size: int, owner: str) -> int:
    size = check_int("size", size, owner=owner)
    if size > min(images.shape[2], images.shape[3]):
        raise ValueError(
            f"{owner}: crop size {size} is larger than the images, {shape_str(images.shape)}"
        )
    return size


def _check_float_crop(images: Tensor, size: int, owner: str) -> int:
    """A float batch (N, C, H, W) and a crop size that fits it."""
    _check_batch(images, owner)
    size = _check_crop(images, size, owner)
    if not images.is_floating_point():
        raise TypeError(f"{owner}: images must be floating point, got {images.dtype}")
    return size


def crop_brightness_contrast(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    contrast: Tensor,
    brightness: Tensor,
    size: int = 32,
) -> Tensor:
    r"""Crop image ``k`` at (``top[k]``, ``left[k]``), then set its contrast and brightness.

    The deterministic part of :func:`random_crop_brightness_contrast`, for callers that draw
    the parameters themselves (for example once for a global batch split over processes):
    :math:`y_k = (w_k - \bar{w}_k)\, c_k + \bar{w}_k + b_k`, with :math:`w_k` the ``size`` x
    ``size`` window of image :math:`k` (all channels), :math:`\bar{w}_k` its mean,
    :math:`c_k` = ``contrast[k]`` and :math:`b_k` = ``brightness[k]``.

    Shape:
        - images: :math:`(N, C, H, W)`, float.
        - top, left: :math:`(N,)` integer, ``0 <= top <= H - size``, ``0 <= left <= W - size``
          (checked for CPU tensors; elsewhere checking would wait for the device).
        - contrast, brightness: :math:`(N,)` float.
        - Output: :math:`(N, C, \text{size}, \text{size})`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import crop_brightness_contrast
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> one, zero = torch.ones(1, dtype=torch.long), torch.zeros(1)
        >>> crop_brightness_contrast(x, one, one, torch.ones(1), zero, size=2)
        tensor([[[[ 5.,  6.],
                  [ 9., 10.]]]])
    """
    owner = "crop_brightness_contrast"
    size = _check_float_crop(images, size, owner)
    n, c, h, w = images.shape
    for name, t, integer in (
        ("top", top, True),
        ("left", left, True),
        ("contrast", contrast, False),
        ("brightness", brightness, False),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (n,):
            raise ValueError(
                f"{owner}: {name} must have shape (N,) = ({n},) for images "
                f"{shape_str(images.shape)}, got {shape_str(t.shape)}"
            )
        if integer and t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be an integer tensor, got {t.dtype}")
    # The window check reads the offsets' values: done where that costs no device sync.
    if (
        n
        and top.device.type == "cpu"
        and left.device.type == "cpu"
        and (
            bool((top.min() < 0) | (top.max() > h - size))
            or bool((left.min() < 0) | (left.max() > w - size))
        )
    ):
        raise ValueError(
            f"{owner}: windows of size {size} at top in [0, {h - size}] and left in "
            f"[0, {w - size}] fit images {shape_str(images.shape)}; got top "
            f"{top.min().item()}..{top.max().item()}, left {left.min().item()}..{left.max().item()}"
        )
    dev = images.device
    rows = (top.to(dev).view(n, 1) + torch.arange(size, device=dev)).view(n, 1, size, 1)
    cols = (left.to(dev).view(n, 1) + torch.arange(size, device=dev)).view(n, 1, 1, size)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    chans = torch.arange(c, device=dev).view(1, c, 1, 1)
    crops = images[batch, chans, rows, cols]  # (N, C, size, size)
    factor = contrast.to(device=dev, dtype=images.dtype).view(n, 1, 1, 1)
    shift = brightness.to(device=dev, dtype=images.dtype).view(n, 1, 1, 1)
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    return (crops - mean) * factor + mean + shift


def random_crop_brightness_contrast(
    images: Tensor,
    size: int = 32,
    *,
    max_brightness: float = 0.25,
    contrast: tuple[float, float] = (0.5, 1.5),
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The paper's training augmentation: a random crop, random brightness and contrast.

    Per image: a uniformly random ``size`` x ``size`` window; then
    :math:`x \leftarrow (x - \bar{x})\, c + \bar{x} + b` with :math:`\bar{x}` the crop's mean,
    contrast :math:`c \sim U(\text{contrast})` and brightness :math:`b \sim U(-\beta, \beta)`,
    :math:`\beta` = ``max_brightness`` (the same for both cameras of a pair). The paper names
    the operations but not their ranges: the defaults (a shift of up to 0.25 and a contrast
    factor of 0.5 to 1.5, for standardised images) are torchcaps' choice. Batched, on the
    images' device; deterministic given ``generator`` (on that device). The parameters are
    drawn by :func:`random_crop_parameters` and applied by :func:`crop_brightness_contrast`.

    Shape:
        - images: :math:`(N, C, H, W)`, float.
        - Output: :math:`(N, C, \text{size}, \text{size})`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import random_crop_brightness_contrast
        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop_brightness_contrast(torch.rand(5, 2, 48, 48), generator=g).shape
        torch.Size([5, 2, 32, 32])
    """
    size = _check_float_crop(images, size, "random_crop_brightness_contrast")
    n, _, h, w = images.shape
    params = random_crop_parameters(
        n,
        (h, w),
        size,
        max_brightness=max_brightness,
        contrast=contrast,
        generator=generator,
        device=images.device,
    )
    return crop_brightness_contrast(images, *params, size=size)


def random_crop_parameters(
    n: int,
    image_size: tuple[int, int],
    size: int = 32,
    *,
    max_brightness: float = 0.25,
    contrast: tuple[float, float] = (0.5, 1.5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Draw ``(top, left, contrast, brightness)`` of :func:`random_crop_brightness_contrast`.

    For ``n`` images of ``image_size`` ``(H, W)``: ``top`` uniform in ``0..H - size``,
    ``left`` in ``0..W - size`` (int64), contrast uniform in ``contrast``, brightness uniform
    in ``[-max_brightness, max_brightness]`` (float32), in that order from ``generator``.

    Shape:
        - Output: four tensors of shape :math:`(n,)`.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import random_crop_parameters
        >>> g = torch.Generator().manual_seed(0)
        >>> top, left, c, b = random_crop_parameters(3, (48, 48), 32, generator=g)
        >>> bool(((top >= 0) & (top <= 16)).all()), bool(((c >= 0.5) & (c <= 1.5)).all())
        (True, True)
    """
    owner = "random_crop_parameters"
    n = check_int("n", n, minimum=0, owner=owner)
    size = check_int("size", size, owner=owner)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
    ):
        raise TypeError(f"{owner}: image_size must be a pair of ints (H, W), got {image_size!r}")
    h, w = image_size
    if size > min(h, w):
        raise ValueError(f"{owner}: size {size} is larger than the images, {h}x{w}")
    low, high = contrast
    if not 0 <= low <= high or max_brightness < 0:
        raise ValueError(
            f"{owner}: contrast must be a range 0 <= low <= high and max_brightness >= 0, "
            f"got contrast={contrast}, max_brightness={max_brightness}"
        )
    top = torch.randint(0, h - size + 1, (n,), device=device, generator=generator)
    left = torch.randint(0, w - size + 1, (n,), device=device, generator=generator)
    u = torch.rand(n, 2, device=device, generator=generator)
    return top, left, low + (high - low) * u[:, 0], max_brightness * (2 * u[:, 1] - 1)


def preprocess_smallnorb(
    images: Tensor,
    train: bool,
    *,
    size: int = 32,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The paper's preprocessing of a batch of smallNORB images.

    Downsample to 48x48 (:func:`smallnorb_downsample`), standardise each image
    (:func:`standardize_images`), then a random ``size`` x ``size`` crop with random brightness
    and contrast in training (:func:`random_crop_brightness_contrast`) or the centre crop at
    test (:func:`center_crop`).

    Shape:
        - images: :math:`(N, 2, 96, 96)` (uint8 or float in [0, 1]).
        - Output: :math:`(N, 2, \text{size}, \text{size})`, float32.

    Examples:
        >>> import torch
        >>> from torchcaps.datasets import preprocess_smallnorb
        >>> x = torch.randint(0, 256, (4, 2, 96, 96), dtype=torch.uint8)
        >>> preprocess_smallnorb(x, train=True).shape, preprocess_smallnorb(x, train=False).shape
        (torch.Size([4, 2, 32, 32]), torch.Size([4, 2, 32, 32]))
    """
    x = standardize_images(smallnorb_downsample(images, 48))
    if train:
        return random_crop_brightness_contrast(x, size, generator=generator)
    return center_crop(x, size)
