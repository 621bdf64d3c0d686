"""torchcaps.datasets.shift: translations and the CapsNet paper's random shifts against
per-pixel loops, their invariants over random inputs, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchcaps.datasets import (
    content_margins,
    pad_to_canvas,
    random_shift,
    random_shift_offsets,
    translate,
)


def test_translate_matches_a_loop() -> None:
    images = torch.rand(4, 2, 6, 7)
    dy, dx = torch.tensor([0, 2, -3, 6]), torch.tensor([1, -1, 0, -7])
    out = translate(images, dy, dx)
    for k in range(4):
        for y in range(6):
            for x in range(7):
                sy, sx = y - int(dy[k]), x - int(dx[k])
                inside = 0 <= sy < 6 and 0 <= sx < 7
                expected = images[k, :, sy, sx] if inside else torch.zeros(2)
                assert torch.equal(out[k, :, y, x], expected)


def test_random_shift_is_a_per_sample_shift_of_at_most_max_shift() -> None:
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == (64, 1, 28, 28) and shifted.dtype == torch.float32
    padded = torch.nn.functional.pad(images.float() / 255.0, (2, 2, 2, 2))
    seen = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[k, dy : dy + 28, dx : dx + 28], shifted[k, 0])
        ]
        assert len(matches) == 1  # a window of the zero-padded image: a shift of at most 2
        seen.add(matches[0])
    assert len(seen) > 10  # offsets drawn independently per sample


def test_offsets_are_the_shifts_applied() -> None:
    x = torch.rand(10, 3, 9, 9)
    offsets = random_shift_offsets(10, 3, generator=torch.Generator().manual_seed(7))
    expected = translate(x, offsets[:, 0], offsets[:, 1])
    torch.testing.assert_close(random_shift(x, 3, torch.Generator().manual_seed(7)), expected)
    counts = torch.bincount(
        random_shift_offsets(7000, 3, generator=torch.Generator().manual_seed(0)).flatten() + 3
    )
    assert counts.shape == (7,) and int(counts.min()) > 1700  # all of -3..3, about uniformly


@given(
    n=st.integers(1, 6),
    max_shift=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_content_inside_the_margin_is_moved_not_lost(n: int, max_shift: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 12, 12)
    x[:, :, 4:8, 4:8] = torch.rand(n, 1, 4, 4, generator=g)  # a 4-pixel empty border
    y = random_shift(x, max_shift, g)
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    assert torch.equal(torch.sort(y.flatten(1)).values, torch.sort(x.flatten(1)).values)
    if max_shift == 0:
        assert torch.equal(y, x)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="random_shift: images must be a float tensor"):
        random_shift(torch.zeros(2, 5, 5, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\).*got \(5, 5\)"):
        random_shift(torch.zeros(5, 5), 1)
    with pytest.raises(ValueError, match="max_shift must be >= 0, got -1"):
        random_shift(torch.zeros(2, 5, 5), -1)
    with pytest.raises(TypeError, match="max_shift must be an int"):
        random_shift(torch.zeros(2, 5, 5), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dy must be an integer tensor of shape \(N,\) = \(2,\)"):
        translate(torch.zeros(2, 5, 5), torch.zeros(3, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match=r"dx must be an integer tensor.*got torch.float32"):
        translate(torch.zeros(2, 5, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \(N, \*, H, W\)"):
        translate(torch.zeros(5, 5), torch.zeros(5, dtype=torch.long), torch.zeros(5))
    with pytest.raises(TypeError, match="translate: dx must be a torch.Tensor, got list"):
        translate(torch.zeros(2, 5, 5), torch.zeros(2, dtype=torch.long), [0, 0])
    with pytest.raises(TypeError, match="random_shift: generator must be a torch.Generator"):
        random_shift(torch.zeros(2, 5, 5), 1, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="content_margins: images must be a torch.Tensor, got list"):
        content_margins([[0.0]])  # type: ignore[arg-type]


def test_content_margins_match_a_loop() -> None:
    images = torch.zeros(5, 2, 8, 9)
    images[0, 0, 2, 3] = 1.0
    images[1, 1, 0:8, 8] = 0.5
    images[2, :, 3:5, 1:7] = -0.2  # negative values are content too
    images[3, 0, 7, 0] = 1.0  # image 4 stays empty
    margins = content_margins(images)
    for k in range(5):
        rows = [y for y in range(8) if images[k, :, y].ne(0).any()]
        cols = [x for x in range(9) if images[k, :, :, x].ne(0).any()]
        expected = (rows[0], 7 - rows[-1], cols[0], 8 - cols[-1]) if rows else (8, 8, 9, 9)
        assert tuple(int(m[k]) for m in margins) == expected
    # (N, H, W) and uint8 alike
    top = content_margins((images[:, 0].abs() * 255).to(torch.uint8))[0]
    assert top.tolist() == [2, 8, 3, 7, 8]  # channel 0 only: images 1 and 4 are empty


@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_shifting_by_the_margins_keeps_the_content(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 7, 6, generator=g) < 0.2).float()
    top, bottom, left, right = content_margins(images)
    for dy, dx in ((bottom, right), (-top, -left)):
        moved = translate(images, dy.clamp(max=7), dx.clamp(max=6))
        torch.testing.assert_close(moved.sum((1, 2, 3)), images.sum((1, 2, 3)))


def test_content_margins_bad_input() -> None:
    with pytest.raises(
        ValueError, match=r"images must be a tensor of shape \(N, \*, H, W\), got \(4, 4\)"
    ):
        content_margins(torch.zeros(4, 4))


def test_pad_to_canvas_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (3, 2, 5, 4), generator=g, dtype=torch.uint8)
    out = pad_to_canvas(images, 8)
    assert out.shape == (3, 2, 8, 8) and out.dtype == torch.uint8
    top, left = 1, 2  # (8 - 5) // 2 rows above, (8 - 4) // 2 columns to the left
    for y in range(8):
        for x in range(8):
            inside = top <= y < top + 5 and left <= x < left + 4
            want = (
                images[:, :, y - top, x - left] if inside else torch.zeros(3, 2, dtype=torch.uint8)
            )
            assert torch.equal(out[:, :, y, x], want)
    # (N, H, W) input; a canvas the image's size is the image
    assert pad_to_canvas(torch.ones(2, 28, 28), 40)[:, 6:34, 6:34].eq(1).all()
    assert torch.equal(pad_to_canvas(images, 5)[..., :, :4], images)


def test_pad_to_canvas_bad_input() -> None:
    with pytest.raises(ValueError, match=r"canvas 27 is smaller than the images, 28x28"):
        pad_to_canvas(torch.zeros(1, 28, 28), 27)
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \(N, \*, H, W\)"):
        pad_to_canvas(torch.zeros(28, 28), 40)
    with pytest.raises(TypeError, match="images must be a torch.Tensor, got list"):
        pad_to_canvas([[0.0]], 40)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="canvas"):
        pad_to_canvas(torch.zeros(1, 28, 28), 40.0)  # type: ignore[arg-type]
