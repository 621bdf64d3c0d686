"""Training epoch time of the reference models on one CUDA device, in one call; writes JSON.

    python benchmarks/bench_gpu.py --json benchmarks/gpu.json        # on a GPU, < 5 minutes
    python benchmarks/bench_gpu.py --quick --device cpu              # the CI smoke run

For each model (the paper's CapsNet, ``examples/mnist_capsnet.py``, batch 128; Efficient-CapsNet,
``examples/efficient_capsnet_mnist.py``, its recipe's batch 16) and each configuration
(``fp32``; ``bf16`` autocast; ``bf16-compile``: ``torch.compile`` of the model; and
``bf16-cudagraphs``: ``torch.compile(mode="reduce-overhead")``, which replays the compiled
step as CUDA graphs) the script builds the example's own ``engine.Trainer`` on the embedded
sample (the digits held on the device, as in training), runs ``--warmup`` steps (compilation,
graph capture), then times ``--steps`` training steps of the harness (``Task.train_batch`` +
``engine.train_step``: forward, loss, backward, Adam) between device synchronisations.

The epoch time is the time of MNIST's 60,000 training images at the timed rate (the steps of
one epoch, ``60000 // batch``, times the median step of ``--repeats`` timed blocks), not a
separate full pass. Configurations that fail (no compiler on the machine, say) are recorded
with their error and the run goes on; the whole run stops starting new configurations after
``--budget`` seconds. ``--quick`` (CPU in CI): eager configurations only, two steps, small
batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from _common import EXAMPLES_DIR, format_machine_info, machine_info, synchronize

MNIST_TRAIN_IMAGES = 60_000
MODELS = {"capsnet": "mnist_capsnet", "efficient_capsnet": "efficient_capsnet_mnist"}
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "none", "compile": None},
    "bf16": {"amp": "bf16", "compile": None},
    "bf16-compile": {"amp": "bf16", "compile": "default"},
    "bf16-cudagraphs": {"amp": "bf16", "compile": "reduce-overhead"},
}
QUICK_CONFIGS = ["fp32", "bf16"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help="torch device")
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of " + str(list(MODELS))
    )
    p.add_argument("--configs", default=None, help="comma-separated, of " + str(list(CONFIGS)))
    p.add_argument("--quick", action="store_true", help="CI smoke run (see the module docstring)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per block (default 50, quick 2)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed blocks (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 15, quick 1)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="override every model's batch (quick: 8)"
    )
    p.add_argument(
        "--budget", type=float, default=240.0, help="seconds after which no new config starts"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    for name, full, small in (("steps", 50, 2), ("repeats", 3, 1), ("warmup", 15, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.batch_size is None and quick:
        args.batch_size = 8
    if args.configs is None:
        args.configs = ",".join(QUICK_CONFIGS if quick else CONFIGS)
    return args


class Run:
    """One model in one configuration: the example's Trainer and its training step."""

    def __init__(self, model: str, config: str, args: argparse.Namespace) -> None:
        import engine

        module = __import__(MODELS[model])
        cfg = CONFIGS[config]
        argv = ["--embedded-sample", "--quiet", "--device", args.device, "--seed", str(args.seed)]
        argv += ["--amp", cfg["amp"]]
        if args.batch_size is not None:
            argv += ["--batch-size", str(args.batch_size)]
        self.engine = engine
        self.trainer = tr = engine.Trainer(
            module.parse_args(argv), module.RECIPE, log=lambda *a, **k: None
        )
        ctx = tr.step_context
        if cfg["compile"] is not None:
            ctx = dataclasses.replace(ctx, model=torch.compile(tr.model, mode=cfg["compile"]))
        self.ctx = ctx
        self.ctx.model.train()
        self.batch_size = tr.args.batch_size
        self.num_parameters = tr.num_parameters
        self._batches = tr.batches()

    def step(self) -> None:
        self.trainer.step(next(self._batches), self.ctx)


def measure(model: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    start = time.perf_counter()
    run = Run(model, config, args)
    for _ in range(args.warmup):
        run.step()
    synchronize(device)
    warm_s = time.perf_counter() - start
    blocks = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            run.step()
        synchronize(device)
        blocks.append((time.perf_counter() - t0) / args.steps)
    step_s = sorted(blocks)[len(blocks) // 2]
    steps_per_epoch = MNIST_TRAIN_IMAGES // run.batch_size
    return {
        "model": model,
        "config": config,
        "batch_size": run.batch_size,
        "parameters": run.num_parameters,
        "warmup_s": round(warm_s, 3),
        "step_ms": round(1e3 * step_s, 3),
        "step_ms_blocks": [round(1e3 * b, 3) for b in blocks],
        "images_per_s": round(run.batch_size / step_s, 1),
        "epoch_s": round(steps_per_epoch * step_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = _settings(build_parser().parse_args(argv))
    sys.path.insert(0, str(EXAMPLES_DIR))
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for name, known in (("--models", MODELS), ("--configs", CONFIGS)):
        bad = [v for v in (models if name == "--models" else configs) if v not in known]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {list(known)}")
    info = machine_info(args.device)
    print(format_machine_info(info), flush=True)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    print(
        f"{'model':18s} {'config':16s} {'batch':>5s} {'img/s':>9s} {'step ms':>9s} {'epoch s':>8s}"
    )
    for model in models:
        for config in configs:
            if time.perf_counter() - start > args.budget:
                results.append({"model": model, "config": config, "skipped": "over --budget"})
                print(f"{model:18s} {config:16s} skipped (over --budget)", flush=True)
                continue
            try:
                r = measure(model, config, args)
            except Exception as e:  # record and go on: one broken config must not lose the rest
                r = {"model": model, "config": config, "error": f"{type(e).__name__}: {e}"}
                r["traceback"] = traceback.format_exc(limit=5)
                print(f"{model:18s} {config:16s} failed: {r['error']}", flush=True)
            else:
                print(
                    f"{model:18s} {config:16s} {r['batch_size']:5d} {r['images_per_s']:9.1f} "
                    f"{r['step_ms']:9.2f} {r['epoch_s']:8.2f}",
                    flush=True,
                )
            results.append(r)
            if torch.cuda.is_available() and args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    total = time.perf_counter() - start
    print(f"total {total:.1f} s")
    if args.json is not None:
        settings = {
            k: getattr(args, k) for k in ("steps", "repeats", "warmup", "batch_size", "quick")
        }
        doc = {
            "machine": info,
            "settings": settings,
            "total_s": round(total, 1),
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any("error" in r for r in results) and args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
