"""DenseCaps(batch_chunk=...): routing the batch in chunks gives the unchunked result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchcaps import DenseCaps, DynamicRouting, squash


def _pair(batch_chunk: int | str | None, **kwargs) -> tuple[DenseCaps, DenseCaps]:
    torch.manual_seed(0)
    whole = DenseCaps(6, 3, 4, 5, batch_chunk=None, dtype=torch.float64, **kwargs)
    chunked = DenseCaps(6, 3, 4, 5, batch_chunk=batch_chunk, dtype=torch.float64, **kwargs)
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


@given(batch=st.integers(1, 9), chunk=st.integers(1, 10), iterations=st.integers(1, 4))
def test_chunked_equals_whole_batch(batch: int, chunk: int, iterations: int) -> None:
    whole, chunked = _pair(chunk, routing=DynamicRouting(iterations))
    x = squash(torch.randn(batch, 6, 3, dtype=torch.float64))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v1, c1 = whole(x1, return_coupling=True)
    v2, c2 = chunked(x2, return_coupling=True)
    torch.testing.assert_close(v2, v1, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(c2, c1, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(v1)
    v1.backward(g)
    v2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(chunked.weight.grad, whole.weight.grad, atol=1e-12, rtol=1e-10)


def test_auto_chunk_size_from_the_byte_budget() -> None:
    layer = DenseCaps(1152, 8, 10, 16)  # 1152 * 10 * 16 * 4 bytes = 737,280 per example
    u = torch.zeros(100, 1152, 8)
    assert layer._chunk_size(u) == 16 * 1024 * 1024 // 737_280 == 22
    # 33.5 MB per example, over the budget: no chunking.
    assert DenseCaps(4, 1, 4096, 512)._chunk_size(torch.zeros(3, 4, 1)) == 3
    # 8 MiB per example: chunks of 2 examples, fewer than in_dim = 8, so no chunking ...
    assert DenseCaps(4, 8, 1024, 512)._chunk_size(torch.zeros(5, 4, 8)) == 5
    # ... but with in_dim = 2 chunks of 2.
    assert DenseCaps(4, 2, 1024, 512)._chunk_size(torch.zeros(5, 4, 2)) == 2
    assert DenseCaps(1152, 8, 10, 16, batch_chunk=None)._chunk_size(u) == 100
    assert DenseCaps(1152, 8, 10, 16, batch_chunk=7)._chunk_size(u) == 7


def test_auto_does_not_chunk_off_cpu_or_when_tracing() -> None:
    layer = DenseCaps(1152, 8, 10, 16, device="meta")
    assert layer._chunk_size(torch.zeros(100, 1152, 8, device="meta")) == 100

    seen: list[int] = []

    class Spy(DenseCaps):
        def _chunk_size(self, u: torch.Tensor) -> int:
            seen.append(super()._chunk_size(u))
            return seen[-1]

    spy = Spy(1152, 8, 10, 16)
    torch.jit.trace(spy, (torch.randn(30, 1152, 8),), check_trace=False)
    assert seen == [30]


def test_auto_chunks_a_large_batch_with_the_same_result() -> None:
    torch.manual_seed(0)
    whole = DenseCaps(1152, 8, 10, 16, batch_chunk=None)
    auto = DenseCaps(1152, 8, 10, 16)
    auto.load_state_dict(whole.state_dict())
    x = squash(torch.randn(50, 1152, 8))  # 3 chunks: 22, 22, 6
    torch.testing.assert_close(auto(x), whole(x), atol=1e-6, rtol=1e-5)


def test_empty_batch() -> None:
    _, chunked = _pair(2)
    v, c = chunked(torch.zeros(0, 6, 3, dtype=torch.float64), return_coupling=True)
    assert v.shape == (0, 4, 5) and c.shape == (0, 6, 4)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"DenseCaps: batch_chunk must be >= 1, got 0"),
        ("fast", ValueError, r"batch_chunk must be a positive int, 'auto' or None, got 'fast'"),
        (2.5, TypeError, r"DenseCaps: batch_chunk must be an int, got float 2.5"),
    ],
)
def test_bad_batch_chunk(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DenseCaps(4, 2, 3, 2, batch_chunk=value)  # type: ignore[arg-type]


def test_batch_chunk_in_repr() -> None:
    assert "batch_chunk=4" in repr(DenseCaps(4, 2, 3, 2, batch_chunk=4))
    assert "batch_chunk" not in repr(DenseCaps(4, 2, 3, 2))
