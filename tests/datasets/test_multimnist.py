"""torchcaps.datasets.multimnist: the MultiMNIST generator's properties (distinct classes, each
component a shift of its source within max_shift, the clip, determinism, batched == item-wise),
on random digits (no MNIST needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcaps.datasets import (
    MultiMNIST,
    MultiMNISTBatches,
    MultiMNISTSample,
    multimnist_batch,
    overlay_pairs,
)


def _digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sparse 28x28 'digits' (uint8), every one different, and labels with all classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 6:22] = torch.randint(1, 256, (n, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.cat([torch.arange(10), torch.randint(0, 10, (n - 10,), generator=g)])
    return images, labels


def _shift_of(component: torch.Tensor, source: torch.Tensor, max_shift: int) -> tuple[int, int]:
    """The one (dy, dx) in [-max_shift, max_shift]^2 that moves the centred source onto it."""
    placed = F.pad(source.float() / 255.0, (4, 4, 4, 4))  # 28 -> 36, centred
    hits = [
        (dy, dx)
        for dy in range(-max_shift, max_shift + 1)
        for dx in range(-max_shift, max_shift + 1)
        if torch.equal(torch.roll(placed, (dy, dx), dims=(0, 1)), component)
    ]
    assert len(hits) == 1, hits
    return hits[0]


def _check_items(out: MultiMNISTSample, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Every property that holds for any pair, whichever way it was drawn."""
    b = out.image.shape[0]
    assert out.image.shape == (b, 1, 36, 36) and out.components.shape == (b, 2, 1, 36, 36)
    assert bool((out.labels[:, 0] != out.labels[:, 1]).all())  # two different classes
    expected_target = F.one_hot(out.labels, 10).sum(dim=1).float()
    assert torch.equal(out.target, expected_target)  # multi-hot
    clipped = (out.components[:, 0] + out.components[:, 1]).clamp(max=1.0)
    assert torch.equal(out.image, clipped)
    for k in range(b):
        for d in range(2):
            # the source: the one digit of that class that some shift within 4 px moves there
            candidates = [
                j
                for j in torch.nonzero(labels == out.labels[k, d]).flatten().tolist()
                if any(
                    torch.equal(
                        torch.roll(F.pad(images[j].float() / 255.0, (4,) * 4), (dy, dx), (0, 1)),
                        out.components[k, d, 0],
                    )
                    for dy in range(-4, 5)
                    for dx in range(-4, 5)
                )
            ]
            assert len(candidates) == 1


def test_items_are_pairs_of_shifted_digits_of_two_classes() -> None:
    images, labels = _digits(40)
    data = MultiMNIST(images, labels, seed=3, length=60)
    out = data.batch(range(60))
    _check_items(out, images, labels)
    shifts = set()
    for k in range(60):  # the first digit is source k mod N, shifted by at most 4 pixels
        shifts.add(_shift_of(out.components[k, 0, 0], images[k % 40], 4))
    assert len(shifts) > 30  # independent offsets, not one


def test_item_k_is_deterministic_in_seed_and_k_and_batched_equals_item_wise() -> None:
    images, labels = _digits(30)
    a = MultiMNIST(images, labels, seed=5, length=45)
    b = MultiMNIST(images.float() / 255.0, labels, seed=5, length=45)  # float input, same items
    ks = [44, 0, 17, 17, 3]
    batched = a.batch(ks)
    for i, k in enumerate(ks):
        item, again = a[k], b[k]
        for field, other, row in zip(item, again, batched, strict=True):
            assert torch.equal(field, other) and torch.equal(field, row[i])
    assert torch.equal(a[-1].image, a[44].image)
    other_seed = MultiMNIST(images, labels, seed=6, length=45)
    assert not all(torch.equal(a[k].image, other_seed[k].image) for k in range(10))
    assert torch.equal(a[7].labels[0], a[37].labels[0])  # 7 and 37 share source digit 7


def test_the_partner_is_uniform_over_the_other_classes_images() -> None:
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    images = torch.rand(100, 28, 28)
    out = multimnist_batch(images, labels, 6000, generator=torch.Generator().manual_seed(0))
    firsts0 = out.labels[:, 0] == 0  # partners of class-0 digits: 1 or 2 in ratio 30:60
    share = (out.labels[firsts0, 1] == 2).float().mean()
    assert abs(float(share) - 2 / 3) < 0.05


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6), max_shift=st.integers(0, 4))
def test_training_batches_have_every_property(seed: int, b: int, max_shift: int) -> None:
    images, labels = _digits(12, seed % 1000)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    out = multimnist_batch(images, labels, b, generator=g1, max_shift=max_shift)
    _check_items(out, images, labels)
    for k in range(b):
        for d in range(2):
            src = [j for j in range(12) if labels[j] == out.labels[k, d]]
            shifts = []
            for j in src:
                try:
                    shifts.append(_shift_of(out.components[k, d, 0], images[j], max_shift))
                except AssertionError:
                    pass
            assert len(shifts) == 1  # a shift within max_shift of exactly one source digit
    batches = MultiMNISTBatches(images, labels, max_shift=max_shift)
    again = batches.sample(b, g2)  # the same draws: the same pairs
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))


def test_overlay_against_a_loop() -> None:
    images = torch.rand(3, 28, 28, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    shifts = torch.tensor([[[1, -2], [0, 3]], [[-4, 4], [2, 0]]])
    out = overlay_pairs(images, labels, torch.tensor([0, 2]), torch.tensor([1, 0]), shifts, 36)
    for b, (i, j) in enumerate(((0, 1), (2, 0))):
        expected = torch.zeros(36, 36, dtype=torch.float64)
        for d, src in enumerate((i, j)):
            dy, dx = shifts[b, d].tolist()
            comp = torch.zeros(36, 36, dtype=torch.float64)
            for y in range(28):
                for x in range(28):
                    yy, xx = y + 4 + dy, x + 4 + dx
                    if 0 <= yy < 36 and 0 <= xx < 36:
                        comp[yy, xx] = images[src, y, x]
            assert torch.equal(out.components[b, d, 0], comp)
            expected += comp
        assert torch.equal(out.image[b, 0], expected.clamp(max=1.0))
    assert out.labels.tolist() == [[1, 2], [3, 1]]


def test_bad_input() -> None:
    images, labels = _digits(20)
    with pytest.raises(
        ValueError, match=r"MultiMNIST expected labels of shape \(20,\).*got \(19,\)"
    ):
        MultiMNIST(images, labels[:19])
    with pytest.raises(ValueError, match="at least two classes"):
        MultiMNIST(images, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        MultiMNIST(images, labels + 5)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        MultiMNIST(images, labels.float())
    with pytest.raises(TypeError, match="images must be a float tensor"):
        MultiMNIST(images.int(), labels)
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        MultiMNIST(images, labels, max_shift=-1)
    with pytest.raises(IndexError, match="index 20 out of range for 20 items"):
        MultiMNIST(images, labels)[20]
    with pytest.raises(TypeError, match=r"an index must be an integer in \[0, 20\), got float"):
        MultiMNIST(images, labels)[1.5]  # type: ignore[index]
    with pytest.raises(TypeError, match="an index must be an integer"):
        MultiMNIST(images, labels).batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="sample: generator must be a torch.Generator or None"):
        MultiMNISTBatches(images, labels).sample(2, generator=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="canvas 20 is smaller than the images, 28x28"):
        multimnist_batch(images, labels, 2, canvas=20)
    with pytest.raises(ValueError, match="MultiMNIST: canvas 27 is smaller"):
        MultiMNIST(images, labels, canvas=27)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        MultiMNISTBatches(images, labels).sample(0)
    with pytest.raises(ValueError, match=r"shifts must be an integer tensor \(B, 2, 2\)"):
        overlay_pairs(images, labels, torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="second must index the 20 images"):
        overlay_pairs(
            images, labels, torch.tensor([0]), torch.tensor([20]), torch.zeros(1, 2, 2).long()
        )
