"""Run-time plumbing of the examples: processes, devices, autocast, checkpoints, run files.

Checkpoints are written atomically (temporary file, fsync, rename) and read back with
``weights_only=True`` after checking the CRC-32 of every record, so a truncated, corrupted or
code-carrying file fails with a :class:`CheckpointError` that names it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchcaps.models import get_model, list_models


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str, no_cuda: bool) -> Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist()
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not no_cuda and device_arg in ("auto", "cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(device_arg: str, no_cuda: bool, d: Dist) -> torch.device:
    if no_cuda or device_arg == "cpu":
        return torch.device("cpu")
    if device_arg == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank)
        return torch.device("cpu")
    device = torch.device(device_arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device_arg}: CUDA is not available on this machine")
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    return device


# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse; whether it could.

    By default glibc serves large blocks (above a threshold that starts at 128 KB and rises to
    at most 32 MB) with their own ``mmap`` and unmaps them when they are freed, so each training
    step's large tensors (the convolution's columns and gradients) come back as fresh pages and
    pay a page fault per 4 KB on first touch. With ``mmap`` off and
    trimming raised to 2 GB they are reused instead (measured in benchmarks/RESULTS.md). The
    process then keeps its high-water mark of freed memory. ``False`` (nothing changed) where
    the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or unsafe."""


def _check_zip_records(path: Path) -> None:
    """Verify the CRC-32 that torch.save stores for every record (torch.load does not check it).

    Without this, bytes flipped inside a tensor's data load silently as wrong weights. Files
    that are not zip archives (truncated, or the legacy format) are left to torch.load.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (corrupt: record {bad!r} fails its "
            "CRC-32 check)"
        )


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure names the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_zip_records(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (truncated, corrupt, or it holds objects "
            f"other than tensors and plain containers): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"checkpoint {path} is not a torchcaps example checkpoint")
    return state


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


CPUINFO = Path("/proc/cpuinfo")


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and ISA flags, from the first processor in ``/proc/cpuinfo``
    (``platform``'s name and no flags where there is none). The logs, the run's
    ``config.json`` and the benchmarks' machine block all read them here."""
    model, flags = "", frozenset[str]()
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        lines = []
    for key, _, value in (line.partition(":") for line in lines):
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name (see :func:`cpu_info`)."""
    return cpu_info()[0]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def truncate_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only the metrics of epochs <= ``upto_epoch`` (those the checkpoint knows about)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("epoch", 0) <= upto_epoch:
                keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def checkpoint_model(state: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """The registry name and keyword arguments of the model a checkpoint holds.

    Checkpoints store them as ``model_name`` and ``model_kwargs``. Those written before the
    model registry existed (by ``mnist_capsnet.py``) hold the paper's MNIST CapsNet; its
    routing iterations come from the saved command line and the decoder from the weights.
    """
    name = state.get("model_name")
    if name is None:
        args = state.get("args") or {}
        weights = state.get("model") or {}
        kwargs = {
            "routing_iterations": int(args.get("routing_iterations", 3)),
            "reconstruction": any(k.startswith("decoder.") for k in weights),
        }
        return "capsnet_mnist", kwargs
    if name not in list_models():
        raise CheckpointError(
            f"checkpoint {path} holds a model {name!r} that this torchcaps does not know "
            f"(known: {list_models()}); install the torchcaps version that wrote it"
        )
    return str(name), dict(state.get("model_kwargs") or {})


def load_model(
    path: Path, device: Any = "cpu", **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model with :func:`torchcaps.models.get_model`; load its weights.

    Returns the model in eval mode on ``device`` and the checkpoint (``epoch``, ``args``,
    ``model_name``, ``model_kwargs``, ...). ``overrides`` change constructor arguments that do not
    change the weights (e.g. ``conv_impl``).
    """
    path = Path(path)
    state = load_checkpoint(path, map_location="cpu")
    weights = state["model"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict")
    for prefix in ("_orig_mod.", "module."):  # compiled or data-parallel wrappers
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: w for k, w in weights.items()}
    name, kwargs = checkpoint_model(state, path)
    model = get_model(name, **{**kwargs, **overrides})
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not hold the weights of {name}({kwargs}): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    state["model_name"], state["model_kwargs"] = name, kwargs
    return model.to(device).eval(), state
