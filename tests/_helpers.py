"""Constants and small helpers shared by the test files (fixtures live in ``conftest.py``).

Imported plainly (``from _helpers import TOL``): ``tests/`` is on pytest's ``pythonpath``.
"""

from __future__ import annotations

import os
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
