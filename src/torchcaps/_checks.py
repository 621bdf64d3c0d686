"""Shared argument and tensor validation with uniform error messages.

Configuration is checked when a module is built, tensors when it is called. Every message names
the argument, what was expected and what arrived. Checks on tensor *values* (for example that
class indices are in range) need a host synchronisation, so they run in eager mode only and are
skipped while :func:`torch.compile` traces; checks on shapes and dtypes always run and cost only
Python integer comparisons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# Devices on which ``torch.autocast`` exists.
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia"})
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ShapeError(ValueError):
    """A tensor argument has the wrong shape (a :class:`ValueError`)."""


def shape_str(shape: Sequence[int]) -> str:
    """Format a shape as ``(2, 3, 4)``."""
    return str(tuple(int(s) for s in shape))


def is_compiling() -> bool:
    """Whether the code is being traced by ``torch.compile`` / ``torch.export``."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False  # pragma: no cover - very old torch


def in_graph_capture() -> bool:
    """Whether the code runs under ``torch.jit`` tracing/scripting, ``torch.compile`` or export.

    The automatic CPU fast paths (``conv_impl="auto"``, ``batch_chunk="auto"``) step aside
    then, so that captured graphs hold the plain operations.
    """
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or is_compiling()
        or torch.compiler.is_exporting()
    )


def check_int(name: str, value: Any, *, minimum: int = 1, owner: str = "") -> int:
    """Check that ``value`` is an ``int`` (not a bool) of at least ``minimum``."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    owner: str = "",
) -> float:
    """Check that ``value`` is a finite real number inside the given bounds."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{prefix}{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{prefix}{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        op = ">" if strict_min else ">="
        raise ValueError(f"{prefix}{name} must be {op} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{prefix}{name} must be <= {maximum}, got {value}")
    return value


def check_tensor(name: str, x: Any, *, owner: str) -> Tensor:
    """Check that ``x`` is a real floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{owner}: {name} must be a real floating-point tensor, got dtype {x.dtype}"
        )
    return x


def check_param_dtype(name: str, x: Tensor, weight: Tensor, *, owner: str) -> None:
    """Check that ``x`` has the parameters' dtype, unless autocast handles the mismatch."""
    if x.dtype == weight.dtype:
        return
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return
    raise TypeError(
        f"{owner}: {name} has dtype {x.dtype} but the parameters have {weight.dtype}; "
        f"convert one of them (e.g. model.to({x.dtype})) or run under torch.autocast"
    )


def check_index_tensor(name: str, x: Any, *, owner: str) -> Tensor:
    """Check that ``x`` is an integer tensor (class indices)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{owner}: {name} of class indices must be an integer tensor, got {x.dtype}"
        )
    return x


def check_indices_in_range(name: str, index: Tensor, num_classes: int, *, owner: str) -> None:
    """Check ``0 <= index < num_classes`` (eager mode only: it synchronises with the device)."""
    if is_compiling() or index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= num_classes:
        raise ValueError(
            f"{owner}: {name} must hold class indices in [0, {num_classes - 1}], "
            f"got values in [{lo_i}, {hi_i}]"
        )


def float32_compute(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32; leave float32/float64 as they are."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype_out(x: Tensor) -> torch.dtype:
    """Dtype a float32-computed result is returned in: the caller's dtype, float32 at least.

    Under autocast a region that computes in float32 returns float32 (like autocast's own
    float32 ops, e.g. softmax); outside autocast it returns the input's dtype.
    """
    if x.dtype in _LOW_PRECISION and x.device.type in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(x.device.type):
            return torch.float32
    return x.dtype
