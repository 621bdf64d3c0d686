"""The benchmark driver and its plumbing: machine info, worker processes, memory, tables, JSON.

A benchmark script is a :class:`Spec` (what it measures: configurations, settings, a
``measure`` function, the table's columns) handed to :func:`run`, which does the rest the same
way for every script: the command line (the spec's :class:`Setting` flags with a full and a
``--quick`` value, ``--configs``, ``--repeats``, ``--threads``, ``--json``, ...), an optional
check before timing, the repeats, the medians, the machine block, the table and the JSON.

With ``isolate=True`` every (configuration, repeat) runs in its own short-lived worker process
(the script itself, called with ``--worker`` and one JSON argument holding the configuration,
the repeat and every setting), so that peak memory is per configuration and one
configuration's allocator or thread-pool state cannot leak into the next; the spec's
``pythonpath`` folders are put on the workers' ``PYTHONPATH``. With ``isolate=False``
``measure`` runs in the driver's process. Either way the driver alternates the configurations
within each repeat (rotating the order each repeat) and reports medians over the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
def _cpuinfo() -> tuple[str, frozenset[str]]:
    # examples/runtime.py holds the one /proc/cpuinfo parser; the workers already import
    # from examples/ (Spec.pythonpath), the driver does it here.
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    from runtime import cpu_info

    return cpu_info()


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


def bf16_class() -> str:
    """The CPU's bfloat16 class: ``"amx"`` (AMX-BF16), ``"avx512_bf16"`` or ``"none"``."""
    flags = _cpuinfo()[1]
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "none"


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
        "bf16_class": bf16_class(),
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


def run_worker(
    script: Path,
    argv: Sequence[str],
    timeout: float | None,
    pythonpath: Sequence[Path] = (),
) -> dict[str, Any]:
    """Parent side: run ``script argv`` in a fresh interpreter and return its result dict.

    ``pythonpath`` folders go in front of the worker's ``PYTHONPATH``. A failed worker
    (non-zero exit, timeout, no result line) gives ``{"error": ...}``.
    """
    cmd = [sys.executable, str(script), *argv]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
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


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
CHECK = "check"  # the configuration name of the check worker


@dataclass(frozen=True)
class Setting:
    """An integer setting with a value for full runs and one for ``--quick`` (flag ``--<name>``).

    Either can be overridden on the command line; values below ``minimum`` are refused.
    """

    full: int
    quick: int
    help: str
    minimum: int = 1


@dataclass(frozen=True)
class Column:
    """One column of the table: ``value`` (a row key, or a function of the row) formatted.

    ``header`` may contain ``{mem}`` (the memory unit); text values are shown as they are,
    numbers with ``spec`` and ``suffix``; ``memory=True`` marks peaks since process start
    with ``*``.
    """

    header: str
    value: str | Callable[[dict[str, Any]], Any]
    spec: str = ".1f"
    suffix: str = ""
    memory: bool = False

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.value) if isinstance(self.value, str) else self.value(row)
        if isinstance(value, str):
            return value
        mark = "*" if self.memory and row.get("memory_peak_since_start") else ""
        return fmt(value, self.spec, self.suffix + mark)


@dataclass
class Report:
    """What a spec adds after the medians: lines printed above the table, keys of the JSON."""

    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _all_configs(settings: argparse.Namespace, names: list[str]) -> list[str]:
    return names


def _no_report(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], s: argparse.Namespace
) -> Report:
    return Report()


@dataclass(frozen=True)
class Spec:
    """What one benchmark script measures; :func:`run` does the rest.

    - ``measure(config, settings) -> dict``: one repeat of one configuration (``settings``
      holds every setting and ``repeat``, the repeat's index); in a worker process unless
      ``isolate=False``. ``check(settings) -> dict`` (optional, in a worker too): run once
      before timing, it returns ``ok`` and a one-line ``summary``.
    - ``configs``: every configuration by name; ``default_configs``/``quick_configs``: those
      run without ``--configs``; ``companions``: extra configurations measured in every repeat
      (in the rotation, in ``raw`` of the JSON) that get no row, e.g. a ceiling.
    - ``settings``: the :class:`Setting` flags (``repeats`` among them); ``add_arguments``:
      further flags; ``prepare(settings, configs) -> configs``: checks and completes both.
    - Rows: per configuration ``config``, ``repeats_ok``, ``errors``,
      ``memory_peak_since_start``, the keys in ``first`` from the first successful repeat, and
      the median and ``<key>_range`` (min, max) over repeats of each key in ``medians``;
      ``finish(rows, runs, settings) -> Report`` adds derived keys (ratios) to the rows.
    - The table: ``columns`` (the first ``left`` are text), under ``caption(settings)``;
      ``progress(result)``: the log line of one measurement.
    - ``pythonpath``: folders the workers import from (put on their ``PYTHONPATH``).
    """

    name: str
    description: str
    configs: Mapping[str, Any]
    default_configs: Sequence[str]
    quick_configs: Sequence[str]
    settings: Mapping[str, Setting]
    measure: Callable[[str, argparse.Namespace], dict[str, Any]]
    columns: Sequence[Column]
    medians: Sequence[str]
    caption: Callable[[argparse.Namespace], str]
    progress: Callable[[dict[str, Any]], str]
    first: Sequence[str] = ()
    left: int = 1
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    prepare: Callable[[argparse.Namespace, list[str]], list[str]] = _all_configs
    finish: Callable[
        [list[dict[str, Any]], dict[str, list[dict[str, Any]]], argparse.Namespace], Report
    ] = _no_report
    check: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    companions: Sequence[str] = ()
    isolate: bool = True
    cpu_only: bool = False
    pythonpath: Sequence[Path] = ()

    @property
    def script(self) -> Path:
        """The benchmark script (the module that defines ``measure``): what workers run."""
        return Path(inspect.getfile(self.measure)).resolve()


def build_parser(spec: Spec) -> argparse.ArgumentParser:
    """The command line of ``spec``'s script."""
    p = argparse.ArgumentParser(
        description=spec.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    quick = {k: s.quick for k, s in spec.settings.items() if s.quick != s.full}
    default_configs = f"default {list(spec.default_configs)}"
    if list(spec.quick_configs) != list(spec.default_configs):
        quick["configs"] = list(spec.quick_configs)
        default_configs += f"; --quick: {list(spec.quick_configs)}"
    p.add_argument(
        "--quick", action="store_true", help=f"a short run: {quick} (each can still be overridden)"
    )
    p.add_argument(
        "--configs",
        default=argparse.SUPPRESS,
        help=f"comma-separated from {list(spec.configs)} ({default_configs})",
    )
    for key, s in spec.settings.items():
        default = f"default {s.full}" + (f", --quick {s.quick}" if s.quick != s.full else "")
        p.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=argparse.SUPPRESS,
            help=f"{s.help} ({default})",
        )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads"
        + (" in the workers" if spec.isolate else "")
        + " (default: PyTorch's choice)",
    )
    if spec.cpu_only:
        p.set_defaults(device="cpu")
    else:
        p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    if spec.check is not None:
        p.add_argument("--no-check", action="store_true", help="skip the check before timing")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    if spec.isolate:
        p.add_argument(
            "--worker-timeout",
            type=float,
            default=3600.0,
            help="seconds after which a worker is abandoned",
        )
    spec.add_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def resolve(spec: Spec, args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Fill the settings not given from the full or quick values; check them; the configs."""
    for key, s in spec.settings.items():
        value = getattr(args, key, s.quick if args.quick else s.full)
        if value < s.minimum:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= {s.minimum}, got {value}")
        setattr(args, key, value)
    if getattr(args, "configs", None):
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
    else:
        names = list(spec.quick_configs if args.quick else spec.default_configs)
    names = spec.prepare(args, names)
    unknown = [c for c in names if c not in spec.configs]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choices: {list(spec.configs)}")
    args.configs = names
    return args, names


def _set_threads(threads: int | None) -> int:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _worker(spec: Spec, payload: str) -> None:
    """Worker side: one measurement (or the check) from the JSON payload; print its result."""
    job = json.loads(payload)
    settings = argparse.Namespace(**job["settings"], repeat=job["repeat"])
    threads = _set_threads(settings.threads)
    if job["config"] == CHECK and spec.check is not None:
        result = spec.check(settings)
    else:
        result = spec.measure(job["config"], settings)
    result["threads"] = threads
    emit_result(result)


def _measure(
    spec: Spec, name: str, repeat: int | None, settings: argparse.Namespace
) -> dict[str, Any]:
    """One measurement: in a fresh worker process, or here when the spec says ``isolate=False``."""
    if spec.isolate:
        job = {"config": name, "repeat": repeat, "settings": vars(settings)}
        argv = ["--worker", json.dumps(job)]
        return run_worker(spec.script, argv, settings.worker_timeout, spec.pythonpath)
    start = time.perf_counter()
    try:
        result = spec.measure(name, argparse.Namespace(**vars(settings), repeat=repeat))
    except Exception as exc:  # reported like a failed worker
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = time.perf_counter() - start
    return result


def summarise(
    spec: Spec, names: Sequence[str], runs: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One row per configuration: medians and ranges over its successful repeats."""
    rows = []
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        row: dict[str, Any] = {"config": name}
        row.update({key: ok[0].get(key) if ok else None for key in spec.first})
        row["repeats_ok"] = len(ok)
        row["errors"] = [r["error"] for r in runs[name] if "error" in r]
        row["memory_peak_since_start"] = any(r.get("memory_peak_since_start") for r in ok)
        for key in spec.medians:
            row[key] = median([r[key] for r in ok])
            row[key + "_range"] = spread([r[key] for r in ok])
        rows.append(row)
    return rows


def versus(
    rows: list[dict[str, Any]],
    key: str,
    reference: Callable[[dict[str, Any]], str],
    out: str,
    *,
    inverse: bool = False,
) -> None:
    """``row[out]`` = ``row[key]`` / that of the row named ``reference(row)`` (inverted with
    ``inverse``: a speed-up from times); None where either is missing."""
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        ref = by_name.get(reference(row))
        value, base = row[key], ref[key] if ref else None
        row[out] = ((base / value) if inverse else (value / base)) if value and base else None


def render(spec: Spec, rows: Sequence[dict[str, Any]], mem_label: str) -> str:
    headers = [c.header.format(mem=mem_label) for c in spec.columns]
    table = [
        [c.cell(r) for c in spec.columns]
        if r["repeats_ok"]
        else [r["config"], "failed", *["-"] * (len(headers) - 2)]
        for r in rows
    ]
    return format_table(headers, table, left=spec.left)


def run(spec: Spec, argv: Sequence[str] | None = None) -> int:
    """The benchmark script's ``main``: parse, check, measure, print the table, write JSON.

    Returns 0 when every configuration has at least one successful repeat, 1 otherwise or
    when the check fails.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"] and len(argv) == 2:
        _worker(spec, argv[1])
        return 0
    settings, names = resolve(spec, build_parser(spec).parse_args(argv))
    json_path = vars(settings).pop("json")
    started = time.perf_counter()
    if not spec.isolate:
        _set_threads(settings.threads)
    info = machine_info(settings.device, settings.threads)
    print(format_machine_info(info))
    warning = busy_warning(info)
    if warning:
        print(warning)
    shown = ", ".join(f"{k} {v}" for k, v in vars(settings).items() if k != "configs")
    print(f"settings: {shown}; configs {names}", flush=True)

    check = None
    if spec.check is not None and not settings.no_check:
        check = _measure(spec, CHECK, None, settings)
        if "error" in check or not check.get("ok"):
            print(f"CHECK FAILED ({spec.name}): {check}")
            return 1
        log(f"check: {check['summary']}")

    order = [*spec.companions, *names]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for repeat, name in interleaved(order, settings.repeats):
        result = _measure(spec, name, repeat, settings)
        result["repeat"] = repeat
        runs[name].append(result)
        msg = "failed: " + result["error"] if "error" in result else spec.progress(result)
        log(f"[repeat {repeat + 1}/{settings.repeats}] {name}: {msg} ({result['wall_s']:.1f} s)")

    rows = summarise(spec, names, runs)
    report = spec.finish(rows, runs, settings)
    info["load_average_end"] = load_average()
    elapsed = time.perf_counter() - started
    since_start = any(r["memory_peak_since_start"] for r in rows)
    print()
    for line in report.notes:
        print(line)
    print(spec.caption(settings) + (" (* = since process start)" if since_start else ""))
    print(render(spec, rows, "MB (alloc)" if settings.device.startswith("cuda") else "MB"))
    for r in rows:
        for err in r["errors"]:
            print(f"{r['config']} failed: {err}")
    print(f"load average at end {info['load_average_end']}; total {elapsed:.0f} s")
    if json_path:
        out = {
            "benchmark": spec.name,
            "machine": info,
            "settings": vars(settings),
            "configs": names,
            "check": check,
            **report.extra,
            "rows": rows,
            "raw": runs,
            "total_s": elapsed,
        }
        write_json(json_path, out)
        print(f"wrote {json_path}")
    return 0 if all(r["repeats_ok"] for r in rows) else 1
