"""Datasets and their preprocessing, in torch only (no torchvision needed).

- :class:`SmallNORB`: a reader of the official smallNORB binary matrix files, with the
  preprocessing of Hinton et al. (2018): :func:`smallnorb_downsample`,
  :func:`standardize_images`, :func:`random_crop_brightness_contrast` (training) and
  :func:`center_crop` (testing), composed by :func:`preprocess_smallnorb`.
"""

from torchcaps.datasets.smallnorb import (
    SMALLNORB_CLASSES,
    SmallNORB,
    center_crop,
    preprocess_smallnorb,
    random_crop_brightness_contrast,
    read_norb_matrix,
    smallnorb_downsample,
    standardize_images,
)

__all__ = [
    "SMALLNORB_CLASSES",
    "SmallNORB",
    "center_crop",
    "preprocess_smallnorb",
    "random_crop_brightness_contrast",
    "read_norb_matrix",
    "smallnorb_downsample",
    "standardize_images",
]
