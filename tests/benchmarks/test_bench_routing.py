"""bench_routing's --batch-chunk: parsed as DenseCaps' batch_chunk, passed to its dense layers."""

from __future__ import annotations

import argparse

import pytest

import bench_routing


@pytest.mark.parametrize(
    ("text", "value"), [("auto", "auto"), ("none", None), ("11", 11), ("1", 1)]
)
def test_batch_chunk_values(text: str, value: object) -> None:
    assert bench_routing._batch_chunk(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "fast", "2.5", ""])
def test_bad_batch_chunk(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="auto, none or a positive int"):
        bench_routing._batch_chunk(text)


@pytest.mark.parametrize("layer", ["dynamic", "self_attention", "inverted_dot_product"])
def test_dense_layers_get_the_batch_chunk(layer: str) -> None:
    case = bench_routing.CASES[f"{layer}-paper"]
    built = bench_routing.build_layer("torchcaps", case, 3, "cpu", 7)
    assert built.batch_chunk == 7
    assert bench_routing.build_layer("torchcaps", case, 3, "cpu").batch_chunk == "auto"
