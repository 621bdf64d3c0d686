"""A per-op profile of one ``bench_train.py`` configuration's training step, in this process.

    python benchmarks/profile_step.py --config torchcaps-bf16-cl
    python benchmarks/profile_step.py --config torchcaps-bf16-cl-compile --steps 3 --rows 30
    python benchmarks/profile_step.py --config torchcaps-bf16-cl --eval

It builds the configuration exactly as ``bench_train.py`` does (the same ``Workload``), runs
``--warmup`` untimed steps, times ``--timed`` steps one by one (printed sorted, so the spread
shows), then profiles ``--steps`` more with ``torch.profiler`` and prints the ops by self CPU
time (``--by-shape``: one line per op and input shapes, to tell the copies apart; ``--eval``:
the evaluation batch instead of the training step): which ops
dominate, which copies and casts remain, what still runs in float32. One process, one
configuration: for ratios between configurations use ``bench_train.py``, which interleaves
them in fresh workers.
"""

from __future__ import annotations

import argparse
import sys
import time

import bench_train
from _common import EXAMPLES_DIR, format_machine_info, machine_info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="torchcaps-bf16-cl", choices=sorted(bench_train.CONFIGS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--timed", type=int, default=5, help="steps timed one by one (default 5)")
    p.add_argument("--steps", type=int, default=3, help="steps profiled (default 3)")
    p.add_argument("--rows", type=int, default=25, help="ops printed (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval",
        action="store_true",
        help="profile the evaluation batch (batch --eval-batch-size) instead of the training step",
    )
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument(
        "--by-shape",
        action="store_true",
        help="record input shapes and list each op per input shape (which copy is which)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("warmup", "timed", "steps", "rows", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    from torch.profiler import ProfilerActivity, profile

    print(format_machine_info(machine_info("cpu")))
    cfg = bench_train.CONFIGS[args.config]
    settings = argparse.Namespace(
        device="cpu",
        seed=args.seed,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
    )
    kind = (
        bench_train.ReferenceWorkload
        if cfg["impl"] == "reference"
        else bench_train.TorchcapsWorkload
    )
    workload = kind(cfg, settings)
    step, batch, what = workload.train_step, args.batch_size, "step"
    if args.eval:
        step, batch, what = workload.eval_batch, args.eval_batch_size, "evaluation batch"
    print(f"config {args.config} (autocast {workload.amp}), {what} of {batch}")
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.timed):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = ", ".join(f"{1e3 * t:.0f}" for t in sorted(times))
    best = min(times)
    print(f"{what} ms, sorted: {ms} (best {batch / best:.1f} images/s)")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    print(f"ops over {args.steps} profiled calls, by self CPU time:")
    table = prof.key_averages(group_by_input_shape=args.by_shape).table(
        sort_by="self_cpu_time_total", row_limit=args.rows
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
