"""Datasets and their preprocessing, in torch only (no torchvision needed).

- :class:`SmallNORB`: a reader of the official smallNORB binary matrix files, with the
  preprocessing of Hinton et al. (2018): :func:`smallnorb_downsample`,
  :func:`standardize_images`, :func:`random_crop_brightness_contrast` (training) and
  :func:`center_crop` (testing), composed by :func:`preprocess_smallnorb`; the random crop's
  parameters drawn by :func:`random_crop_parameters` and applied by
  :func:`crop_brightness_contrast`.
"""

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
