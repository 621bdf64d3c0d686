"""Conv2dCaps' convolution: ``conv_impl="native"`` (oneDNN) against ``"matmul"`` (per-tap GEMMs).

    python benchmarks/bench_conv.py --quick
    python benchmarks/bench_conv.py --json conv.json

For each layer shape, a ``Conv2dCaps`` built once with each ``conv_impl`` (same weights) runs

- ``fwd``: the forward pass under ``torch.no_grad()`` (evaluation);
- ``fwd+bwd``: forward and backward into the input and the weights (training);

in float32 on channels-last input (what a preceding channels-last ``nn.Conv2d`` gives).
Implementations alternate within each repeat; medians over repeats. Before timing, both
implementations' outputs and gradients are compared: the largest absolute difference of
output, input gradient and weight gradient, each relative to the native result's largest
magnitude, is printed.

The ``auto`` column says which implementation ``conv_impl="auto"`` picks for the shape, so
the table is also the evidence for that rule (``torchcaps.layers._tap_matmul.MIN_CHANNELS``/``MIN_TAPS``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    busy_warning,
    fmt,
    format_machine_info,
    format_table,
    log,
    machine_info,
    median,
    timed,
    write_json,
)
from torchcaps import Conv2dCaps
from torchcaps.layers._tap_matmul import auto_prefers_tap_matmul

# name, batch, in_channels, out_capsules, capsule_dim, kernel, stride, padding, input size
SHAPES: list[tuple[str, int, int, int, int, int, int, int, int]] = [
    ("paper PrimaryCaps: 256ch 9x9 s2 20x20", 128, 256, 32, 8, 9, 2, 0, 20),
    ("256ch 9x9 s1 14x14", 64, 256, 32, 8, 9, 1, 0, 14),
    ("256ch 7x7 s2 20x20", 128, 256, 32, 8, 7, 2, 0, 20),
    ("256ch 5x5 s2 20x20", 128, 256, 32, 8, 5, 2, 0, 20),
    ("128ch 9x9 s2 20x20", 128, 128, 16, 8, 9, 2, 0, 20),
    ("256ch 3x3 s1 p1 16x16", 64, 256, 32, 8, 3, 1, 1, 16),
    ("64ch 3x3 s1 p1 32x32", 64, 64, 8, 8, 3, 1, 1, 32),
    ("32ch 9x9 s2 20x20", 128, 32, 4, 8, 9, 2, 0, 20),
]


def build(shape: tuple[Any, ...], impl: str, state: dict[str, torch.Tensor] | None) -> Conv2dCaps:
    _, _, c, n, d, k, s, p, _ = shape
    layer = Conv2dCaps(c, n, d, kernel_size=k, stride=s, padding=p, conv_impl=impl)
    if state is not None:
        layer.load_state_dict(state)
    return layer


def measure(shape: tuple[Any, ...], repeats: int, steps: int) -> dict[str, Any]:
    name, b, c, _, _, _, _, _, size = shape
    torch.manual_seed(0)
    x = torch.randn(b, c, size, size).contiguous(memory_format=torch.channels_last)
    native = build(shape, "native", None)
    layers = {"native": native, "matmul": build(shape, "matmul", native.state_dict())}
    grad = torch.randn_like(native(x))

    # Agreement check (also the warm-up).
    outs = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad)
        outs[impl] = (y.detach(), xi.grad, layer.conv.weight.grad)
        layer.zero_grad(set_to_none=True)
    diff = max(
        float((a - b_).abs().max() / b_.abs().max())
        for a, b_ in zip(outs["matmul"], outs["native"], strict=True)
    )

    times: dict[str, dict[str, list[float]]] = {i: {"fwd": [], "fwd+bwd": []} for i in layers}
    xg = x.clone().requires_grad_()
    for _ in range(repeats):
        for impl, layer in layers.items():

            def fwd(layer: Conv2dCaps = layer) -> None:
                with torch.no_grad():
                    layer(x)

            def train(layer: Conv2dCaps = layer) -> None:
                layer(xg).backward(grad)

            times[impl]["fwd"].append(sum(timed(fwd, "cpu") for _ in range(steps)) / steps)
            times[impl]["fwd+bwd"].append(sum(timed(train, "cpu") for _ in range(steps)) / steps)
            layer.zero_grad(set_to_none=True)
            xg.grad = None
    result: dict[str, Any] = {
        "shape": name,
        "batch": b,
        "auto": "matmul" if auto_prefers_tap_matmul(x, native.conv.weight) else "native",
        "max_rel_diff": diff,
    }
    for impl in layers:
        for phase in ("fwd", "fwd+bwd"):
            result[f"{impl} {phase} ms"] = 1e3 * median(times[impl][phase])
    for phase in ("fwd", "fwd+bwd"):
        result[f"speed-up {phase}"] = result[f"native {phase} ms"] / result[f"matmul {phase} ms"]
    log(f"{name}: done")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats per implementation")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per repeat")
    parser.add_argument("--quick", action="store_true", help="two shapes, one timed call")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    print(format_machine_info(info))
    warning = busy_warning(info)
    if warning:
        print(warning)
    shapes = SHAPES[:1] + SHAPES[-1:] if args.quick else SHAPES
    steps = 1 if args.quick else args.steps
    results = [measure(shape, args.repeats, steps) for shape in shapes]
    headers = [
        "shape",
        "batch",
        "auto",
        "native fwd ms",
        "matmul fwd ms",
        "speed-up",
        "native fwd+bwd ms",
        "matmul fwd+bwd ms",
        "speed-up",
        "max rel. diff",
    ]
    rows = [
        [
            r["shape"],
            str(r["batch"]),
            r["auto"],
            fmt(r["native fwd ms"]),
            fmt(r["matmul fwd ms"]),
            fmt(r["speed-up fwd"], ".2f", "x"),
            fmt(r["native fwd+bwd ms"]),
            fmt(r["matmul fwd+bwd ms"]),
            fmt(r["speed-up fwd+bwd"], ".2f", "x"),
            fmt(r["max_rel_diff"], ".1e"),
        ]
        for r in results
    ]
    print(format_table(headers, rows, left=3))
    if args.json:
        write_json(args.json, {"machine": info, "results": results, "repeats": args.repeats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
