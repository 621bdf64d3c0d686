"""Conv2dCaps' convolution: ``conv_impl="native"`` (oneDNN) against ``"matmul"`` (per-tap GEMMs).

    python benchmarks/bench_conv.py --quick
    python benchmarks/bench_conv.py --json conv.json
    python benchmarks/bench_conv.py --amp bf16 --configs "paper PrimaryCaps: 256ch 9x9 s2 20x20"

For each layer shape, a ``Conv2dCaps`` built with each ``conv_impl`` (same weights) runs

- ``fwd``: the forward pass under ``torch.no_grad()`` (evaluation);
- ``fwd+bwd``: forward and backward into the input and the weights (training);

in float32 on channels-last input (what a preceding channels-last ``nn.Conv2d`` gives), or with
``--amp bf16`` under CPU bfloat16 autocast, as the examples' ``--amp bf16`` runs it: oneDNN's
bf16 convolution against bf16 tap products summed in float32 (on a CPU without bf16
instructions both are emulated; ``"auto"`` then picks float32 products).
This file is the specification; the driver in ``_common.py`` runs it in its own process
(``isolate=False``: a worker per shape would only repeat the imports), the shapes in a rotating
order within each repeat. Each (shape, repeat) builds both layers from the same seed, compares
their outputs and gradients (which is also the warm-up), then times the implementations one
after the other (per phase: the mean of ``--steps`` calls); medians over repeats. The
comparison, printed as ``max rel. diff``, is the largest absolute difference of output, input
gradient and weight gradient, each relative to the native result's largest magnitude.

The ``auto`` column says which implementation ``conv_impl="auto"`` picks for the shape, so
the table is also the evidence for that rule
(``torchcaps.layers._tap_matmul.MIN_CHANNELS``/``MIN_TAPS``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from _common import Column, Report, Setting, Spec, run, timed
from torchcaps import Conv2dCaps
from torchcaps.layers._tap_matmul import auto_tap_matmul_dtype

# name -> batch, in_channels, out_capsules, capsule_dim, kernel, stride, padding, input size
SHAPES: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "paper PrimaryCaps: 256ch 9x9 s2 20x20": (128, 256, 32, 8, 9, 2, 0, 20),
    "256ch 9x9 s1 14x14": (64, 256, 32, 8, 9, 1, 0, 14),
    "256ch 7x7 s2 20x20": (128, 256, 32, 8, 7, 2, 0, 20),
    "256ch 5x5 s2 20x20": (128, 256, 32, 8, 5, 2, 0, 20),
    "128ch 9x9 s2 20x20": (128, 128, 16, 8, 9, 2, 0, 20),
    "256ch 3x3 s1 p1 16x16": (64, 256, 32, 8, 3, 1, 1, 16),
    "64ch 3x3 s1 p1 32x32": (64, 64, 8, 8, 3, 1, 1, 32),
    "32ch 9x9 s2 20x20": (128, 32, 4, 8, 9, 2, 0, 20),
}
IMPLS = ("native", "matmul")
PHASES = ("fwd", "fwd_bwd")


def build(shape: tuple[int, ...], impl: str, state: dict[str, torch.Tensor] | None) -> Conv2dCaps:
    _, c, n, d, k, s, p, _ = shape
    layer = Conv2dCaps(c, n, d, kernel_size=k, stride=s, padding=p, conv_impl=impl)
    if state is not None:
        layer.load_state_dict(state)
    return layer


def measure(name: str, settings: argparse.Namespace) -> dict[str, Any]:
    """One repeat of one shape: build, compare (the warm-up), time both implementations."""
    shape = SHAPES[name]
    b, c, size, steps = shape[0], shape[1], shape[-1], settings.steps
    torch.manual_seed(settings.seed)
    x = torch.randn(b, c, size, size).contiguous(memory_format=torch.channels_last)
    native = build(shape, "native", None)
    layers = {"native": native, "matmul": build(shape, "matmul", native.state_dict())}
    amp = torch.autocast("cpu", torch.bfloat16, enabled=settings.amp == "bf16")
    with amp:
        grad = torch.randn_like(native(x), dtype=torch.float32)

    # Agreement check (also the warm-up).
    outs = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_()
        with amp:
            y = layer(xi)
        y.backward(grad.to(y.dtype))
        outs[impl] = tuple(t.float() for t in (y.detach(), xi.grad, layer.conv.weight.grad))
        layer.zero_grad(set_to_none=True)
    diff = max(
        float((a - b_).abs().max() / b_.abs().max())
        for a, b_ in zip(outs["matmul"], outs["native"], strict=True)
    )
    with amp:
        auto = _auto(x, native)
    result: dict[str, Any] = {
        "shape": name,
        "batch": b,
        "auto": auto,
        "max_rel_diff": diff,
    }
    xg = x.clone().requires_grad_()
    for impl, layer in layers.items():

        def fwd(layer: Conv2dCaps = layer) -> None:
            with torch.no_grad(), amp:
                layer(x)

        def train(layer: Conv2dCaps = layer) -> None:
            with amp:
                y = layer(xg)
            y.backward(grad.to(y.dtype))

        for phase, fn in zip(PHASES, (fwd, train), strict=True):
            result[f"{impl}_{phase}_ms"] = 1e3 * sum(timed(fn, "cpu") for _ in range(steps)) / steps
        layer.zero_grad(set_to_none=True)
        xg.grad = None
    return result


def _auto(x: torch.Tensor, layer: Conv2dCaps) -> str:
    """What ``conv_impl="auto"`` picks for ``layer`` on ``x`` (in the ambient autocast)."""
    dtype = auto_tap_matmul_dtype(x, layer.conv.weight)
    if dtype is None:
        return "native"
    return "matmul" if dtype == torch.float32 else f"matmul {str(dtype).removeprefix('torch.')}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        choices=("none", "bf16"),
        default="none",
        help="none: float32 (default); bf16: both implementations under CPU bf16 autocast",
    )


def finish(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], s: argparse.Namespace
) -> Report:
    """Speed-up of the per-tap matmuls: native time / matmul time, per phase."""
    for row in rows:
        for phase in PHASES:
            native, matmul = row[f"native_{phase}_ms"], row[f"matmul_{phase}_ms"]
            row[f"{phase}_speedup"] = native / matmul if native and matmul else None
    return Report()


SPEC = Spec(
    name="bench_conv",
    description=__doc__.split("\n\n")[0],
    configs=SHAPES,
    default_configs=list(SHAPES),
    quick_configs=[*list(SHAPES)[:1], *list(SHAPES)[-1:]],
    settings={
        "repeats": Setting(5, 5, "repeats per implementation"),
        "steps": Setting(3, 1, "timed calls per repeat"),
    },
    measure=measure,
    add_arguments=add_arguments,
    isolate=False,
    cpu_only=True,
    first=("shape", "batch", "auto", "max_rel_diff"),
    medians=[f"{impl}_{phase}_ms" for impl in IMPLS for phase in PHASES],
    finish=finish,
    progress=lambda r: (
        f"fwd+bwd native {r['native_fwd_bwd_ms']:.1f} ms, matmul {r['matmul_fwd_bwd_ms']:.1f} ms"
    ),
    caption=lambda s: (
        f"{'bf16 autocast' if s.amp == 'bf16' else 'float32'}; "
        f"medians of {s.repeats} repeats (per repeat: the mean of {s.steps} calls); speed-up = "
        "native time / matmul time; max rel. diff: matmul against native"
    ),
    left=3,
    columns=[
        Column("shape", "shape"),
        Column("batch", lambda r: str(r["batch"])),
        Column("auto", "auto"),
        Column("native fwd ms", "native_fwd_ms"),
        Column("matmul fwd ms", "matmul_fwd_ms"),
        Column("speed-up", "fwd_speedup", ".2f", "x"),
        Column("native fwd+bwd ms", "native_fwd_bwd_ms"),
        Column("matmul fwd+bwd ms", "matmul_fwd_bwd_ms"),
        Column("speed-up", "fwd_bwd_speedup", ".2f", "x"),
        Column("max rel. diff", "max_rel_diff", ".1e"),
    ],
)

if __name__ == "__main__":
    sys.exit(run(SPEC))
