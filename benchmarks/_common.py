"""Shared plumbing of the benchmark scripts: machine info, worker subprocesses, memory, tables.

Every measured configuration runs in its own short-lived worker process (the script itself,
called with ``--worker``), so that peak memory is per configuration and one configuration's
allocator or thread-pool state cannot leak into the next. The parent interleaves the workers
across repeats (rotating the order each repeat) and aggregates medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EXAMPLES_DIR = REPO_DIR / "examples"
RESULT_PREFIX = "BENCH-RESULT "
MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------------------
# Machine information
# --------------------------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if m:
        model = m.group(1).strip()
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    if f:
        flags = set(f.group(1).split())
    return model, flags


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """CPU model and relevant ISA flags, torch version, threads, date, git commit, load."""
    import torch

    model, flags = _cpuinfo()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_flags": isa,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": (commit + ("-dirty" if dirty else "")) if commit else "unknown",
        "load_average_start": load_average(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_machine_info(info: dict[str, Any]) -> str:
    lines = [
        f"cpu: {info['cpu']} ({info['logical_cpus']} logical, {info['usable_cpus']} usable; "
        f"flags: {' '.join(info['cpu_flags']) or 'none of avx2/avx512f/avx512_bf16/amx'})",
        f"torch {info['torch']}, {info['torch_threads']} threads, python {info['python']}, "
        f"device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else ""),
        f"date {info['date_utc']}, git {info['git_commit']}, load average "
        f"{info['load_average_start']}",
    ]
    return "\n".join(lines)


def busy_warning(info: dict[str, Any]) -> str | None:
    load = info.get("load_average_start")
    cpus = info.get("usable_cpus") or 1
    if load and load[0] > 0.25 * cpus:
        return (
            f"WARNING: the machine looks busy (1-minute load {load[0]} on {cpus} CPUs): "
            "these numbers are not reliable; rerun on a quiet machine"
        )
    return None


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # pragma: no cover - not Linux
        return float("nan")
    return kb / 1024.0


class PeakMemory:
    """Peak memory of a phase: RSS high-water mark on the CPU, allocator peak on CUDA.

    On Linux the RSS high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs``, so each phase of a worker gets its own peak. Where that is not
    possible the peak is ``ru_maxrss`` since the process started (``since_start`` is True).
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.since_start = False

    @property
    def cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device)) == "cuda"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.since_start = True

    def current_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated(self.device) / MB
        return current_rss_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MB
        kb = None if self.since_start else _status_kb("VmHWM")
        if kb is None:
            self.since_start = True
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return kb / 1024.0


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def synchronize(device: Any) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
def emit_result(result: dict[str, Any]) -> None:
    """Worker side: print the result as one JSON line the parent picks up."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(script: Path, argv: Sequence[str], timeout: float | None) -> dict[str, Any]:
    """Parent side: run ``script argv`` in a fresh interpreter and return its result dict.

    A failed worker (non-zero exit, timeout, no result line) gives ``{"error": ...}``.
    """
    cmd = [sys.executable, str(script), *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit code {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["wall_s"] = wall
    return result


def interleaved(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, name) pairs: every name once per repeat, the order rotated each repeat."""
    order: list[tuple[int, str]] = []
    n = len(names)
    for r in range(repeats):
        shift = r % n if n else 0
        order += [(r, name) for name in list(names[shift:]) + list(names[:shift])]
    return order


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------------
def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None and v == v]  # drop None and NaN
    return statistics.median(clean) if clean else None


def spread(values: Sequence[float | None]) -> list[float] | None:
    clean = [v for v in values if v is not None and v == v]
    return [min(clean), max(clean)] if clean else None


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A Markdown table, padded for the terminal; the first ``left`` columns are text."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def timed(fn: Callable[[], Any], device: Any) -> float:
    """Seconds one call of ``fn`` takes, synchronising a CUDA device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
