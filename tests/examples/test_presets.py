"""examples/presets.py: the augmentation and the capsule loss of the recipes."""

from __future__ import annotations

import torch

import presets
from torchcaps.functional import margin_loss, reconstruction_loss
from torchcaps.models import CapsuleOutput


def test_random_shift_is_a_per_sample_shift() -> None:
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    shifted = presets.random_shift(images, 2, g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[k, dy : dy + 28, dx : dx + 28], shifted[k])
        ]
        assert len(matches) == 1  # a window of the zero-padded image: a shift of at most 2
        seen.add(matches[0])
    assert len(seen) > 10  # offsets drawn independently per sample


def test_random_shift_shards_draw_the_global_batch_offsets() -> None:
    """Rank r of W shifts its shard exactly as a single process shifts the whole batch."""
    images = torch.randint(1, 256, (16, 28, 28), dtype=torch.uint8)
    whole = presets.random_shift(images, 2, torch.Generator().manual_seed(5))
    for world in (2, 4):
        per = 16 // world
        for rank in range(world):
            g = torch.Generator().manual_seed(5)
            shard = presets.random_shift(images[rank * per : (rank + 1) * per], 2, g, rank, world)
            assert torch.equal(shard, whole[rank * per : (rank + 1) * per])


def test_capsule_loss_is_margin_plus_weighted_reconstruction() -> None:
    scores, images = torch.rand(3, 10), torch.rand(3, 1, 28, 28)
    labels = torch.tensor([1, 4, 9])
    recon = torch.rand(3, 1, 28, 28)
    loss = presets.CapsuleLoss(0.01)(
        CapsuleOutput(scores, torch.rand(3, 10, 16), recon), images, labels
    )
    expected = margin_loss(scores, labels) + reconstruction_loss(recon, images, 0.01)
    torch.testing.assert_close(loss, expected)
    # without a decoder: the margin loss alone
    bare = presets.CapsuleLoss()(CapsuleOutput(scores, torch.rand(3, 10, 16), None), images, labels)
    torch.testing.assert_close(bare, margin_loss(scores, labels))
