"""examples/augment.py: the batched augmentations against per-image loops written from their
definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import augment
from _helpers import bilinear_sample
from torchcaps.datasets import content_margins, random_shift


def test_random_shift_is_the_librarys_with_one_process() -> None:
    images = torch.rand(16, 1, 28, 28)
    ours = augment.random_shift(images, 2, torch.Generator().manual_seed(3))
    library = random_shift(images, 2, torch.Generator().manual_seed(3))
    assert torch.equal(ours, library)


def test_random_shift_shards_draw_the_global_batch_offsets() -> None:
    """Rank r of W shifts its shard exactly as a single process shifts the whole batch."""
    images = torch.randint(1, 256, (16, 28, 28), dtype=torch.uint8)
    whole = augment.random_shift(images, 2, torch.Generator().manual_seed(5))
    for world in (2, 4):
        per = 16 // world
        for rank in range(world):
            g = torch.Generator().manual_seed(5)
            shard = augment.random_shift(images[rank * per : (rank + 1) * per], 2, g, rank, world)
            assert torch.equal(shard, whole[rank * per : (rank + 1) * per])


def test_random_shift_keeps_the_channel_dimension() -> None:
    images = torch.rand(8, 1, 28, 28)
    shifted = augment.random_shift(images, 2, torch.Generator().manual_seed(1))
    flat = augment.random_shift(images[:, 0], 2, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape
    assert torch.equal(shifted[:, 0], flat)  # the same draw, the same shift


@pytest.mark.parametrize("shape", [(9, 9), (7, 11)])
def test_rotate_matches_the_inverse_map_of_each_output_pixel(shape: tuple[int, int]) -> None:
    h, w = shape
    images = torch.rand(3, 2, h, w, dtype=torch.float64)
    degrees = torch.tensor([0.0, 17.0, -90.0], dtype=torch.float64)
    out = augment.rotate(images, degrees)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    for k in range(3):
        t = math.radians(float(degrees[k]))
        for c in range(2):
            for y in range(h):
                for x in range(w):
                    px, py = x - cx, y - cy
                    sx = cx + math.cos(t) * px - math.sin(t) * py
                    sy = cy + math.sin(t) * px + math.cos(t) * py
                    expected = bilinear_sample(images[k, c], sx, sy)
                    assert float(out[k, c, y, x]) == pytest.approx(expected, abs=1e-9)


def test_rotate_by_90_degrees_is_counter_clockwise() -> None:
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    out = augment.rotate(images, torch.full((2,), 90.0, dtype=torch.float64))
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(2, 3)))


def test_shift_within_margins_never_cuts_the_content() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(64, 1, 28, 28)
    for k in range(64):  # a random box of content per image
        y0, x0 = torch.randint(0, 20, (2,), generator=g).tolist()
        images[k, 0, y0 : y0 + 8, x0 : x0 + 8] = torch.rand(8, 8, generator=g) + 0.1
    for amount in (torch.rand(2, 64, generator=g) * 0.9999, torch.full((2, 64), 0.9999)):
        forth = torch.rand(2, 64, generator=g) < 0.5
        out = augment.shift_within_margins(images, amount, forth)
        torch.testing.assert_close(out.sum((1, 2, 3)), images.sum((1, 2, 3)))  # nothing lost
    # the largest amount moves the content to the border it moves towards
    top, bottom, left, right = content_margins(out)
    assert torch.equal(torch.where(forth[0], bottom, top), torch.zeros(64, dtype=torch.long))
    assert torch.equal(torch.where(forth[1], right, left), torch.zeros(64, dtype=torch.long))


def test_squish_matches_a_per_image_resize_and_placement() -> None:
    images = torch.rand(5, 1, 10, 12)
    cut, offset = torch.tensor([0, 1, 3, 3, 2]), torch.tensor([0, 0, 1, 2, 1])
    out = augment.squish(images, cut, offset, max_cut=3)
    for k in range(5):
        c, o = int(cut[k]), int(offset[k])
        if c == 0:
            resized = images[k]
        else:
            resized = F.interpolate(
                images[k : k + 1], size=(10, 12 - c), mode="bilinear", antialias=True
            )[0]
        expected = torch.zeros(1, 10, 12)
        expected[:, :, o : o + resized.shape[-1]] = resized[:, :, : 12 - o]
        torch.testing.assert_close(out[k], expected)


def test_erase_zeroes_exactly_one_patch() -> None:
    images = torch.rand(3, 2, 12, 12) + 0.1
    top, left = torch.tensor([0, 4, 8]), torch.tensor([8, 4, 0])
    out = augment.erase(images, top, left, 4)
    for k in range(3):
        mask = torch.ones(12, 12)
        mask[int(top[k]) : int(top[k]) + 4, int(left[k]) : int(left[k]) + 4] = 0
        torch.testing.assert_close(out[k], images[k] * mask)


def test_efficient_capsnet_augment_is_seeded_in_range_and_sharded_like_one_process() -> None:
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 6:22, 10:18] = torch.rand(8, 1, 16, 8)
    aug = augment.EfficientCapsNetAugment()
    whole = aug(images, torch.Generator().manual_seed(3))
    again = aug(images, torch.Generator().manual_seed(3))
    assert torch.equal(whole, again)
    assert whole.shape == images.shape and 0 <= whole.min() and whole.max() <= 1
    assert not torch.equal(whole, images)
    assert not torch.equal(whole, aug(images, torch.Generator().manual_seed(4)))
    for rank in range(2):
        shard = aug(images[rank * 4 : (rank + 1) * 4], torch.Generator().manual_seed(3), rank, 2)
        torch.testing.assert_close(shard, whole[rank * 4 : (rank + 1) * 4])


def test_shift_recipe_object() -> None:
    images = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(2)
    assert augment.Shift(0)(images, g) is images
    expected = augment.random_shift(images, 2, torch.Generator().manual_seed(2))
    assert torch.equal(augment.Shift(2)(images, g), expected)
