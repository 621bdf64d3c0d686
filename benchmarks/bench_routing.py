"""Forward/backward time and peak memory of DenseCaps + DynamicRouting vs the reference DigitCaps.

    python benchmarks/bench_routing.py --quick
    python benchmarks/bench_routing.py --json routing.json

Measured per size and implementation, on random squashed input capsules ``u`` of shape
``(B, N_in, D_in)`` that require grad, with ``iterations`` routing rounds (3, the paper's):

- ``fwd+bwd``: ``v = layer(u)`` and ``v.backward(g)`` for a fixed random ``g`` (gradients
  flow into the weights and into ``u``, as inside a network);
- ``fwd``: the forward part of that step alone;
- ``no_grad fwd``: ``layer(u)`` under ``torch.no_grad()`` (evaluation).

Implementations: ``torchcaps``: ``DenseCaps(N_in, D_in, N_out, D_out,
routing=DynamicRouting(iterations))``; ``reference``: ``DigitCaps`` of
``benchmarks/reference_capsnet.py`` (``W`` (1, N_in, N_out, D_out, D_in) broadcast over the
batch by ``matmul``, logits ``b`` (B, N_in, N_out, 1), softmax over the parents). Before timing,
a check verifies on copied weights that both give the same ``v`` and gradients.

Sizes: ``paper``: B=128, 1152 x 8D -> 10 x 16D (MNIST DigitCaps); ``large``: B=8,
4608 x 8D -> 100 x 16D (more capsules and classes, a smaller batch so the reference fits in a
few GB). Each (size, implementation, repeat) runs in its own worker process; the order is
rotated each repeat; medians over repeats are reported. Peak memory: the RSS high-water mark of
the timed part of each phase (reset after the warm-up) above the RSS once the layer and its
input exist (so it counts activations, gradients and workspace, not the parameters), or the
CUDA allocator's peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    PeakMemory,
    busy_warning,
    emit_result,
    fmt,
    format_machine_info,
    format_table,
    interleaved,
    load_average,
    log,
    machine_info,
    median,
    release_memory,
    run_worker,
    spread,
    synchronize,
    write_json,
)

SCRIPT = Path(__file__).resolve()
IMPLS = ("reference", "torchcaps")
# name -> (in_capsules, in_dim, out_capsules, out_dim); batch sizes come from the settings
SIZES: dict[str, tuple[int, int, int, int]] = {
    "paper": (1152, 8, 10, 16),
    "large": (4608, 8, 100, 16),
}
FULL = {"paper_batch": 128, "large_batch": 8, "repeats": 5, "steps": 10, "warmup": 2}
QUICK = {"paper_batch": 128, "large_batch": 2, "repeats": 3, "steps": 2, "warmup": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DenseCaps + DynamicRouting vs the reference DigitCaps: time and memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    p.add_argument("--sizes", default="paper,large", help=f"comma-separated from {list(SIZES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {IMPLS}")
    p.add_argument(
        "--paper-batch",
        type=int,
        default=None,
        help=f"batch of the paper size (default {FULL['paper_batch']})",
    )
    p.add_argument(
        "--large-batch",
        type=int,
        default=None,
        help=f"batch of the large size (default {FULL['large_batch']}, "
        f"--quick {QUICK['large_batch']})",
    )
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"repeats, each in a fresh worker (default {FULL['repeats']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per phase and repeat (default {FULL['steps']})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed steps before them (default {FULL['warmup']})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in the workers (default: PyTorch's choice)",
    )
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    p.add_argument(
        "--no-check", action="store_true", help="skip the check that both implementations agree"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("paper_batch", "large_batch", "repeats", "steps", "iterations"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def selected(args: argparse.Namespace) -> list[str]:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES] + [i for i in impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"unknown size/impl {bad}; sizes {list(SIZES)}, impls {list(IMPLS)}")
    return [f"{size}-{impl}" for size in sizes for impl in impls]


def batch_of(args: argparse.Namespace, size: str) -> int:
    return int(getattr(args, f"{size}_batch"))


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def build_layer(impl: str, size: tuple[int, int, int, int], iterations: int, device: Any) -> Any:
    n_in, d_in, n_out, d_out = size
    if impl == "torchcaps":
        from torchcaps import DenseCaps, DynamicRouting

        return DenseCaps(n_in, d_in, n_out, d_out, routing=DynamicRouting(iterations)).to(device)
    import reference_capsnet as ref

    return ref.DigitCaps(n_in, d_in, n_out, d_out, iterations=iterations).to(device)


def worker_layer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import reference_capsnet  # noqa: F401 - same imports in every worker
    import torchcaps

    size_name, impl = name.split("-", 1)
    size = SIZES[size_name]
    n_in, d_in, n_out, d_out = size
    batch = batch_of(args, size_name)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    layer = build_layer(impl, size, args.iterations, device)
    gen = torch.Generator().manual_seed(args.seed)
    u = torchcaps.squash(torch.randn(batch, n_in, d_in, generator=gen)).to(device)
    u.requires_grad_(True)
    grad_v = torch.randn(batch, n_out, d_out, generator=gen).to(device)
    memory = PeakMemory(device)
    release_memory()
    baseline = memory.current_mb()
    result: dict[str, Any] = {
        "config": name,
        "size": size_name,
        "impl": impl,
        "batch": batch,
        "shape": {"in_capsules": n_in, "in_dim": d_in, "out_capsules": n_out, "out_dim": d_out},
        "iterations": args.iterations,
        "num_parameters": sum(p.numel() for p in layer.parameters()),
    }

    # ---- forward + backward ----
    def train_step() -> tuple[float, float]:
        layer.zero_grad(set_to_none=True)
        u.grad = None
        synchronize(device)
        t0 = time.perf_counter()
        v = layer(u)
        synchronize(device)
        t1 = time.perf_counter()
        v.backward(grad_v)
        synchronize(device)
        return t1 - t0, time.perf_counter() - t0

    for _ in range(args.warmup):
        train_step()
    release_memory()
    memory.reset()  # the peak of the timed steps
    fwd, total = zip(*(train_step() for _ in range(args.steps)), strict=True)
    result["fwd_s"] = list(fwd)
    result["fwd_bwd_s"] = list(total)
    result["fwd_bwd_peak_mb"] = memory.peak_mb() - baseline

    # ---- no_grad forward ----
    layer.zero_grad(set_to_none=True)
    u.grad = None

    def eval_step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            layer(u)
        synchronize(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        eval_step()
    release_memory()
    memory.reset()
    result["nograd_fwd_s"] = [eval_step() for _ in range(args.steps)]
    result["nograd_peak_mb"] = memory.peak_mb() - baseline
    result["memory_peak_since_start"] = memory.since_start
    for key in ("fwd_s", "fwd_bwd_s", "nograd_fwd_s"):
        result[key.replace("_s", "_ms")] = 1000.0 * median(result[key])
    return result


def worker_check(args: argparse.Namespace) -> dict[str, Any]:
    """Both implementations on the same weights and input: same v, same gradients."""
    import torch

    import torchcaps

    out: dict[str, Any] = {"config": "check", "ok": True}
    for label, size, batch in (("small", (36, 8, 5, 16), 3), ("paper", SIZES["paper"], 2)):
        torch.manual_seed(args.seed)
        ours = build_layer("torchcaps", size, args.iterations, "cpu")
        theirs = build_layer("reference", size, args.iterations, "cpu")
        with torch.no_grad():
            theirs.W.copy_(ours.weight_matrices.unsqueeze(0))
        u = torchcaps.squash(torch.randn(batch, size[0], size[1])).requires_grad_(True)
        g = torch.randn(batch, size[2], size[3])
        v_ours = ours(u)
        (grad_u_ours,) = torch.autograd.grad(v_ours, u, g)
        v_ref = theirs(u)
        (grad_u_ref,) = torch.autograd.grad(v_ref, u, g)
        diff_v = float((v_ours - v_ref).abs().max())
        diff_g = float((grad_u_ours - grad_u_ref).abs().max() / grad_u_ref.abs().max())
        out[label] = {"max_abs_diff_v": diff_v, "max_rel_diff_grad_u": diff_g}
        out["ok"] = out["ok"] and diff_v < 1e-5 and diff_g < 1e-3
    return out


def run_as_worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = worker_check(args) if args.worker == "check" else worker_layer(args.worker, args)
    result["threads"] = torch.get_num_threads()
    emit_result(result)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace, name: str) -> list[str]:
    argv = [
        "--worker",
        name,
        "--paper-batch",
        str(args.paper_batch),
        "--large-batch",
        str(args.large_batch),
        "--iterations",
        str(args.iterations),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        "1",
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def summarise(names: list[str], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        size_name, impl = name.split("-", 1)
        row: dict[str, Any] = {
            "config": name,
            "size": size_name,
            "impl": impl,
            "batch": ok[0]["batch"] if ok else None,
            "shape": ok[0]["shape"] if ok else None,
            "repeats_ok": len(ok),
            "errors": [r["error"] for r in runs[name] if "error" in r],
            "memory_peak_since_start": any(r["memory_peak_since_start"] for r in ok),
        }
        for key in ("fwd_bwd_ms", "fwd_ms", "nograd_fwd_ms", "fwd_bwd_peak_mb", "nograd_peak_mb"):
            row[key] = median([r[key] for r in ok])
            row[key + "_range"] = spread([r[key] for r in ok])
        rows.append(row)
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        ref = by_name.get(f"{row['size']}-reference")
        for key in ("fwd_bwd_ms", "fwd_ms", "nograd_fwd_ms"):
            speed = None
            if ref and ref[key] and row[key]:
                speed = ref[key] / row[key]
            row[key.replace("_ms", "_speedup_vs_reference")] = speed
        for key in ("fwd_bwd_peak_mb", "nograd_peak_mb"):
            ratio = None
            if ref and ref[key] and row[key]:
                ratio = row[key] / ref[key]
            row[key.replace("_mb", "_vs_reference")] = ratio
    return rows


def render(rows: list[dict[str, Any]], mem_label: str) -> str:
    headers = [
        "size",
        "impl",
        "batch",
        "fwd+bwd ms",
        "speed-up",
        "fwd ms",
        "no_grad fwd ms",
        "speed-up",
        f"fwd+bwd peak {mem_label}",
        f"no_grad peak {mem_label}",
    ]
    table = []
    for r in rows:
        if not r["repeats_ok"]:
            table.append([r["size"], r["impl"], "failed", *["-"] * (len(headers) - 3)])
            continue
        s = r["shape"]
        mark = "*" if r["memory_peak_since_start"] else ""
        table.append(
            [
                f"{r['size']} ({s['in_capsules']}x{s['in_dim']}D->{s['out_capsules']}x"
                f"{s['out_dim']}D)",
                r["impl"],
                str(r["batch"]),
                fmt(r["fwd_bwd_ms"]),
                fmt(r["fwd_bwd_speedup_vs_reference"], ".2f", "x"),
                fmt(r["fwd_ms"]),
                fmt(r["nograd_fwd_ms"]),
                fmt(r["nograd_fwd_speedup_vs_reference"], ".2f", "x"),
                fmt(r["fwd_bwd_peak_mb"], ".0f", mark),
                fmt(r["nograd_peak_mb"], ".0f", mark),
            ]
        )
    return format_table(headers, table, left=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_settings(args)
    if args.worker:
        run_as_worker(args)
        return 0
    names = selected(args)
    started = time.perf_counter()
    info = machine_info(args.device, args.threads)
    print(format_machine_info(info))
    warning = busy_warning(info)
    if warning:
        print(warning)
    print(
        f"settings: {args.iterations} routing iterations, batch paper {args.paper_batch} / "
        f"large {args.large_batch}, {args.warmup} warm-up + {args.steps} timed steps per "
        f"phase, {args.repeats} repeats, configs {names}",
        flush=True,
    )

    check = None
    if not args.no_check:
        check = run_worker(SCRIPT, worker_argv(args, "check"), args.worker_timeout)
        if "error" in check or not check.get("ok"):
            print(f"CHECK FAILED: torchcaps and the reference routing differ: {check}")
            return 1
        log(
            f"check: torchcaps == reference routing (paper size: max |dv| "
            f"{check['paper']['max_abs_diff_v']:.1e}, grad rel "
            f"{check['paper']['max_rel_diff_grad_u']:.1e})"
        )

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat, name in interleaved(names, args.repeats):
        result = run_worker(SCRIPT, worker_argv(args, name), args.worker_timeout)
        result["repeat"] = repeat
        runs[name].append(result)
        msg = (
            "failed: " + result["error"]
            if "error" in result
            else f"fwd+bwd {result['fwd_bwd_ms']:.1f} ms, no_grad fwd "
            f"{result['nograd_fwd_ms']:.1f} ms, peak {result['fwd_bwd_peak_mb']:.0f} MB"
        )
        log(f"[repeat {repeat + 1}/{args.repeats}] {name}: {msg} ({result['wall_s']:.1f} s)")

    rows = summarise(names, runs)
    info["load_average_end"] = load_average()
    elapsed = time.perf_counter() - started
    mem_label = "MB" if not args.device.startswith("cuda") else "MB (alloc)"
    print()
    print(
        f"medians of {args.repeats} repeats (per repeat: median of {args.steps} steps); "
        "speed-up = reference time / time; peak memory of the timed steps above the RSS with "
        "the layer and its input built"
        + (" (* = since process start)" if any(r["memory_peak_since_start"] for r in rows) else "")
    )
    print(render(rows, mem_label))
    for r in rows:
        for err in r["errors"]:
            print(f"{r['config']} failed: {err}")
    print(f"load average at end {info['load_average_end']}; total {elapsed:.0f} s")
    if args.json:
        settings = {
            k: getattr(args, k)
            for k in (
                "paper_batch",
                "large_batch",
                "iterations",
                "repeats",
                "steps",
                "warmup",
                "threads",
                "device",
                "seed",
                "quick",
            )
        }
        write_json(
            args.json,
            {
                "benchmark": "bench_routing",
                "machine": info,
                "settings": settings,
                "sizes": {
                    k: dict(
                        zip(("in_capsules", "in_dim", "out_capsules", "out_dim"), v, strict=True)
                    )
                    for k, v in SIZES.items()
                },
                "configs": names,
                "check": check,
                "rows": rows,
                "raw": runs,
                "total_s": elapsed,
            },
        )
        print(f"wrote {args.json}")
    return 0 if all(r["repeats_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
