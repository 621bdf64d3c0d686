"""Forward/backward time and peak memory of torchcaps' routed layers vs straightforward versions.

    python benchmarks/bench_routing.py --quick
    python benchmarks/bench_routing.py --json routing.json

One case per (layer, size), each measured for two implementations on random input that requires
grad (squashed capsules; for the EM layers votes or poses and activations in (0, 1)):

- ``dynamic``: ``DenseCaps(N_in, D_in, N_out, D_out, routing=DynamicRouting(iterations))`` vs
  ``DigitCaps`` of ``benchmarks/reference_capsnet.py`` (``W`` (1, N_in, N_out, D_out, D_in)
  broadcast over the batch by ``matmul``, logits (B, N_in, N_out, 1), softmax over the parents);
- ``self_attention``: ``DenseCaps`` + ``SelfAttentionRouting(learned_prior=(N_in, N_out))`` vs
  ``reference_routing.SelfAttentionCaps``;
- ``inverted_dot_product``: ``DenseCaps`` + ``InvertedDotProductRouting(D_out)`` (2 rounds, the
  paper's) vs ``reference_routing.InvertedDotProductCaps``;
- ``convcaps``: ``ConvCaps2d`` + ``DynamicRouting(iterations)`` vs
  ``reference_routing.NaiveConvCaps`` (unfolded windows, ``DigitCaps`` over every output
  position at once, no chunking);
- ``em``: ``EMRouting(N_out, iterations)`` on random votes and activations vs
  ``reference_routing.NaiveEM`` (Procedure 1 by broadcasting over (B, N_in, N_out, P));
- ``conv_em``: ``ConvMatrixCaps2d(..., assignment="per_window")`` + ``EMRouting`` vs
  ``reference_routing.NaiveConvEMCaps`` (unfold, ``einsum`` votes, ``NaiveEM`` over every
  window at once). Per window, because that is what the straightforward version computes.

Measured per case and implementation:

- ``fwd+bwd``: ``v = layer(u)`` and ``v.backward(g)`` for a fixed random ``g`` (gradients
  flow into the weights and into ``u``, as inside a network; for the EM layers into both
  inputs, from both outputs);
- ``fwd``: the forward part of that step alone;
- ``no_grad fwd``: ``layer(u)`` under ``torch.no_grad()`` (evaluation).

Before timing, a check verifies on copied weights that both implementations of every layer
give the same ``v`` and input gradients. This file is the specification; the driver in
``_common.py`` runs each (case, implementation, repeat) in its own worker process, rotates the
order each repeat and reports medians over repeats. Peak memory: the RSS high-water mark of
the timed part of each phase (reset after the warm-up) above the RSS once the layer and its
input exist (so it counts activations, gradients and workspace, not the parameters), or the
CUDA allocator's peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
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
LAYERS = ("dynamic", "self_attention", "inverted_dot_product", "convcaps", "em", "conv_em")


@dataclass(frozen=True)
class Case:
    """One layer at one size. Dense layers: ``dims`` = (N_in, D_in, N_out, D_out); ``convcaps``:
    (N_in, D_in, H, W, N_out, D_out, kernel, stride, padding); ``em``: (N_in, N_out, P);
    ``conv_em``: (N_in, H, W, N_out, kernel, stride)."""

    layer: str
    size: str
    dims: tuple[int, ...]
    batch: int
    quick_batch: int
    what: str


CASES = {
    f"{c.layer}-{c.size}": c
    for c in (
        Case("dynamic", "paper", (1152, 8, 10, 16), 128, 128, "CapsNet's DigitCaps"),
        Case("dynamic", "large", (4608, 8, 100, 16), 8, 2, "more capsules and classes"),
        Case("self_attention", "paper", (16, 8, 10, 16), 16, 16, "Efficient-CapsNet's FCCaps"),
        Case("self_attention", "large", (1152, 8, 10, 16), 128, 32, "at CapsNet's size"),
        Case(
            "inverted_dot_product",
            "paper",
            (800, 16, 10, 16),
            128,
            32,
            "Tsai et al.'s class capsules",
        ),
        Case(
            "inverted_dot_product", "large", (4608, 8, 100, 16), 8, 2, "more capsules and classes"
        ),
        Case(
            "convcaps",
            "paper",
            (32, 16, 16, 16, 32, 16, 3, 2, 0),
            4,
            1,
            "Tsai et al.'s ConvCaps1 grid",
        ),
        Case("convcaps", "large", (16, 8, 32, 32, 16, 8, 3, 1, 1), 2, 1, "a 32x32 grid"),
        Case("em", "paper", (512, 5, 16), 32, 8, "smallNORB class capsules (4x4x32 -> 5)"),
        Case("em", "large", (1152, 10, 16), 32, 8, "6x6x32 children, 10 classes"),
        Case("conv_em", "paper", (32, 14, 14, 32, 3, 2), 4, 1, "smallNORB ConvCaps1 (A=B=C=D=32)"),
        Case("conv_em", "large", (32, 28, 28, 32, 3, 2), 2, 1, "ConvCaps1 on a 28x28 grid"),
    )
}
CONFIGS = {f"{case}-{impl}": (case, impl) for case in CASES for impl in IMPLS}
SETTINGS = {
    "repeats": Setting(5, 3, "repeats, each in a fresh worker"),
    "steps": Setting(10, 2, "timed steps per phase and repeat"),
    "warmup": Setting(2, 1, "untimed steps before them", minimum=0),
}
TIMES = ("fwd_bwd_ms", "fwd_ms", "nograd_fwd_ms")
PEAKS = ("fwd_bwd_peak_mb", "nograd_peak_mb")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated from {LAYERS}")
    p.add_argument("--sizes", default="paper,large", help="comma-separated from paper, large")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {IMPLS}")
    p.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="routing iterations (dynamic routing in dynamic, convcaps; EM in em, conv_em)",
    )
    p.add_argument(
        "--batch-chunk",
        type=_batch_chunk,
        default="auto",
        help="DenseCaps' batch_chunk in the dense torchcaps layers: auto, none or a number of "
        "examples (the evidence for the auto rule, docs/performance.md)",
    )


def _batch_chunk(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"auto, none or a positive int, got {text!r}")
    return value


def prepare(s: argparse.Namespace, names: list[str]) -> list[str]:
    """The configurations of ``--configs`` (or all) restricted to ``--layers``, ``--sizes`` and
    ``--impls``."""
    split = {
        k: [x.strip() for x in getattr(s, k).split(",") if x.strip()]
        for k in ("layers", "sizes", "impls")
    }
    known = {"layers": LAYERS, "sizes": ("paper", "large"), "impls": IMPLS}
    bad = [x for k, xs in split.items() for x in xs if x not in known[k]]
    if bad:
        raise SystemExit(f"unknown layer/size/impl {bad}; choices {known}")
    if s.iterations < 1:
        raise SystemExit(f"--iterations must be >= 1, got {s.iterations}")
    chosen = {
        f"{layer}-{size}-{impl}"
        for layer in split["layers"]
        for size in split["sizes"]
        for impl in split["impls"]
    }
    return [n for n in names if n not in CONFIGS or n in chosen]


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def build_layer(
    impl: str, case: Case, iterations: int, device: Any, batch_chunk: int | str | None = "auto"
) -> Any:
    import torchcaps

    if case.layer == "em":
        n_out = case.dims[1]
        if impl == "torchcaps":
            return torchcaps.EMRouting(n_out, iterations).to(device)
        import reference_routing as rr

        return rr.NaiveEM(n_out, iterations).to(device)
    if case.layer == "conv_em":
        n_in, _, _, n_out, k, stride = case.dims
        if impl == "torchcaps":
            routing = torchcaps.EMRouting(n_out, iterations)
            em_layer = torchcaps.ConvMatrixCaps2d(
                n_in, n_out, k, stride, routing=routing, assignment="per_window"
            )
            return em_layer.to(device)
        import reference_routing as rr

        return rr.NaiveConvEMCaps(n_in, n_out, k, stride, iterations).to(device)
    if case.layer == "convcaps":
        n_in, d_in, _, _, n_out, d_out, k, stride, pad = case.dims
        if impl == "torchcaps":
            routing = torchcaps.DynamicRouting(iterations)
            layer = torchcaps.ConvCaps2d(n_in, d_in, n_out, d_out, k, stride, pad, routing=routing)
        else:
            import reference_routing as rr

            layer = rr.NaiveConvCaps(n_in, d_in, n_out, d_out, k, stride, pad, iterations)
        return layer.to(device)
    n_in, d_in, n_out, d_out = case.dims
    if impl == "torchcaps":
        routing: Any = {
            "dynamic": lambda: torchcaps.DynamicRouting(iterations),
            "self_attention": lambda: torchcaps.SelfAttentionRouting(learned_prior=(n_in, n_out)),
            "inverted_dot_product": lambda: torchcaps.InvertedDotProductRouting(d_out),
        }[case.layer]()
        layer = torchcaps.DenseCaps(
            n_in, d_in, n_out, d_out, routing=routing, batch_chunk=batch_chunk
        )
        return layer.to(device)
    import reference_capsnet as ref
    import reference_routing as rr

    cls: Any = {
        "dynamic": lambda: ref.DigitCaps(n_in, d_in, n_out, d_out, iterations=iterations),
        "self_attention": lambda: rr.SelfAttentionCaps(n_in, d_in, n_out, d_out),
        "inverted_dot_product": lambda: rr.InvertedDotProductCaps(n_in, d_in, n_out, d_out),
    }[case.layer]
    return cls().to(device)


def input_shapes(case: Case, batch: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes of the inputs and of the outputs (and of their gradients)."""
    if case.layer == "em":
        n_in, n_out, p = case.dims
        return [(batch, n_in, n_out, p), (batch, n_in)], [(batch, n_out, p), (batch, n_out)]
    if case.layer == "conv_em":
        n_in, h, w, n_out, k, stride = case.dims
        h_out, w_out = (h - k) // stride + 1, (w - k) // stride + 1
        return (
            [(batch, n_in, h, w, 16), (batch, n_in, h, w)],
            [(batch, n_out, h_out, w_out, 16), (batch, n_out, h_out, w_out)],
        )
    if case.layer == "convcaps":
        n_in, d_in, h, w, n_out, d_out, k, stride, pad = case.dims
        h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return [(batch, n_in, h, w, d_in)], [(batch, n_out, h_out, w_out, d_out)]
    n_in, d_in, n_out, d_out = case.dims
    return [(batch, n_in, d_in)], [(batch, n_out, d_out)]


def make_inputs(case: Case, batch: int, gen: Any) -> list[Any]:
    """Random inputs: squashed capsules, or votes/poses and activations in (0, 1)."""
    import torch

    import torchcaps

    shapes, _ = input_shapes(case, batch)
    if case.layer in ("em", "conv_em"):
        return [torch.randn(shapes[0], generator=gen), torch.rand(shapes[1], generator=gen)]
    return [torchcaps.squash(torch.randn(shapes[0], generator=gen))]


def call(layer: Any, case: Case, inputs: list[Any]) -> tuple[Any, ...]:
    """The layer's outputs as a tuple (the matrix-capsule layers take and give pairs)."""
    if case.layer == "conv_em" and not hasattr(layer, "W"):  # torchcaps: a MatrixCapsules pair
        from torchcaps.layers import MatrixCapsules

        return tuple(layer(MatrixCapsules(*inputs)))
    out = layer(*inputs)
    return tuple(out) if isinstance(out, tuple) else (out,)


def copy_weights(ours: Any, theirs: Any) -> None:
    """Give the reference the torchcaps layer's weights (and prior, layer norm)."""
    import torch

    with torch.no_grad():
        em = ours if hasattr(ours, "beta_u") else getattr(ours, "routing", None)
        if hasattr(em, "beta_u"):  # the EM layers: betas and (conv) the 4x4 matrices
            theirs.beta_u.copy_(em.beta_u)
            theirs.beta_a.copy_(em.beta_a)
            if hasattr(theirs, "W"):
                theirs.W.copy_(ours.weight)
            return
        w = ours.weight_matrices
        theirs.W.copy_(w.reshape(1, -1, *w.shape[-3:]))
        routing = ours.routing
        if getattr(routing, "prior", None) is not None:
            theirs.B.copy_(routing.prior)
        if hasattr(theirs, "norm"):
            theirs.norm.load_state_dict(routing.norm.state_dict())


def measure(name: str, s: argparse.Namespace) -> dict[str, Any]:
    import torch

    import reference_capsnet  # noqa: F401 - same imports in every worker

    case_name, impl = CONFIGS[name]
    case = CASES[case_name]
    batch = case.quick_batch if s.quick else case.batch
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    layer = build_layer(impl, case, s.iterations, device, s.batch_chunk)
    gen = torch.Generator().manual_seed(s.seed)
    u_shapes, v_shapes = input_shapes(case, batch)
    inputs = [u.to(device).requires_grad_(True) for u in make_inputs(case, batch, gen)]
    grads = [torch.randn(shape, generator=gen).to(device) for shape in v_shapes]
    memory = PeakMemory(device)
    release_memory()
    baseline = memory.current_mb()
    result: dict[str, Any] = {
        "config": name,
        "case": case_name,
        "layer": case.layer,
        "size": case.size,
        "impl": impl,
        "batch": batch,
        "input_shape": list(u_shapes[0]),
        "output_shape": list(v_shapes[0]),
        "iterations": s.iterations,
        "batch_chunk": s.batch_chunk if impl == "torchcaps" else None,
        "num_parameters": sum(p.numel() for p in layer.parameters()),
    }

    # ---- forward + backward ----
    def train_step() -> tuple[float, float]:
        layer.zero_grad(set_to_none=True)
        for u in inputs:
            u.grad = None
        synchronize(device)
        t0 = time.perf_counter()
        outputs = call(layer, case, inputs)
        synchronize(device)
        t1 = time.perf_counter()
        torch.autograd.backward(outputs, grads)
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
    for u in inputs:
        u.grad = None

    def eval_step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            call(layer, case, inputs)
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
    """Both implementations of every layer on the same weights and input: same v and input
    gradients (at the paper size, batch 2; and at a small size)."""
    import torch

    small = {
        "dynamic": (36, 8, 5, 16),
        "self_attention": (36, 8, 5, 16),
        "inverted_dot_product": (36, 8, 5, 16),
        "convcaps": (3, 4, 6, 5, 2, 5, 3, 2, 1),
        "em": (12, 4, 16),
        "conv_em": (3, 7, 6, 4, 3, 2),
    }
    out: dict[str, Any] = {"config": "check", "ok": True}
    worst = 0.0
    for layer in LAYERS:
        paper = CASES[f"{layer}-paper"]
        for label, case in (
            ("small", Case(layer, "small", small[layer], 3, 3, "")),
            ("paper", paper),
        ):
            torch.manual_seed(s.seed)
            ours = build_layer("torchcaps", case, s.iterations, "cpu")
            theirs = build_layer("reference", case, s.iterations, "cpu")
            if layer == "self_attention":  # a non-zero prior, so that it is checked
                torch.nn.init.normal_(ours.routing.prior, std=0.1)
            if layer in ("em", "conv_em"):  # non-zero betas, so that they are checked
                em = ours if layer == "em" else ours.routing
                torch.nn.init.normal_(em.beta_u, std=0.5)
                torch.nn.init.normal_(em.beta_a, std=3.0)
            copy_weights(ours, theirs)
            gen = torch.Generator().manual_seed(s.seed)
            inputs = [u.requires_grad_(True) for u in make_inputs(case, 2, gen)]
            gs = [torch.randn(shape, generator=gen) for shape in input_shapes(case, 2)[1]]
            results = []
            for impl_layer in (ours, theirs):
                vs = call(impl_layer, case, inputs)
                results.append((vs, torch.autograd.grad(vs, inputs, gs)))
            (v_ours, g_ours), (v_ref, g_ref) = results
            diff_v = max(float((a - b).detach().abs().max()) for a, b in zip(v_ours, v_ref))
            diff_g = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                for a, b in zip(g_ours, g_ref)
            )
            out[f"{layer}-{label}"] = {"max_abs_diff_v": diff_v, "max_rel_diff_grad_u": diff_g}
            out["ok"] = out["ok"] and diff_v < 1e-4 and diff_g < 1e-3
            worst = max(worst, diff_v)
    out["summary"] = f"torchcaps == reference for every layer (max |dv| {worst:.1e})"
    return out


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def finish(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], s: argparse.Namespace
) -> Report:
    """Speed-ups (reference time / time) and memory ratios against the size's reference."""

    def reference(row: dict[str, Any]) -> str:
        return f"{row['case']}-reference"

    for key in TIMES:
        versus(rows, key, reference, key.replace("_ms", "_speedup_vs_reference"), inverse=True)
    for key in PEAKS:
        versus(rows, key, reference, key.replace("_mb", "_vs_reference"))
    cases = {k: {"layer": c.layer, "dims": c.dims, "what": c.what} for k, c in CASES.items()}
    return Report(extra={"cases": cases})


def case_label(r: dict[str, Any]) -> str:
    """``layer size (N_in x D_in -> N_out x D_out)``, with the grids for convcaps."""
    case = CASES[r["case"]]
    if case.layer == "em":
        n_in, n_out, p = case.dims
        shape = f"{n_in} -> {n_out} capsules, P={p}"
    elif case.layer == "conv_em":
        n_in, h, w, n_out, k, stride = case.dims
        _, _, h2, w2, _ = r["output_shape"]
        shape = f"{n_in} types {h}x{w} -> {n_out} types {h2}x{w2}, k{k} s{stride}"
    elif case.layer == "convcaps":
        _, n_in, h, w, d_in = r["input_shape"]
        _, n_out, h2, w2, d_out = r["output_shape"]
        k, stride, pad = case.dims[6:]
        shape = f"{n_in}x{d_in}D {h}x{w} -> {n_out}x{d_out}D {h2}x{w2}, k{k} s{stride} p{pad}"
    else:
        n_in, d_in, n_out, d_out = case.dims
        shape = f"{n_in}x{d_in}D -> {n_out}x{d_out}D"
    return f"{case.layer} {case.size} ({shape})"


SPEC = Spec(
    name="bench_routing",
    description="torchcaps' routed layers vs straightforward versions: time and memory.",
    configs=CONFIGS,
    default_configs=list(CONFIGS),
    # --quick (CI: do they run?): dynamic and ConvCaps2d at the paper sizes; the check before
    # timing still runs every layer
    quick_configs=[n for n in CONFIGS if n.startswith(("dynamic-paper-", "convcaps-paper-"))],
    settings=SETTINGS,
    add_arguments=add_arguments,
    prepare=prepare,
    measure=measure,
    check=check,
    first=("case", "layer", "size", "impl", "batch", "input_shape", "output_shape"),
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
        Column("case", case_label),
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
