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

from torchcaps.errors import ShapeError

# Devices on which ``torch.autocast`` exists.
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia"})
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def shape_str(shape: Sequence[int]) -> str:
    """Format a shape as ``(2, 3, 4)``."""
    return str(tuple(int(s) for s in shape))


def is_compiling() -> bool:
    """Whether the code is being traced by ``torch.compile`` / ``torch.export``."""
    return bool(torch.compiler.is_compiling())


def is_exporting() -> bool:
    """Whether the code is being traced by ``torch.export``."""
    return bool(torch.compiler.is_exporting())


def is_compiling_to_run() -> bool:
    """Under ``torch.compile``, but not export or TorchScript tracing.

    Where the CPU fast paths run as opaque operators (``torchcaps::tap_conv2d``,
    ``torchcaps::dense_dynamic_routing``): the compiled graph calls them on real tensors,
    while export and tracing must keep torch's own operations.
    """
    return is_compiling() and not is_exporting() and not torch.jit.is_tracing()


def is_functorch_wrapped(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a functorch transform (``vmap``, ``grad``, ...).

    The one place that calls torch's private API for this; the CPU fast paths step aside for
    such tensors.
    """
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def in_graph_capture() -> bool:
    """Whether the code runs under ``torch.jit`` tracing/scripting, ``torch.compile`` or export.

    The automatic CPU fast paths (``conv_impl="auto"``, ``batch_chunk="auto"``) step aside
    then, so that captured graphs hold the plain operations (``conv_impl="auto"`` has its own
    rule under ``torch.compile``).
    """
    return torch.jit.is_tracing() or torch.jit.is_scripting() or is_compiling() or is_exporting()


def check_int(name: str, value: Any, *, minimum: int = 1, owner: str = "") -> int:
    """Check that ``value`` is an ``int`` (not a bool) of at least ``minimum``."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
    return value


IntPair = int | tuple[int, int]


def check_pair(name: str, value: Any, *, minimum: int, owner: str) -> tuple[int, int]:
    """Check an int or a pair of ints (a kernel size, stride, padding); return the pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
        return (
            check_int(f"{name}[0]", value[0], minimum=minimum, owner=owner),
            check_int(f"{name}[1]", value[1], minimum=minimum, owner=owner),
        )
    v = check_int(name, value, minimum=minimum, owner=owner)
    return (v, v)


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


def check_choice(name: str, value: Any, choices: Sequence[Any], *, owner: str) -> Any:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_generator(name: str, value: Any, *, owner: str) -> torch.Generator | None:
    """Check that ``value`` is a :class:`torch.Generator` or ``None``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"{owner}: {name} must be a torch.Generator or None, got {type(value).__name__}"
        )
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


def check_shape(
    x: Any,
    dims: str,
    *,
    name: str,
    owner: str,
    empty_ok: Sequence[str] = ("B",),
    note: str = "",
    **sizes: int,
) -> dict[str, Any]:
    """Check the shape of tensor ``x`` against ``dims``; return the size bound to each name.

    ``dims`` names the dimensions, separated by spaces (``"B N_in N_out D_out"``). A name given
    in ``sizes`` must have that size; a number is a fixed size; any other name binds to what
    ``x`` has, and a name used twice must have the same size both times. Every dimension must be
    at least 1 except those named in ``empty_ok``. On a mismatch a :class:`ShapeError` says
    ``"<owner> expected <name> of shape (B, 1152, 8)<note>, got (2, 1151, 8)"``, the known
    sizes filled in. Only Python integer comparisons: this runs under ``torch.compile`` too.

    Examples:
        >>> import torch
        >>> check_shape(torch.zeros(2, 5, 3), "B K D", name="v", owner="f", D=3)
        {'B': 2, 'K': 5, 'D': 3}
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    names = dims.split()
    expected = "(" + ", ".join(str(sizes.get(d, d)) for d in names) + ")"
    if len(names) == 1:
        expected = expected[:-1] + ",)"
    shape = x.shape  # not converted to int: that would specialise symbolic sizes under export
    bound: dict[str, Any] = {}
    ok = len(shape) == len(names)
    if ok:
        for d, size in zip(names, shape):
            want = int(d) if d.isdigit() else sizes.get(d, bound.get(d))
            if (want is not None and size != want) or (d not in empty_ok and size < 1):
                ok = False
                break
            bound[d] = size
    if not ok:
        raise ShapeError(
            f"{owner} expected {name} of shape {expected}{note}, got {shape_str(shape)}"
        )
    return {d: v for d, v in bound.items() if not d.isdigit()}


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
