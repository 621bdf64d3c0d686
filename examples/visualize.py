"""Draw the figures of Sabour, Frosst & Hinton (2017) from a checkpoint of ``mnist_capsnet.py``.

    python examples/visualize.py --checkpoint runs/mnist_capsnet/best.pt
    python examples/visualize.py --checkpoint runs/mnist_capsnet/best.pt \\
        --data-dir data --figures reconstructions coupling --index 7 --prefer-misclassified

Writes PNG files (matplotlib's Agg renderer, no display needed) into ``--out-dir`` (default: the
checkpoint's folder):

==================== ================================================== ======================
file                 content                                            size (pixels, W x H)
==================== ================================================== ======================
reconstructions.png  Figure 3: test digits above their reconstructions  ``100*C x (50+200*R)``
                     from the predicted capsule; misclassified digits   C = min(columns, n),
                     framed and labelled in red                         R = ceil(n / C);
                                                                        800 x 450 for the
                                                                        default 16 digits
perturbations.png    Figure 4: one panel per chosen digit (one          ``400*C x (50+590*R)``
                     combined figure); row d = DigitCaps dimension d,   C = min(5, n),
                     column = perturbation -0.25 ... 0.25 (step 0.05)   R = ceil(n / 5);
                                                                        2000 x 1230 for all 10
                                                                        digits, 400 x 640 for
                                                                        ``--digit K``
coupling.png         coupling coefficients c (1152 x 10) of one input:  1100 x 740
                     per digit j the 6x6 map of c averaged over the 32
                     primary capsule types, and c as 32 types x 36
                     positions; the input and the capsule lengths
curves.png           test accuracy and train/test loss per epoch from   1000 x 400
                     ``metrics.jsonl``
multimnist.png       Figure 5, for a checkpoint of                      as reconstructions.png
                     ``multimnist_capsnet.py``: MultiMNIST test pairs
                     above the two digits reconstructed from their own
                     capsules (red: first, green: second); wrong pairs
                     framed in red
==================== ================================================== ======================

Options: ``--figures`` selects a subset (space or comma separated; default all that the
checkpoint's model can draw: the first four for an MNIST model, multimnist.png and curves.png
for ``capsnet_multimnist``); ``--num-digits N`` / ``--columns N`` shape reconstructions.png and
multimnist.png; ``--prefer-misclassified`` shapes reconstructions.png (the
last reserves up to half of the grid for the first misclassified digits); ``--digit K`` draws
perturbations.png for class K only (default: one panel per class, each from the first correctly
classified test digit of that class); ``--index I`` picks the input of coupling.png;
``--metrics PATH`` the ``metrics.jsonl`` of curves.png (default: beside the checkpoint);
``--max-samples N`` uses only the first N test digits; ``--device`` runs the model on the CPU or a
GPU. All figures are drawn at 100 dpi with fixed sizes (no tight bounding box), so the pixel
sizes above are exact. Exit status: 0 when figures were written, 1 when none could be drawn, 2 on
errors (unreadable checkpoint, missing data, index out of range).

The test digits come from the full MNIST test set (``--data-dir DIR``, torchvision layout
``DIR/MNIST/raw``) or, by default, from the embedded 1,000-digit sample; both are read with the
training example's own loaders. A model trained with ``--no-reconstruction`` has no decoder: its
reconstruction figures are skipped with a message. The plotting functions
(:func:`plot_reconstructions`, :func:`plot_perturbations`, :func:`plot_coupling`,
:func:`plot_curves`, :func:`plot_multimnist`) can be called directly on any ``CapsNet`` of the
examples. The MultiMNIST pairs are the example's fixed test pairs (``MultiMNIST`` with seed 0
over the test digits), the first ``--num-digits``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

import loaders
import runtime
from engine import accuracy_series, to_input
from torchcaps.datasets import MultiMNIST

DPI = 100  # 1 inch = 100 pixels; every layout below is given in pixels.
FIGURES = ("reconstructions", "perturbations", "coupling", "curves", "multimnist")
# The figures of a single-digit (MNIST) model; a MultiMNIST one draws "multimnist" instead.
MNIST_FIGURES = ("reconstructions", "perturbations", "coupling")
MULTIMNIST_MODEL = "capsnet_multimnist"
# Figure 4 of the paper: each dimension shifted by -0.25, -0.20, ..., 0.25 (11 values).
PERTURBATIONS = tuple(round(-0.25 + 0.05 * k, 2) for k in range(11))
COUPLING_SIZE = (1100, 740)
CURVES_SIZE = (1000, 400)
WRONG = "#d62728"  # the marker colour of misclassified digits
GAP_CMAP = colormaps["gray"].with_extremes(bad="#8fb3d9")  # tile separators in light blue
COUPLING_CMAP = colormaps["RdBu_r"]


class VisualizeError(RuntimeError):
    """A figure cannot be drawn from the given inputs (the CLI reports it and exits with 2)."""


# --------------------------------------------------------------------------------------------
# Figure sizes and layout
# --------------------------------------------------------------------------------------------
def reconstructions_size(num_digits: int, columns: int = 8) -> tuple[int, int]:
    """Pixel size (width, height) of :func:`plot_reconstructions` for ``num_digits`` digits."""
    cols = min(columns, num_digits)
    rows = math.ceil(num_digits / cols)
    return 100 * cols, 50 + 200 * rows


def perturbations_size(num_digits: int) -> tuple[int, int]:
    """Pixel size (width, height) of :func:`plot_perturbations` with ``num_digits`` panels."""
    cols = min(5, num_digits)
    rows = math.ceil(num_digits / 5)
    return 400 * cols, 50 + 590 * rows


class _Canvas:
    """A figure of an exact pixel size whose axes and texts are placed in pixels from top-left."""

    def __init__(self, width: int, height: int) -> None:
        # Agg truncates width * dpi to an int: half a pixel of headroom so none is ever lost.
        self.width, self.height = width + 0.5, height + 0.5
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        FigureCanvasAgg(self.fig)

    def axes(self, left: float, top: float, width: float, height: float) -> Any:
        rect = (
            left / self.width,
            1 - (top + height) / self.height,
            width / self.width,
            height / self.height,
        )
        return self.fig.add_axes(rect)

    def text(self, left: float, top: float, s: str, **kwargs: Any) -> Any:
        kwargs.setdefault("va", "top")
        return self.fig.text(left / self.width, 1 - top / self.height, s, **kwargs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fig.savefig(path, dpi=DPI, format="png")
        return path


def _image_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def as_input(images: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Make a float batch (B, 1, 28, 28) in [0, 1] of MNIST images.

    Accepts uint8 images (B, 28, 28) (as the example's loaders return them, converted with its
    ``to_input``) or float images (B, 28, 28) / (B, 1, 28, 28) already in [0, 1]; a single
    image (28, 28) becomes a batch of one.
    """
    if images.dtype == torch.uint8:
        if images.dim() == 2:
            images = images.unsqueeze(0)
        elif images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        x = to_input(images, torch.contiguous_format)
    else:
        x = images.float()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(
            f"expected images of shape (B, 28, 28) or (B, 1, 28, 28), got {tuple(images.shape)}"
        )
    return x.to(device) if device is not None else x


def has_decoder(model: nn.Module) -> bool:
    """Whether the CapsNet was built with the reconstruction decoder."""
    return getattr(model, "decoder", None) is not None


def _require_decoder(model: nn.Module, figure: str) -> nn.Module:
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise VisualizeError(
            f"{figure} needs the reconstruction decoder, but the model was trained without "
            "reconstruction (--no-reconstruction)"
        )
    return decoder


def capsules(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run conv1 -> primary -> digits of the example's CapsNet on a float batch ``x``.

    Returns the primary capsules (B, 32, 6, 6, 8), the digit capsules (B, 10, 16) and the
    coupling coefficients (B, 1152, 10) of the last routing round.
    """
    u = model.primary(F.relu(model.conv1(x)))
    v, c = model.digits(u, return_coupling=True)
    return u, v, c


def predict(model: nn.Module, images: Tensor, batch_size: int = 250, device: Any = None) -> Tensor:
    """Predicted class (the longest digit capsule) of every image, on the CPU."""
    device = _device_of(model) if device is None else device
    out = []
    with _evaluating(model):
        for s in range(0, images.shape[0], batch_size):
            scores = model(as_input(images[s : s + batch_size], device)).scores
            out.append(scores.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class LazyPredictions:
    """Predictions of a dataset, computed batch by batch only as far as they are needed."""

    def __init__(
        self, model: nn.Module, images: Tensor, batch_size: int = 250, device: Any = None
    ) -> None:
        self.model, self.images, self.batch_size, self.device = model, images, batch_size, device
        self.pred = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def upto(self, end: int) -> Tensor:
        """Predictions of the images ``[0, end)``."""
        end = min(end, len(self))
        while self.pred.shape[0] < end:
            s = self.pred.shape[0]
            chunk = predict(
                self.model, self.images[s : s + self.batch_size], self.batch_size, self.device
            )
            self.pred = torch.cat([self.pred, chunk])
        return self.pred[:end]

    def chunks(self) -> Iterator[Tensor]:
        """Yield the growing prefix of predictions, one batch further each time."""
        for end in range(self.batch_size, len(self) + self.batch_size, self.batch_size):
            yield self.upto(end)


def select_reconstructions(
    predictions: LazyPredictions, labels: Tensor, num: int, prefer_misclassified: bool = False
) -> list[int]:
    """Indices of the digits of :func:`plot_reconstructions`, in test-set order.

    The first ``num`` digits; with ``prefer_misclassified``, up to half of them (rounded up) are
    the first misclassified digits of the set and the rest are the first other digits.
    """
    num = min(num, len(labels))
    if not prefer_misclassified:
        return list(range(num))
    want = (num + 1) // 2
    wrong: list[int] = []
    for pred in predictions.chunks():
        wrong = (pred != labels[: pred.shape[0]]).nonzero().flatten().tolist()
        if len(wrong) >= want:
            break
    chosen = set(wrong[:want])
    rest = [i for i in range(len(labels)) if i not in chosen][: num - len(chosen)]
    return sorted(chosen.union(rest))


def select_per_class(
    predictions: LazyPredictions, labels: Tensor, classes: Sequence[int]
) -> dict[int, int]:
    """For each class the first correctly classified digit (else its first digit, if any)."""
    found: dict[int, int] = {}
    for pred in predictions.chunks():
        hits = pred == labels[: pred.shape[0]]
        for k in classes:
            if k not in found:
                idx = ((labels[: pred.shape[0]] == k) & hits).nonzero().flatten()
                if idx.numel():
                    found[k] = int(idx[0])
        if len(found) == len(classes):
            break
    for k in classes:
        if k not in found:
            idx = (labels == k).nonzero().flatten()
            if idx.numel():
                found[k] = int(idx[0])
    return {k: found[k] for k in classes if k in found}


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def plot_reconstructions(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    columns: int = 8,
    device: Any = None,
) -> Path:
    """Figure 3 of the paper: each input above its reconstruction, masked by the prediction.

    Every digit gets a cell of 100 x 200 pixels titled "pred P / true T"; misclassified digits
    are framed and titled in red. The figure is ``100 * C`` x ``50 + 200 * R`` pixels for
    ``C = min(columns, n)`` columns and ``R = ceil(n / C)`` rows (see
    :func:`reconstructions_size`): 800 x 450 for 16 digits in 8 columns.

    Args:
        model: a ``CapsNet`` of the example, with its decoder.
        images: the digits, uint8 (n, 28, 28) or float in [0, 1] (n, 1, 28, 28).
        labels: their true classes (n,).
        path: the PNG file to write.
        columns: digits per row.
        device: where to run the model (default: the model's device).

    Returns:
        ``path``.
    """
    _require_decoder(model, "plot_reconstructions")
    n = int(images.shape[0])
    if n < 1 or labels.shape != (n,):
        raise ValueError(
            f"expected n >= 1 images and labels of shape (n,), got images "
            f"{tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    device = _device_of(model) if device is None else device
    x = as_input(images, device)
    with _evaluating(model):
        out = model(x)  # the decoder masks with the longest capsule: the prediction
    recon = out.reconstruction
    pred = out.scores.argmax(dim=1).cpu()
    inputs = x[:, 0].float().cpu().numpy()
    outputs = recon[:, 0].float().cpu().numpy()
    labels = labels.cpu()

    width, height = reconstructions_size(n, columns)
    canvas = _Canvas(width, height)
    errors = int((pred != labels).sum())
    cols = min(columns, n)
    if cols >= 6:  # 600 pixels or more: the long header
        lines = [
            f"Reconstructions (Sabour et al. 2017, Fig. 3): {errors} of {n} misclassified (red)",
            "top: input; below: its reconstruction from the predicted capsule",
        ]
    elif cols >= 4:
        lines = [
            f"Reconstructions (Fig. 3): {errors}/{n} misclassified (red)",
            "top: input; below: reconstruction",
        ]
    elif cols == 3:
        lines = [f"Fig. 3: {errors}/{n} wrong (red)", "top: input; below: reconstruction"]
    else:
        lines = [f"{errors}/{n} wrong (red)", "top: input"]
    canvas.text(6, 6, lines[0], fontsize=8 if cols >= 3 else 7, weight="bold")
    canvas.text(6, 26, lines[1], fontsize=7)
    for k in range(n):
        title = f"pred {int(pred[k])} / true {int(labels[k])}"
        _image_cell(canvas, k, cols, (inputs[k], outputs[k]), title, bool(pred[k] != labels[k]))
    return canvas.save(path)


def _image_cell(
    canvas: _Canvas, k: int, cols: int, images: tuple[Any, Any], title: str, wrong: bool
) -> None:
    """Cell ``k`` of a 100 x 200 pixel grid: two 80 x 80 images, titled, framed red if wrong.

    An image with a trailing axis of 3 is drawn as RGB, any other in grey over [0, 1].
    """
    x0, y0 = 100 * (k % cols), 50 + 200 * (k // cols)
    color = WRONG if wrong else "0.6"
    for row, img in enumerate(images):
        ax = canvas.axes(x0 + 10, y0 + 20 + 86 * row, 80, 80)
        if img.ndim == 3:
            ax.imshow(img, interpolation="nearest")
        else:
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        _image_axes(ax)
        for spine in ax.spines.values():
            spine.set_color(color)
            spine.set_linewidth(3.0 if wrong else 0.8)
        if row == 0:
            ax.set_title(
                title,
                fontsize=8,
                pad=3,
                color=WRONG if wrong else "black",
                weight="bold" if wrong else "normal",
            )


def plot_multimnist(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    columns: int = 8,
    device: Any = None,
) -> Path:
    """Figure 5 of the paper: overlapping digit pairs and each digit rebuilt from its capsule.

    For each MultiMNIST image the two longest capsules are the prediction, and the decoder
    reconstructs each of the two digits from its own capsule (``model.decoder(capsules,
    classes)`` with the two classes). Top: the input; below: the two reconstructions overlaid,
    the first in red, the second in green (yellow where they overlap). The title "L:(a,b)
    R:(p,q)" gives the true labels and the pair reconstructed; pairs whose predicted set differs
    from the true one are framed and titled in red. Same layout and pixel size as
    :func:`plot_reconstructions` (:func:`reconstructions_size`).

    Args:
        model: a ``capsnet_multimnist`` CapsNet (36x36 inputs), with its decoder.
        images: the composites, float in [0, 1] (n, 1, H, W).
        labels: the two true classes of each composite (n, 2).
        path: the PNG file to write.
        columns: pairs per row.
        device: where to run the model (default: the model's device).

    Returns:
        ``path``.
    """
    decoder = _require_decoder(model, "plot_multimnist")
    n = int(images.shape[0])
    if n < 1 or images.dim() != 4 or images.shape[1] != 1 or labels.shape != (n, 2):
        raise ValueError(
            f"expected images (n, 1, H, W) with n >= 1 and labels (n, 2), got images "
            f"{tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    device = _device_of(model) if device is None else device
    x = images.float().to(device)
    with _evaluating(model):
        out = model(x)
        pairs = out.scores.topk(2, dim=1).indices  # (n, 2), the longer capsule first
        recon = decoder(out.capsules, pairs)  # (n, 2, 1, H, W)
    inputs = x[:, 0].cpu().numpy()
    both = recon[:, :, 0].float().clamp(0, 1).cpu().numpy()  # (n, 2, H, W)
    overlay = np.stack([both[:, 0], both[:, 1], np.zeros_like(both[:, 0])], axis=-1)
    pairs, labels = pairs.cpu(), labels.cpu()
    wrong = [{int(a) for a in pairs[k]} != {int(a) for a in labels[k]} for k in range(n)]
    width, height = reconstructions_size(n, columns)
    canvas = _Canvas(width, height)
    cols = min(columns, n)
    errors = sum(wrong)
    head = (
        f"MultiMNIST (Sabour et al. 2017, Fig. 5): {errors} of {n} pairs wrong (red)"
        if cols >= 6
        else f"Fig. 5: {errors}/{n} wrong (red)"
    )
    canvas.text(6, 6, head, fontsize=8 if cols >= 3 else 7, weight="bold")
    canvas.text(6, 26, "top: input; below: red = 1st, green = 2nd capsule", fontsize=7)
    for k in range(n):
        a, b = (int(v) for v in labels[k])
        p, q = (int(v) for v in pairs[k])
        _image_cell(canvas, k, cols, (inputs[k], overlay[k]), f"L:({a},{b}) R:({p},{q})", wrong[k])
    return canvas.save(path)


def perturbed_reconstructions(
    model: nn.Module,
    image: Tensor,
    digit: int,
    steps: Sequence[float] = PERTURBATIONS,
    device: Any = None,
) -> Tensor:
    """Reconstructions of one image with each DigitCaps dimension of capsule ``digit`` shifted.

    Returns a tensor (16, len(steps), 28, 28): entry ``[d, s]`` decodes the capsules of
    ``image`` with dimension ``d`` of capsule ``digit`` changed by ``steps[s]``, masked to that
    capsule.
    """
    decoder = _require_decoder(model, "plot_perturbations")
    device = _device_of(model) if device is None else device
    x = as_input(image, device)[:1]
    with _evaluating(model):
        _, v, _ = capsules(model, x)
        dims = v.shape[-1]
        delta = torch.tensor(steps, dtype=v.dtype, device=v.device)
        batch = v[0].expand(dims, len(steps), *v.shape[1:]).clone()  # (16, S, 10, 16)
        eye = torch.eye(dims, dtype=v.dtype, device=v.device)  # dimension d of row d
        batch[:, :, digit, :] += delta.view(1, -1, 1) * eye.view(dims, 1, dims)
        flat = batch.flatten(0, 1)
        target = torch.full((flat.shape[0],), digit, dtype=torch.long, device=v.device)
        out = decoder(flat, target)
    return out.view(dims, len(steps), *out.shape[-2:]).float().cpu()


def _mosaic(tiles: Tensor, gap: int = 2) -> np.ndarray:
    """(R, C, h, w) tiles -> one (R*(h+gap)-gap, C*(w+gap)-gap) array, gaps as NaN."""
    r, c, h, w = tiles.shape
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(r):
        top = i * (h + gap)
        for j in range(c):
            left = j * (w + gap)
            out[top : top + h, left : left + w] = tiles[i, j].numpy()
    return out


def plot_perturbations(
    model: nn.Module,
    images: Tensor,
    digits: Sequence[int],
    path: str | Path,
    *,
    indices: Sequence[int] | None = None,
    steps: Sequence[float] = PERTURBATIONS,
    device: Any = None,
) -> Path:
    """Figure 4 of the paper: what each of the 16 DigitCaps dimensions encodes.

    One combined figure with a panel per digit (5 panels per row): panel ``k`` perturbs capsule
    ``digits[k]`` of ``images[k]``; its row ``d`` shows the reconstructions with dimension ``d``
    shifted by each value of ``steps`` (by default -0.25 ... 0.25 in steps of 0.05, the
    unperturbed reconstruction in the middle column). A panel whose digit is not the model's
    prediction is titled in red; the input digit is shown at each panel's top left. The
    figure is ``400 * C`` x ``50 + 590 * R`` pixels for ``C = min(5, n)``, ``R = ceil(n / 5)``
    (see :func:`perturbations_size`): 2000 x 1230 for ten digits, 400 x 640 for one.

    Args:
        model: a ``CapsNet`` of the example, with its decoder.
        images: one image per panel, uint8 (n, 28, 28) or float (n, 1, 28, 28).
        digits: the capsule (class) to perturb and decode in each panel.
        path: the PNG file to write.
        indices: test-set indices of the images, shown in the panel titles.
        steps: the perturbations added to each dimension.
        device: where to run the model (default: the model's device).

    Returns:
        ``path``.
    """
    _require_decoder(model, "plot_perturbations")
    n = len(digits)
    if n < 1 or images.shape[0] != n:
        raise ValueError(
            f"expected one image per digit (n >= 1), got {images.shape[0]} images for {n} digits"
        )
    device = _device_of(model) if device is None else device
    pred = predict(model, images, device=device)
    width, height = perturbations_size(n)
    canvas = _Canvas(width, height)
    canvas.text(
        6,
        4,
        "Dimension perturbations (Sabour et al. 2017, Fig. 4)"
        if n > 1
        else "Dimension perturbations (Fig. 4)",
        fontsize=9,
        weight="bold",
    )
    canvas.text(
        6,
        22,
        "row d: DigitCaps dimension d of the digit's capsule shifted by the column's value, "
        "then decoded",
        fontsize=7,
        wrap=True,
    )
    step_labels = [f"{s:+.2f}".replace("+0.00", "0") for s in steps]
    for k, digit in enumerate(digits):
        digit = int(digit)
        tiles = perturbed_reconstructions(model, images[k], digit, steps, device)
        mosaic = _mosaic(tiles)
        x0, y0 = 400 * (k % 5), 50 + 590 * (k // 5)
        wrong = int(pred[k]) != digit
        title = f"digit {digit}"
        if indices is not None:
            title += f" (test #{indices[k]})"
        if wrong:
            title += f", predicted {int(pred[k])}"
        canvas.text(
            x0 + 55 + 165,
            y0 + 8,
            title,
            fontsize=9,
            ha="center",
            color=WRONG if wrong else "black",
            weight="bold",
        )
        thumb = canvas.axes(x0 + 12, y0 + 2, 30, 30)  # the input digit, top left of the panel
        thumb.imshow(as_input(images[k : k + 1])[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        _image_axes(thumb)
        ax = canvas.axes(x0 + 55, y0 + 35, 330, 480)
        ax.imshow(mosaic, cmap=GAP_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        pitch = tiles.shape[-1] + 2
        centers = [pitch * j + tiles.shape[-1] / 2 - 0.5 for j in range(len(steps))]
        ax.set_xticks(centers, step_labels, fontsize=6, rotation=90)
        ax.set_yticks(
            [pitch * d + tiles.shape[-2] / 2 - 0.5 for d in range(tiles.shape[0])],
            [str(d) for d in range(tiles.shape[0])],
            fontsize=6,
        )
        ax.tick_params(length=2, pad=1)
        ax.set_xlabel("perturbation", fontsize=7, labelpad=2)
        ax.set_ylabel("DigitCaps dimension", fontsize=7, labelpad=2)
        if 0.0 in steps:  # frame the unperturbed column
            j = list(steps).index(0.0)
            ax.add_patch(
                Rectangle(
                    (pitch * j - 1.5, -1.5),
                    tiles.shape[-1] + 2,
                    mosaic.shape[0] + 2,
                    fill=False,
                    edgecolor="#ff7f0e",
                    linewidth=1.0,
                    clip_on=False,
                )
            )
    return canvas.save(path)


def plot_coupling(
    model: nn.Module,
    image: Tensor,
    label: int | None,
    path: str | Path,
    *,
    index: int | None = None,
    device: Any = None,
) -> Path:
    r"""The coupling coefficients :math:`c_{ij}` (1152 x 10) of one input, 1100 x 740 pixels.

    Primary capsule :math:`i` is one of 32 types at one of 6 x 6 positions; :math:`c_{ij}` is
    the share of its prediction routed to digit :math:`j` (each row of 10 sums to 1; uniform
    0.1 before routing, and exactly uniform with one routing iteration). Left: the input and
    the 10 digit capsules' lengths. Right, per digit :math:`j`: on top the 6 x 6 map of
    :math:`c_{ij}` averaged over the 32 types (where in the image the parts routed to
    :math:`j` sit), below the full 32 types x 36 positions (row-major over the 6 x 6 grid)
    of :math:`c_{ij}`. The colour scales are centred on the uniform :math:`1/10` (white): red
    routes more than uniform, blue less. The predicted digit's title is bold blue, the true
    digit's marked.

    Args:
        model: a ``CapsNet`` of the example (with or without decoder).
        image: one digit, uint8 (28, 28) or float (1, 28, 28) / (1, 1, 28, 28).
        label: its true class, or None.
        path: the PNG file to write.
        index: its test-set index, shown in the title.
        device: where to run the model (default: the model's device).

    Returns:
        ``path``.
    """
    device = _device_of(model) if device is None else device
    x = as_input(image, device)[:1]
    with _evaluating(model):
        u, v, c = capsules(model, x)
    types, gh, gw = u.shape[1:4]
    num_digits = v.shape[1]
    lengths = torch.linalg.vector_norm(v[0].float(), dim=-1).cpu()
    pred = int(lengths.argmax())
    grid = c[0].float().cpu().view(types, gh, gw, num_digits)  # (32, 6, 6, 10), i = t*36 + p
    spatial = grid.mean(dim=0)  # (6, 6, 10)
    blocks = grid.flatten(1, 2)  # (32, 36, 10)
    iterations = getattr(getattr(model.digits, "routing", None), "iterations", "?")

    canvas = _Canvas(*COUPLING_SIZE)
    what = "input" if index is None else f"test digit #{index}"
    canvas.text(
        8,
        6,
        f"Coupling coefficients c_ij of {what} ({types * gh * gw} primary capsules x "
        f"{num_digits} digit capsules, routing iterations r = {iterations})",
        fontsize=9,
        weight="bold",
    )
    canvas.text(
        8,
        26,
        f"per digit j: top, c averaged over the {types} primary capsule types at each of the "
        f"{gh}x{gw} positions; below, c per type (rows) x position (columns, row-major); "
        "red: more than uniform, blue: less",
        fontsize=7,
    )
    ax = canvas.axes(30, 80, 180, 180)
    ax.imshow(x[0, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    _image_axes(ax)
    truth = "" if label is None else f"true {int(label)}, "
    ax.set_title(
        f"{truth}pred {pred}",
        fontsize=9,
        color=WRONG if label is not None and int(label) != pred else "black",
    )
    ax = canvas.axes(50, 330, 150, 330)
    colors = ["#1f77b4" if j == pred else "0.6" for j in range(num_digits)]
    ax.barh(range(num_digits), lengths.numpy(), color=colors)
    for j, length in enumerate(lengths.tolist()):
        ax.text(length + 0.02, j, f"{length:.2f}", va="center", fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(num_digits - 0.5, -0.5)
    ax.set_yticks(range(num_digits), [str(j) for j in range(num_digits)], fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("capsule length |v_j|", fontsize=8)
    ax.set_ylabel("digit j", fontsize=8)

    uniform = 1.0 / num_digits
    norm_map = _uniform_norm(spatial, uniform)
    norm_block = _uniform_norm(blocks, uniform)
    per_row = 5
    im_map = im_block = None
    for j in range(num_digits):
        x0 = 250 + 150 * (j % per_row)
        y0 = 50 + 340 * (j // per_row)
        title = f"digit {j}"
        if label is not None and j == int(label):
            title += " (true)"
        is_pred = j == pred
        ax = canvas.axes(x0 + 15, y0 + 25, 120, 120)
        im_map = ax.imshow(
            spatial[:, :, j].numpy(), cmap=COUPLING_CMAP, norm=norm_map, interpolation="nearest"
        )
        ax.set_title(
            title,
            fontsize=8,
            pad=3,
            color="#1f77b4" if is_pred else "black",
            weight="bold" if is_pred else "normal",
        )
        _image_axes(ax)
        ax = canvas.axes(x0 + 15, y0 + 175, 120, 120)
        im_block = ax.imshow(
            blocks[:, :, j].numpy(),
            cmap=COUPLING_CMAP,
            norm=norm_block,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_xticks([0, gh * gw - 1], ["0", str(gh * gw - 1)], fontsize=6)
        ax.set_yticks([0, types - 1], ["0", str(types - 1)], fontsize=6)
        ax.tick_params(length=2, pad=1)
        if j % per_row == 0:
            ax.set_ylabel("type", fontsize=7, labelpad=0)
        ax.set_xlabel("position", fontsize=7, labelpad=0)
    cax = canvas.axes(1020, 75, 14, 270)
    canvas.fig.colorbar(im_map, cax=cax).set_label(
        f"mean of c over types (white: uniform 1/{num_digits})", fontsize=7
    )
    cax.tick_params(labelsize=6)
    cax = canvas.axes(1020, 415, 14, 270)
    canvas.fig.colorbar(im_block, cax=cax).set_label(
        f"c per type x position (white: uniform 1/{num_digits})", fontsize=7
    )
    cax.tick_params(labelsize=6)
    return canvas.save(path)


def _uniform_norm(values: Tensor, uniform: float) -> TwoSlopeNorm:
    """A colour norm centred on the uniform coupling, spanning the values' range."""
    low = min(float(values.min()), uniform * (1 - 1e-3))
    high = max(float(values.max()), uniform * (1 + 1e-3))
    return TwoSlopeNorm(vcenter=uniform, vmin=low, vmax=high)


def read_metrics(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl``, sorted by epoch (the last record of each).

    Lines that are not JSON objects with an ``epoch`` are skipped.
    """
    records: dict[int, dict[str, Any]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records[record["epoch"]] = record
    return [records[e] for e in sorted(records)]


def plot_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """Training curves from the example's ``metrics.jsonl``: 1000 x 400 pixels.

    Left: test accuracy (%) per epoch, with the last recorded and the best epoch named in the
    title ("last", not "final": the file of a stopped run ends before its schedule does), and
    the accuracy on a task's further test sets (:func:`engine.accuracy_series`) beside it.
    Right: train and test loss per epoch (log scale when all are positive), each the recipe's
    own (the title does not name its terms: they differ between recipes). The train loss is the
    mean over the epoch's steps (shifted, training-mode inputs), the test loss is measured after
    the epoch.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    records = read_metrics(metrics_path)
    if not records:
        raise VisualizeError(f"{metrics_path} holds no epoch records")
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:
        return [float(r.get(key, float("nan"))) for r in records]

    accuracies = accuracy_series(records)
    acc = accuracies["test"]
    canvas = _Canvas(*CURVES_SIZE)
    ax = canvas.axes(70, 45, 380, 300)
    ax.plot(epochs, acc, marker="o", markersize=3, color="#1f77b4", label="test")
    others = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")
    for k, (name, values) in enumerate(list(accuracies.items())[1:]):
        ax.plot(epochs, values, marker="s", markersize=3, label=name, color=others[k % 4])
    if len(accuracies) > 1:
        ax.legend(fontsize=8)
    finite = [(a, e) for a, e in zip(acc, epochs) if math.isfinite(a)]
    if finite:
        best_acc, best_epoch = max(finite, key=lambda t: (t[0], -t[1]))
        ax.plot([best_epoch], [best_acc], marker="*", markersize=10, color=WRONG, linestyle="")
        ax.set_title(
            f"test accuracy: last {acc[-1]:.2f}% (epoch {epochs[-1]}), "
            f"best {best_acc:.2f}% (epoch {best_epoch})",
            fontsize=9,
        )
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("test accuracy (%)", fontsize=9)

    ax2 = canvas.axes(580, 45, 380, 300)
    train, test = series("train_loss"), series("test_loss")
    ax2.plot(epochs, train, marker="o", markersize=3, label="train loss (mean over epoch)")
    ax2.plot(epochs, test, marker="s", markersize=3, label="test loss")
    values = [v for v in train + test if math.isfinite(v)]
    if values and min(values) > 0:
        ax2.set_yscale("log")
    ax2.set_title("train and test loss", fontsize=9)
    ax2.set_xlabel("epoch", fontsize=9)
    ax2.set_ylabel("loss", fontsize=9)
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.grid(True, alpha=0.3)
        a.tick_params(labelsize=8)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    return canvas.save(path)


# --------------------------------------------------------------------------------------------
# Checkpoints and data
# --------------------------------------------------------------------------------------------
def load_model(checkpoint: str | Path, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model (``runtime.load_model``); returns (model in eval mode, state).

    ``state`` holds the checkpoint's ``epoch``, ``args``, ``model_name`` and ``model_kwargs``.
    """
    model, state = runtime.load_model(Path(checkpoint), device)
    keys = ("epoch", "args", "model_name", "model_kwargs")
    return model, {k: state.get(k) for k in keys} | {"args": dict(state.get("args") or {})}


def load_test_set(data_dir: Path | None, log: Any = print) -> tuple[Tensor, Tensor, str]:
    """The MNIST test digits (uint8 (N, 28, 28), labels (N,)) and a description of the source.

    ``data_dir`` in torchvision layout (``data_dir/MNIST/raw/t10k-*-ubyte``); None: the
    embedded 1,000-digit sample.
    """
    data = loaders.load_mnist_test(data_dir, log)
    source = "embedded sample" if data_dir is None else data.source
    return data.test_images, data.test_labels, source


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _figures(value: str) -> list[str]:
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in FIGURES + ("all",):
            raise argparse.ArgumentTypeError(
                f"unknown figure {name!r}; choices: {', '.join(FIGURES + ('all',))}"
            )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Figures of Sabour et al. (2017) from a checkpoint of mnist_capsnet.py.",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="PATH",
        help="best.pt or last.pt of a mnist_capsnet.py run",
    )
    p.add_argument(
        "--data-dir",
        "--data_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="MNIST root in torchvision layout (<dir>/MNIST/raw/t10k-*); "
        "default: the embedded 1,000-digit test sample",
    )
    p.add_argument(
        "--out-dir",
        "--out_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write the PNG files (default: the checkpoint's folder)",
    )
    p.add_argument(
        "--figures",
        type=_figures,
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"figures to draw, space or comma separated: {', '.join(FIGURES)} or all "
        "(default: all)",
    )
    p.add_argument(
        "--num-digits",
        type=int,
        default=16,
        metavar="N",
        help="digits in reconstructions.png, pairs in multimnist.png (default: 16)",
    )
    p.add_argument(
        "--columns",
        type=int,
        default=8,
        metavar="N",
        help="digits per row in reconstructions.png (default: 8)",
    )
    p.add_argument(
        "--prefer-misclassified",
        action="store_true",
        help="reconstructions.png: up to half of the digits are the first misclassified ones",
    )
    p.add_argument(
        "--digit",
        type=int,
        default=None,
        metavar="K",
        help="perturbations.png: only this class (default: one panel per class 0-9)",
    )
    p.add_argument(
        "--index",
        type=int,
        default=0,
        metavar="I",
        help="coupling.png: test-set index of the input (default: 0)",
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=None,
        metavar="PATH",
        help="curves.png: the run's metrics.jsonl (default: beside the checkpoint)",
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N test digits (quick looks and tests)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=250,
        metavar="N",
        help="evaluation batch size (default: 250)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="'auto' (cuda if available, the default), 'cpu', 'cuda', 'cuda:1', ...",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name for group in args.figures or [["all"]] for name in group]
    args.figures = list(FIGURES) if "all" in names else [f for f in FIGURES if f in names]
    for name in ("num_digits", "columns", "batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.digit is not None and not 0 <= args.digit <= 9:
        parser.error(f"--digit must be in 0..9, got {args.digit}")
    if args.index < 0:
        parser.error(f"--index must be >= 0, got {args.index}")
    return args


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VisualizeError(f"--device {name}: CUDA is not available on this machine")
    return device


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG file's IHDR header."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Path]:
    """Draw the figures that ``args`` asks for; returns {figure name: PNG path written}."""
    device = _pick_device(args.device)
    model, info = load_model(args.checkpoint, device)
    out_dir: Path = args.out_dir or args.checkpoint.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"checkpoint {args.checkpoint}: epoch {info['epoch']}, routing "
        f"iterations {model.digits.routing.iterations}, "
        f"{'with' if has_decoder(model) else 'without'} decoder; device {device}"
    )
    written: dict[str, Path] = {}

    def done(name: str, path: Path) -> None:
        written[name] = path
        w, h = png_size(path)
        log(f"wrote {path} ({w} x {h} px)")

    wanted = list(args.figures)
    multimnist = info["model_name"] == MULTIMNIST_MODEL
    for name in MNIST_FIGURES if multimnist else ("multimnist",):
        if name in wanted:
            kind = "a MultiMNIST" if multimnist else "a single-digit"
            log(f"skipped {name}.png: not drawn for {kind} model ({info['model_name']})")
            wanted.remove(name)
    if not has_decoder(model):
        for name in ("reconstructions", "perturbations", "multimnist"):
            if name in wanted:
                log(
                    f"skipped {name}.png: the model was trained without reconstruction "
                    "(--no-reconstruction), so it has no decoder"
                )
                wanted.remove(name)

    if any(name in wanted for name in ("reconstructions", "perturbations", "coupling")):
        images, labels, _ = load_test_set(args.data_dir, log)
        if args.max_samples is not None:
            images, labels = images[: args.max_samples], labels[: args.max_samples]
        if "coupling" in wanted and args.index >= len(labels):
            raise VisualizeError(
                f"--index {args.index} is out of range: the test set has {len(labels)} digits"
            )
        predictions = LazyPredictions(model, images, args.batch_size, device)

        if "reconstructions" in wanted:
            idx = select_reconstructions(
                predictions, labels, args.num_digits, args.prefer_misclassified
            )
            if args.prefer_misclassified:
                seen = predictions.pred.shape[0]
                wrong = int((predictions.pred != labels[:seen]).sum())
                log(f"{wrong} misclassified among the first {seen} test digits")
            path = plot_reconstructions(
                model,
                images[idx],
                labels[idx],
                out_dir / "reconstructions.png",
                columns=args.columns,
                device=device,
            )
            done("reconstructions", path)
        if "perturbations" in wanted:
            classes = [args.digit] if args.digit is not None else list(range(10))
            chosen = select_per_class(predictions, labels, classes)
            missing = [k for k in classes if k not in chosen]
            if missing:
                log(f"perturbations.png: no test digit of class {missing} in the data")
            if chosen:
                idx = list(chosen.values())
                path = plot_perturbations(
                    model,
                    images[idx],
                    list(chosen),
                    out_dir / "perturbations.png",
                    indices=idx,
                    device=device,
                )
                done("perturbations", path)
        if "coupling" in wanted:
            path = plot_coupling(
                model,
                images[args.index],
                int(labels[args.index]),
                out_dir / "coupling.png",
                index=args.index,
                device=device,
            )
            done("coupling", path)

    if "multimnist" in wanted:
        images, labels, _ = load_test_set(args.data_dir, log)
        if args.max_samples is not None:
            images, labels = images[: args.max_samples], labels[: args.max_samples]
        # The example's fixed test pairs (MultiMNISTTask: seed 0), the first --num-digits.
        test_pairs = MultiMNIST(images, labels, canvas=36, max_shift=4, seed=0)
        pairs = test_pairs.batch(list(range(min(args.num_digits, len(test_pairs)))))
        path = plot_multimnist(
            model,
            pairs.image,
            pairs.labels,
            out_dir / "multimnist.png",
            columns=args.columns,
            device=device,
        )
        done("multimnist", path)

    if "curves" in wanted:
        metrics = args.metrics or args.checkpoint.resolve().parent / "metrics.jsonl"
        if metrics.is_file():
            done("curves", plot_curves(metrics, out_dir / "curves.png"))
        elif args.metrics is not None:
            raise VisualizeError(f"--metrics {metrics} does not exist")
        else:
            log(f"skipped curves.png: no metrics file at {metrics} (pass --metrics PATH)")

    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 on success, 1 when nothing was drawn, 2 on errors."""
    args = parse_args(argv)
    try:
        written = run(args)
    except (VisualizeError, runtime.CheckpointError, loaders.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not written:
        print("nothing was drawn", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
