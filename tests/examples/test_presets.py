"""examples/presets.py: the capsule loss of the recipes."""

from __future__ import annotations

import torch

import presets
from torchcaps.functional import margin_loss, reconstruction_loss
from torchcaps.models import CapsuleOutput


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
