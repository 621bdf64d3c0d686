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
few GB). This file is the specification; the driver in ``_common.py`` runs each (size,
implementation, repeat) in its own worker process, rotates the order each repeat and reports
medians over repeats. Peak memory: the RSS high-water mark of the timed part of each phase
(reset after the warm-up) above the RSS once the layer and its input exist (so it counts
activations, gradients and workspace, not the parameters), or the CUDA allocator's peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _common import (
    Column,
    PeakMemory,
    Report,
    Setting,
    Spec,
    median,
    release_memory,
    run,
    synchronize,
    versus,
)

IMPLS = ("reference", "torchcaps")
# name -> (in_capsules, in_dim, out_capsules, out_dim); batch sizes come from the settings
SIZES: dict[str, tuple[int, int, int, int]] = {
    "paper": (1152, 8, 10, 16),
    "large": (4608, 8, 100, 16),
}
CONFIGS = {f"{size}-{impl}": (size, impl) for size in SIZES for impl in IMPLS}
SETTINGS = {
    "paper_batch": Setting(128, 128, "batch of the paper size"),
    "large_batch": Setting(8, 2, "batch of the large size"),
    "repeats": Setting(5, 3, "repeats, each in a fresh worker"),
    "steps": Setting(10, 2, "timed steps per phase and repeat"),
    "warmup": Setting(2, 1, "untimed steps before them", minimum=0),
}
TIMES = ("fwd_bwd_ms", "fwd_ms", "nograd_fwd_ms")
PEAKS = ("fwd_bwd_peak_mb", "nograd_peak_mb")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="paper,large", help=f"comma-separated from {list(SIZES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {IMPLS}")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")


def prepare(s: argparse.Namespace, names: list[str]) -> list[str]:
    """The configurations of ``--configs`` (or all) restricted to ``--sizes`` and ``--impls``."""
    sizes = [x.strip() for x in s.sizes.split(",") if x.strip()]
    impls = [x.strip() for x in s.impls.split(",") if x.strip()]
    bad = [x for x in sizes if x not in SIZES] + [i for i in impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"unknown size/impl {bad}; sizes {list(SIZES)}, impls {list(IMPLS)}")
    if s.iterations < 1:
        raise SystemExit(f"--iterations must be >= 1, got {s.iterations}")
    chosen = {f"{size}-{impl}" for size in sizes for impl in impls}
    return [n for n in names if n not in CONFIGS or n in chosen]


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


def measure(name: str, s: argparse.Namespace) -> dict[str, Any]:
    import torch

    import reference_capsnet  # noqa: F401 - same imports in every worker
    import torchcaps

    size_name, impl = CONFIGS[name]
    size = SIZES[size_name]
    n_in, d_in, n_out, d_out = size
    batch = int(getattr(s, f"{size_name}_batch"))
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    layer = build_layer(impl, size, s.iterations, device)
    gen = torch.Generator().manual_seed(s.seed)
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
        "iterations": s.iterations,
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

    for _ in range(s.warmup):
        train_step()
    release_memory()
    memory.reset()  # the peak of the timed steps
    fwd, total = zip(*(train_step() for _ in range(s.steps)), strict=True)
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

    for _ in range(s.warmup):
        eval_step()
    release_memory()
    memory.reset()
    result["nograd_fwd_s"] = [eval_step() for _ in range(s.steps)]
    result["nograd_peak_mb"] = memory.peak_mb() - baseline
    result["memory_peak_since_start"] = memory.since_start
    for key in ("fwd_s", "fwd_bwd_s", "nograd_fwd_s"):
        result[key.replace("_s", "_ms")] = 1000.0 * median(result[key])
    return result


def check(s: argparse.Namespace) -> dict[str, Any]:
    """Both implementations on the same weights and input: same v, same gradients."""
    import torch

    import torchcaps

    out: dict[str, Any] = {"config": "check", "ok": True}
    for label, size, batch in (("small", (36, 8, 5, 16), 3), ("paper", SIZES["paper"], 2)):
        torch.manual_seed(s.seed)
        ours = build_layer("torchcaps", size, s.iterations, "cpu")
        theirs = build_layer("reference", size, s.iterations, "cpu")
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
    out["summary"] = (
        f"torchcaps == reference routing (paper size: max |dv| "
        f"{out['paper']['max_abs_diff_v']:.1e}, grad rel {out['paper']['max_rel_diff_grad_u']:.1e})"
    )
    return out


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def finish(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], s: argparse.Namespace
) -> Report:
    """Speed-ups (reference time / time) and memory ratios against the size's reference."""

    def reference(row: dict[str, Any]) -> str:
        return f"{CONFIGS[row['config']][0]}-reference"

    for key in TIMES:
        versus(rows, key, reference, key.replace("_ms", "_speedup_vs_reference"), inverse=True)
    for key in PEAKS:
        versus(rows, key, reference, key.replace("_mb", "_vs_reference"))
    fields = ("in_capsules", "in_dim", "out_capsules", "out_dim")
    sizes = {k: dict(zip(fields, v, strict=True)) for k, v in SIZES.items()}
    return Report(extra={"sizes": sizes})


def size_label(r: dict[str, Any]) -> str:
    s = r["shape"]
    return f"{r['size']} ({s['in_capsules']}x{s['in_dim']}D->{s['out_capsules']}x{s['out_dim']}D)"


SPEC = Spec(
    name="bench_routing",
    description="DenseCaps + DynamicRouting vs the reference DigitCaps: time and memory.",
    configs=CONFIGS,
    default_configs=list(CONFIGS),
    quick_configs=list(CONFIGS),
    settings=SETTINGS,
    add_arguments=add_arguments,
    prepare=prepare,
    measure=measure,
    check=check,
    first=("size", "impl", "batch", "shape"),
    medians=TIMES + PEAKS,
    finish=finish,
    progress=lambda r: (
        f"fwd+bwd {r['fwd_bwd_ms']:.1f} ms, no_grad fwd {r['nograd_fwd_ms']:.1f} ms, "
        f"peak {r['fwd_bwd_peak_mb']:.0f} MB"
    ),
    caption=lambda s: (
        f"medians of {s.repeats} repeats (per repeat: median of {s.steps} steps); speed-up = "
        "reference time / time; peak memory of the timed steps above the RSS with the layer "
        "and its input built"
    ),
    left=2,
    columns=[
        Column("size", size_label),
        Column("impl", "impl"),
        Column("batch", lambda r: str(r["batch"])),
        Column("fwd+bwd ms", "fwd_bwd_ms"),
        Column("speed-up", "fwd_bwd_speedup_vs_reference", ".2f", "x"),
        Column("fwd ms", "fwd_ms"),
        Column("no_grad fwd ms", "nograd_fwd_ms"),
        Column("speed-up", "nograd_fwd_speedup_vs_reference", ".2f", "x"),
        Column("fwd+bwd peak {mem}", "fwd_bwd_peak_mb", ".0f", memory=True),
        Column("no_grad peak {mem}", "nograd_peak_mb", ".0f", memory=True),
    ],
)

if __name__ == "__main__":
    sys.exit(run(SPEC))
