"""Datasets and their preprocessing, in torch only (no torchvision needed).

- :class:`SmallNORB`: a reader of the official smallNORB binary matrix files, with the
  preprocessing of Hinton et al. (2018): :func:`smallnorb_downsample`,
  :func:`standardize_images`, :func:`random_crop_brightness_contrast` (training) and
  :func:`center_crop` (testing), composed by :func:`preprocess_smallnorb`; the random crop's
  parameters drawn by :func:`random_crop_parameters` and applied by
  :func:`crop_brightness_contrast`.
- MultiMNIST (Sabour et al. 2017): :class:`MultiMNIST` (a fixed, indexable set of pairs),
  :class:`MultiMNISTBatches` and :func:`multimnist_batch` (fresh pairs for training) and
  :func:`overlay_pairs` (the composition they use), returning :class:`MultiMNISTSample`.
- An affNIST-style test set (it is not affNIST): :func:`affine_mnist`, returning
  :class:`AffineMNIST`.
- Shifts: :func:`random_shift` (the CapsNet paper's augmentation), its offsets
  (:func:`random_shift_offsets`), :func:`translate`, :func:`content_margins` (how far each
  image can move without cutting its content), and :func:`pad_to_canvas` (digits centred on
  a larger canvas).

The generators take images as float tensors in [0, 1] of shape (N, 1, H, W), or (N, H, W), or
uint8 (scaled to [0, 1]).
"""

from torchcaps.datasets.affine import AffineMNIST, affine_mnist
from torchcaps.datasets.multimnist import (
    MultiMNIST,
    MultiMNISTBatches,
    MultiMNISTSample,
    multimnist_batch,
    overlay_pairs,
)
from torchcaps.datasets.shift import (
    content_margins,
    pad_to_canvas,
    random_shift,
    random_shift_offsets,
    translate,
)
from torchcaps.datasets.smallnorb import (
    SMALLNORB_CLASSES,
    SmallNORB,
    center_crop,
    crop_brightness_contrast,
    preprocess_smallnorb,
    random_crop_brightness_contrast,
    random_crop_parameters,
    read_norb_matrix,
    smallnorb_downsample,
    standardize_images,
)

__all__ = [
    "SMALLNORB_CLASSES",
    "AffineMNIST",
    "MultiMNIST",
    "MultiMNISTBatches",
    "MultiMNISTSample",
    "SmallNORB",
    "affine_mnist",
    "center_crop",
    "content_margins",
    "crop_brightness_contrast",
    "multimnist_batch",
    "overlay_pairs",
    "pad_to_canvas",
    "preprocess_smallnorb",
    "random_crop_brightness_contrast",
    "random_crop_parameters",
    "random_shift",
    "random_shift_offsets",
    "read_norb_matrix",
    "smallnorb_downsample",
    "standardize_images",
    "translate",
]
