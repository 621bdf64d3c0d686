"""Constants and small helpers shared by the test files (fixtures live in ``conftest.py``).

Imported plainly (``from _helpers import TOL``): ``tests/`` is on pytest's ``pythonpath``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Per-dtype tolerances (absolute, relative) against float64 references.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def quiet(*args: Any, **kwargs: Any) -> None:
    """A ``log`` function that prints nothing."""


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def grads_finite(model: nn.Module) -> bool:
    """Every gradient of ``model`` that exists is finite."""
    return all(p.grad is None or finite(p.grad) for p in model.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def examples_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that imports the example scripts plainly.

    pytest's ``pythonpath`` setting holds only in this process; a child Python (``-c`` code,
    ``torchrun``) finds ``examples/`` through ``PYTHONPATH`` instead.
    """
    paths = [str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


# The smallNORB files' magic numbers per element type, and their names per split.
NORB_MAGIC = {torch.uint8: 0x1E3D4C55, torch.int32: 0x1E3D4C54, torch.float32: 0x1E3D4C51,
              torch.float64: 0x1E3D4C53, torch.int16: 0x1E3D4C56}  # fmt: skip
NORB_PREFIX = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}


def write_norb_matrix(path: Path, t: torch.Tensor, compress: bool = False) -> Path:
    """``t`` in the NORB format: magic, ndim, max(ndim, 3) sizes (1-padded), data."""
    dims = list(t.shape) + [1] * max(0, 3 - t.dim())
    raw = struct.pack(f"<{2 + len(dims)}i", NORB_MAGIC[t.dtype], t.dim(), *dims)
    raw += t.contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def fake_smallnorb_split(
    root: Path, split: str, n: int, seed: int, compress: bool = False
) -> dict[str, torch.Tensor]:
    """``n`` random smallNORB examples of ``split`` written to ``root`` in the official format."""
    g = torch.Generator().manual_seed(seed)
    data = {
        "dat": torch.randint(0, 256, (n, 2, 96, 96), generator=g, dtype=torch.uint8),
        "cat": torch.randint(0, 5, (n,), generator=g, dtype=torch.int32),
        "info": torch.randint(0, 9, (n, 4), generator=g, dtype=torch.int32),
    }
    for kind, t in data.items():
        write_norb_matrix(root / f"{NORB_PREFIX[split]}-{kind}.mat", t, compress)
    return data


def bilinear_sample(img: torch.Tensor, x: float, y: float) -> float:
    """Bilinear sample of a 2-D float64 image at (x, y), zero outside (pixel centres integer)."""
    h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


# The flags of a short example run on the embedded sample: 64 training images, 2 steps per
# epoch, 32 test images in one batch.
SHORT_RUN = ["--embedded-sample", "--quiet", "--max-train-samples", "64", "--max-steps", "2",
             "--max-test-samples", "32", "--test-batch-size", "32"]  # fmt: skip


def compiled_graph_targets(module: Any, *args: torch.Tensor) -> tuple[set, Any]:
    """Compile ``module`` (fullgraph, a backend that records the graph and runs it as traced),
    call it on ``args``; return the targets of the one graph's nodes and the result."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return {node.target for node in graphs[0].graph.nodes}, out
