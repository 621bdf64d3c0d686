"""Training-step and evaluation throughput of the paper's CapsNet: torchcaps vs a plain reference.

    python benchmarks/bench_train.py --quick                  # a few minutes at most, batch 32
    python benchmarks/bench_train.py                          # batch 128, 5 repeats
    python benchmarks/bench_train.py --compile --json out.json

What one training step is, per configuration (all include the data pipeline):

- ``torchcaps-*``: the MNIST example's own pieces (``examples/mnist_capsnet.py``): its
  ``Trainer`` built on the embedded MNIST sample (uint8 digits held as one tensor on the
  device), one batch of indices from ``train_batches``, ``random_shift`` + ``to_input``,
  ``Trainer.loss`` (``CapsNet`` under the configured autocast, ``MarginLoss`` +
  ``ReconstructionLoss``), backward and the Adam step, exactly as ``Trainer.train_epoch`` does.
  ``-cl`` = channels_last, ``-bf16`` = ``torch.autocast(device, torch.bfloat16)``,
  ``-compile`` = ``torch.compile`` of the model (``--compile``), ``-native`` = PrimaryCaps with
  ``conv_impl="native"`` (torch's convolution; the others use ``"auto"``, which on CPU in
  float32 outside autocast and compile means per-tap matmuls), ``-whole`` = DigitCaps with
  ``batch_chunk=None`` (the whole batch routed at once; the others use ``"auto"``, which on
  CPU routes chunks of 22 examples).
- ``reference``: ``benchmarks/reference_capsnet.py``: a DataLoader over a Dataset of uint8
  images with per-sample torchvision transforms (Pad(2) + RandomCrop(28) + ToTensor), the plain
  CapsNet written from the paper, its loss, backward and Adam.

Evaluation: ``no_grad`` forward + loss + accuracy of ``--eval-batch-size`` (1000) images, the
decoder masked by the prediction (torchcaps: ``Trainer.loss(train=False)`` on ``to_input`` of
the on-device test digits; reference: a DataLoader with ToTensor).

Every (configuration, repeat) runs in its own worker process (this script with ``--worker``);
the parent alternates the configurations within each repeat (rotating the order) and reports
medians over the repeats. Peak memory is the RSS high-water mark of the timed part of each
phase (reset after the warm-up) above the worker's RSS after its imports (allocator peak on
CUDA). FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
and convolutions only), once per configuration, on the eager model with torch's convolution
in PrimaryCaps (the same arithmetic as ``conv_impl="matmul"``, whose in-place ``addmm_`` the
counter does not see); GFLOP/s = counted FLOPs per image x median
images/s, compared with the ``torch.mm`` ceiling of the same dtype measured in the same run
(large square matrices).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    EXAMPLES_DIR,
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

# name -> implementation, autocast, channels_last, torch.compile
CONFIGS: dict[str, dict[str, Any]] = {
    "reference": {"impl": "reference", "amp": "none", "channels_last": False, "compile": False},
    "torchcaps-fp32": {
        "impl": "torchcaps",
        "amp": "none",
        "channels_last": False,
        "compile": False,
    },
    "torchcaps-fp32-cl": {
        "impl": "torchcaps",
        "amp": "none",
        "channels_last": True,
        "compile": False,
    },
    "torchcaps-fp32-cl-native": {
        "impl": "torchcaps",
        "amp": "none",
        "channels_last": True,
        "compile": False,
        "conv_impl": "native",
    },
    "torchcaps-fp32-cl-whole": {
        "impl": "torchcaps",
        "amp": "none",
        "channels_last": True,
        "compile": False,
        "batch_chunk": None,
    },
    "torchcaps-bf16": {
        "impl": "torchcaps",
        "amp": "bf16",
        "channels_last": False,
        "compile": False,
    },
    "torchcaps-bf16-cl": {
        "impl": "torchcaps",
        "amp": "bf16",
        "channels_last": True,
        "compile": False,
    },
    "torchcaps-fp32-cl-compile": {
        "impl": "torchcaps",
        "amp": "none",
        "channels_last": True,
        "compile": True,
    },
    "torchcaps-bf16-cl-compile": {
        "impl": "torchcaps",
        "amp": "bf16",
        "channels_last": True,
        "compile": True,
    },
}
DEFAULT_CONFIGS = [
    "reference",
    "torchcaps-fp32",
    "torchcaps-fp32-cl-native",
    "torchcaps-fp32-cl-whole",
    "torchcaps-fp32-cl",
    "torchcaps-bf16-cl",
]
QUICK_CONFIGS = ["reference", "torchcaps-fp32-cl", "torchcaps-bf16-cl"]
COMPILE_CONFIGS = ["torchcaps-fp32-cl-compile", "torchcaps-bf16-cl-compile"]

# Settings of a full run and of --quick (each can still be overridden on the command line).
FULL = {
    "batch_size": 128,
    "repeats": 5,
    "steps": 10,
    "warmup": 2,
    "eval_batch_size": 1000,
    "eval_batches": 2,
}
QUICK = {
    "batch_size": 32,
    "repeats": 3,
    "steps": 3,
    "warmup": 1,
    "eval_batch_size": 250,
    "eval_batches": 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="CapsNet training/evaluation throughput: torchcaps vs a plain reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help=f"a short run: {QUICK} and configs {QUICK_CONFIGS}"
    )
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated configs from {list(CONFIGS)} "
        f"(default {DEFAULT_CONFIGS}; --quick: {QUICK_CONFIGS})",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help=f"also run {COMPILE_CONFIGS} (torch.compile; slow to warm up)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"training batch size (default {FULL['batch_size']}, --quick {QUICK['batch_size']})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"repeats per config, each in a fresh worker (default {FULL['repeats']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed training steps per repeat (default {FULL['steps']})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed training steps before them (default {FULL['warmup']})",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"evaluation batch size (default {FULL['eval_batch_size']}, "
        f"--quick {QUICK['eval_batch_size']})",
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help=f"timed evaluation batches per repeat (default {FULL['eval_batches']})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in the workers (default: PyTorch's choice)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers of the reference (0: with few cores workers only "
        "compete with the model for them)",
    )
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    p.add_argument(
        "--ceiling-size",
        type=int,
        default=None,
        help="square matrix size of the torch.mm ceiling (default 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check that the reference and torchcaps compute the same model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=3600.0,
        help="seconds after which a worker is abandoned",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Internal: run one measurement in this process.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "repeats", "steps", "eval_batch_size", "eval_batches"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.ceiling_size is None:
        args.ceiling_size = 8192 if args.device.startswith("cuda") else 2048
    return args


def selected_configs(args: argparse.Namespace) -> list[str]:
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
    else:
        names = list(QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    if args.compile:
        names += [c for c in COMPILE_CONFIGS if c not in names]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choices: {list(CONFIGS)}")
    return names


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def _import_example() -> Any:
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    import mnist_capsnet

    return mnist_capsnet


def _endless(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    while True:
        yield from make()


class Workload:
    """One configuration's training step and evaluation batch, built inside a worker."""

    batch_size: int
    eval_batch_size: int
    num_parameters: int
    net_is_compiled: bool = False

    def train_step(self) -> float:  # returns the loss (a host sync, once per step)
        raise NotImplementedError

    def eval_batch(self) -> int:  # returns the number of correct predictions
        raise NotImplementedError

    def release_optimizer(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run the eager (uncompiled) model inside the block (for counting FLOPs)."""
        yield


class TorchcapsWorkload(Workload):
    def __init__(self, cfg: dict[str, Any], args: argparse.Namespace) -> None:
        m = _import_example()
        self.m = m
        argv = [
            "--embedded-sample",
            "--device",
            args.device,
            "--quiet",
            "--batch-size",
            str(args.batch_size),
            "--test-batch-size",
            str(args.eval_batch_size),
            "--amp",
            cfg["amp"],
            "--channels-last",
            "yes" if cfg["channels_last"] else "no",
            "--seed",
            str(args.seed),
            "--conv-impl",
            cfg.get("conv_impl", "auto"),
        ]
        if cfg["compile"]:
            argv.append("--compile")
        self.trainer = m.Trainer(m.parse_args(argv), log=lambda *a, **k: None)
        tr = self.trainer
        if "batch_chunk" in cfg:
            from torchcaps import DenseCaps

            for mod in tr.model.modules():
                if isinstance(mod, DenseCaps):
                    mod.batch_chunk = cfg["batch_chunk"]
        self.device = tr.device
        self.batch_size = args.batch_size
        self.eval_batch_size = args.eval_batch_size
        self.num_parameters = tr.num_parameters
        self.net_is_compiled = bool(cfg["compile"])
        n = tr.train_images.shape[0]
        self.batches = _endless(lambda: m.train_batches(n, args.batch_size, tr.generator))
        n_test = tr.test_images.shape[0]
        if args.eval_batch_size > n_test:
            reps = math.ceil(args.eval_batch_size / n_test)
            tr.test_images = tr.test_images.repeat(reps, 1, 1)
            tr.test_labels = tr.test_labels.repeat(reps)

    def train_step(self) -> float:
        # The body of Trainer.train_epoch's loop.
        tr, m = self.trainer, self.m
        tr.net.train()
        idx = next(self.batches)
        images = m.to_input(m.random_shift(tr.train_images[idx], 2, tr.generator), tr.memory_format)
        labels = tr.train_labels[idx]
        loss, _ = tr.loss(images, labels, train=True)
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        return float(loss.detach())

    def eval_batch(self) -> int:
        # The body of Trainer.evaluate's loop.
        tr, m = self.trainer, self.m
        tr.net.eval()
        with self._no_grad():
            images = m.to_input(tr.test_images[: self.eval_batch_size], tr.memory_format)
            labels = tr.test_labels[: self.eval_batch_size]
            _, lengths = tr.loss(images, labels, train=False)
            return int((lengths.argmax(dim=1) == labels).sum())

    @staticmethod
    def _no_grad() -> contextlib.AbstractContextManager[Any]:
        import torch

        return torch.no_grad()

    def release_optimizer(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.optimizer.state.clear()

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        # Also torch's convolution in PrimaryCaps: the FLOPs are the model's whatever computes
        # them, and FlopCounterMode does not count the in-place addmm_ of conv_impl="matmul".
        from torchcaps import Conv2dCaps

        tr = self.trainer
        net = tr.net
        tr.net = tr.model
        caps = [mod for mod in tr.model.modules() if isinstance(mod, Conv2dCaps)]
        impls = [mod.conv_impl for mod in caps]
        for mod in caps:
            mod.conv_impl = "native"
        try:
            yield
        finally:
            tr.net = net
            for mod, impl in zip(caps, impls, strict=True):
                mod.conv_impl = impl


class ReferenceWorkload(Workload):
    def __init__(self, cfg: dict[str, Any], args: argparse.Namespace) -> None:
        import torch

        import reference_capsnet as ref

        m = _import_example()
        self.ref = ref
        data = m.load_embedded()  # the same 5,000/1,000 uint8 digits the torchcaps runs use
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.model = ref.build_model(self.device)
        self.optimizer = ref.build_optimizer(self.model)
        self.batch_size = args.batch_size
        self.eval_batch_size = args.eval_batch_size
        self.num_parameters = ref.count_parameters(self.model)
        test_images, test_labels = data.test_images, data.test_labels
        if args.eval_batch_size > len(test_labels):
            reps = math.ceil(args.eval_batch_size / len(test_labels))
            test_images, test_labels = test_images.repeat(reps, 1, 1), test_labels.repeat(reps)
        train_loader = ref.make_loader(
            data.train_images,
            data.train_labels,
            args.batch_size,
            train=True,
            num_workers=args.num_workers,
        )
        eval_loader = ref.make_loader(
            test_images,
            test_labels,
            args.eval_batch_size,
            train=False,
            num_workers=args.num_workers,
        )
        self.train_batches = ref.endless(train_loader)
        self.eval_batches = ref.endless(eval_loader)

    def train_step(self) -> float:
        images, labels = next(self.train_batches)
        images, labels = images.to(self.device), labels.to(self.device)
        return float(self.ref.train_step(self.model, self.optimizer, images, labels))

    def eval_batch(self) -> int:
        images, labels = next(self.eval_batches)
        images, labels = images.to(self.device), labels.to(self.device)
        _, correct = self.ref.eval_step(self.model, images, labels)
        return int(correct)

    def release_optimizer(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def _count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def worker_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torchvision  # noqa: F401 - imported here so that both kinds count the same imports

    import reference_capsnet  # noqa: F401

    _import_example()
    cfg = CONFIGS[name]
    device = torch.device(args.device)
    memory = PeakMemory(device)
    baseline = memory.current_mb()  # after imports, before data and model
    workload: Workload
    t0 = time.perf_counter()
    if cfg["impl"] == "reference":
        workload = ReferenceWorkload(cfg, args)
    else:
        workload = TorchcapsWorkload(cfg, args)
    build_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "config": name,
        **cfg,
        "num_parameters": workload.num_parameters,
        "build_s": build_s,
        "memory_after_imports_mb": baseline,
        "memory_after_build_mb": memory.current_mb() - baseline,
    }

    # ---- training ----
    if args.count_flops:
        with workload.eager():
            result["train_flops_per_step"] = _count_flops(workload.train_step)
    warmup = max(args.warmup, 2) if cfg["compile"] else args.warmup
    t0 = time.perf_counter()
    for _ in range(warmup):
        workload.train_step()
    result["train_warmup_s"] = time.perf_counter() - t0
    release_memory()
    memory.reset()  # the peak of the timed steps (compilation and first calls are excluded)
    step_s, losses = [], []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(workload.train_step())
        synchronize(device)
        step_s.append(time.perf_counter() - t0)
    result["train_peak_mb"] = memory.peak_mb() - baseline
    result["train_step_s"] = step_s
    result["train_images_per_s"] = args.batch_size * len(step_s) / sum(step_s)
    result["train_loss_last"] = losses[-1]
    result["train_loss_finite"] = all(math.isfinite(x) for x in losses)

    # ---- evaluation ----
    workload.release_optimizer()
    release_memory()
    eval_start = memory.current_mb()
    if args.count_flops:
        with workload.eager():
            result["eval_flops_per_batch"] = _count_flops(workload.eval_batch)
    t0 = time.perf_counter()
    workload.eval_batch()  # warm-up (first calls at this shape, or compilation)
    if cfg["compile"]:
        workload.eval_batch()
    result["eval_warmup_s"] = time.perf_counter() - t0
    release_memory()
    memory.reset()
    batch_s, correct = [], 0
    for _ in range(args.eval_batches):
        synchronize(device)
        t0 = time.perf_counter()
        correct += workload.eval_batch()
        synchronize(device)
        batch_s.append(time.perf_counter() - t0)
    result["eval_peak_mb"] = memory.peak_mb() - baseline
    result["eval_memory_before_mb"] = eval_start - baseline
    result["eval_batch_s"] = batch_s
    result["eval_images_per_s"] = args.eval_batch_size * len(batch_s) / sum(batch_s)
    result["eval_accuracy"] = correct / (args.eval_batch_size * len(batch_s))
    result["memory_peak_since_start"] = memory.since_start
    result["memory_kind"] = "cuda_allocated" if memory.cuda else "rss"
    return result


def worker_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """GFLOP/s of torch.mm on square matrices, fp32 and bf16 (best of a few calls)."""
    import torch

    device = torch.device(args.device)
    n = args.ceiling_size
    flops = 2.0 * n**3
    out: dict[str, Any] = {"config": "ceiling", "size": n}
    min_time = 0.3 if args.quick else 1.0
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        times: list[float] = []
        while len(times) < 3 or (sum(times) < min_time and len(times) < 50):
            synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        out[f"{label}_gflops"] = flops / min(times) / 1e9
        out[f"{label}_calls"] = len(times)
    return out


def worker_check(args: argparse.Namespace) -> dict[str, Any]:
    """Check that the reference and the example's CapsNet compute the same loss and gradients."""
    import torch

    import reference_capsnet as ref

    m = _import_example()
    torch.manual_seed(args.seed)
    ours = m.CapsNet()
    theirs = ref.build_model()
    ref.copy_from_torchcaps(theirs, ours)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 1, 4, 1])
    margin, recon = m.MarginLoss(), m.ReconstructionLoss()
    lengths, rec = ours(x, y)
    loss_ours = margin(lengths, y) + recon(rec, x)
    loss_ours.backward()
    v, rec_ref = theirs(x, y)
    loss_ref = ref.capsule_loss(x, y, v, rec_ref)
    loss_ref.backward()
    grad_ours = ours.digits.weight.grad
    grad_ref = theirs.digit_caps.W.grad[0].permute(0, 3, 1, 2).reshape(grad_ours.shape)
    with torch.no_grad():
        ours.eval()
        theirs.eval()
        lengths_eval, rec_eval = ours(x)
        v_eval, rec_ref_eval = theirs(x)
    checks = {
        "parameters": (m.count_parameters(ours), ref.count_parameters(theirs)),
        "loss": (float(loss_ours), float(loss_ref)),
        "max_abs_diff_lengths": float((lengths - v.norm(dim=-1)).abs().max()),
        "max_abs_diff_reconstruction_eval": float((rec_eval - rec_ref_eval).abs().max()),
        "max_abs_diff_lengths_eval": float((lengths_eval - v_eval.norm(dim=-1)).abs().max()),
        "max_rel_diff_grad_digitcaps": float(
            (grad_ours - grad_ref).abs().max() / grad_ref.abs().max()
        ),
        "max_rel_diff_grad_conv1": float(
            (ours.conv1.weight.grad - theirs.conv1.weight.grad).abs().max()
            / theirs.conv1.weight.grad.abs().max()
        ),
    }
    ok = (
        checks["parameters"][0] == checks["parameters"][1] == ref.PARAMETERS
        and math.isclose(*checks["loss"], rel_tol=1e-4)
        and checks["max_abs_diff_lengths"] < 1e-5
        and checks["max_abs_diff_lengths_eval"] < 1e-5
        and checks["max_abs_diff_reconstruction_eval"] < 1e-5
        and checks["max_rel_diff_grad_digitcaps"] < 1e-3
        and checks["max_rel_diff_grad_conv1"] < 1e-3
    )
    return {"config": "check", "ok": ok, **checks}


def run_as_worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker == "ceiling":
        result = worker_ceiling(args)
    elif args.worker == "check":
        result = worker_check(args)
    else:
        result = worker_model(args.worker, args)
    result["threads"] = torch.get_num_threads()
    emit_result(result)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace, name: str, count_flops: bool) -> list[str]:
    argv = [
        "--worker",
        name,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--eval-batch-size",
        str(args.eval_batch_size),
        "--eval-batches",
        str(args.eval_batches),
        "--device",
        args.device,
        "--num-workers",
        str(args.num_workers),
        "--seed",
        str(args.seed),
        "--ceiling-size",
        str(args.ceiling_size),
        "--repeats",
        "1",
    ]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    if count_flops:
        argv.append("--count-flops")
    return argv


def summarise(
    names: list[str],
    runs: dict[str, list[dict[str, Any]]],
    ceiling: dict[str, float | None],
    batch_size: int,
) -> list[dict[str, Any]]:
    rows = []
    ref_train = ref_eval = None
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        flops = next((r["train_flops_per_step"] for r in ok if "train_flops_per_step" in r), None)
        eval_flops = next(
            (r["eval_flops_per_batch"] for r in ok if "eval_flops_per_batch" in r), None
        )
        row: dict[str, Any] = {
            "config": name,
            "repeats_ok": len(ok),
            "errors": [r["error"] for r in runs[name] if "error" in r],
            "train_images_per_s": median([r["train_images_per_s"] for r in ok]),
            "train_images_per_s_range": spread([r["train_images_per_s"] for r in ok]),
            "eval_images_per_s": median([r["eval_images_per_s"] for r in ok]),
            "eval_images_per_s_range": spread([r["eval_images_per_s"] for r in ok]),
            "train_peak_mb": median([r["train_peak_mb"] for r in ok]),
            "eval_peak_mb": median([r["eval_peak_mb"] for r in ok]),
            "train_flops_per_image": flops / batch_size if flops else None,
            "eval_flops_per_image": None,
            "num_parameters": ok[0]["num_parameters"] if ok else None,
            "train_loss_finite": all(r["train_loss_finite"] for r in ok) if ok else None,
            "memory_peak_since_start": any(r["memory_peak_since_start"] for r in ok),
        }
        if eval_flops and ok:
            row["eval_flops_per_image"] = eval_flops / ok[0].get("eval_batch_size", 1)
        cfg = CONFIGS[name]
        ceil = ceiling.get("bf16" if cfg["amp"] == "bf16" else "fp32")
        ips = row["train_images_per_s"]
        row["train_gflops"] = (
            ips * row["train_flops_per_image"] / 1e9
            if ips and row["train_flops_per_image"]
            else None
        )
        row["ceiling_gflops"] = ceil
        row["percent_of_ceiling"] = (
            100.0 * row["train_gflops"] / ceil if row["train_gflops"] and ceil else None
        )
        if name == "reference":
            ref_train, ref_eval = row["train_images_per_s"], row["eval_images_per_s"]
        rows.append(row)
    for row in rows:
        row["train_vs_reference"] = (
            row["train_images_per_s"] / ref_train
            if ref_train and row["train_images_per_s"]
            else None
        )
        row["eval_vs_reference"] = (
            row["eval_images_per_s"] / ref_eval if ref_eval and row["eval_images_per_s"] else None
        )
    return rows


def render(rows: list[dict[str, Any]], mem_label: str) -> str:
    headers = [
        "config",
        "train img/s",
        "GFLOP/s",
        "% of ceiling",
        "x ref (train)",
        "eval img/s",
        "x ref (eval)",
        f"train peak {mem_label}",
        f"eval peak {mem_label}",
    ]
    table = []
    for r in rows:
        if not r["repeats_ok"]:
            table.append([r["config"], "failed", *["-"] * (len(headers) - 2)])
            continue
        mem_mark = "*" if r["memory_peak_since_start"] else ""
        table.append(
            [
                r["config"] + ("" if r["train_loss_finite"] else " (NaN loss!)"),
                fmt(r["train_images_per_s"]),
                fmt(r["train_gflops"]),
                fmt(r["percent_of_ceiling"], ".0f", "%"),
                fmt(r["train_vs_reference"], ".2f", "x"),
                fmt(r["eval_images_per_s"]),
                fmt(r["eval_vs_reference"], ".2f", "x"),
                fmt(r["train_peak_mb"], ".0f", mem_mark),
                fmt(r["eval_peak_mb"], ".0f", mem_mark),
            ]
        )
    return format_table(headers, table)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_settings(args)
    if args.worker:
        run_as_worker(args)
        return 0
    names = selected_configs(args)
    started = time.perf_counter()
    info = machine_info(args.device, args.threads)
    print(format_machine_info(info))
    warning = busy_warning(info)
    if warning:
        print(warning)
    print(
        f"settings: batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"eval batch {args.eval_batch_size} x {args.eval_batches}, {args.repeats} repeats, "
        f"configs {names}",
        flush=True,
    )

    check = None
    if not args.no_check:
        check = run_worker(SCRIPT, worker_argv(args, "check", False), args.worker_timeout)
        if "error" in check or not check.get("ok"):
            print(f"CHECK FAILED: the reference and torchcaps models differ: {check}")
            return 1
        log(
            f"check: reference == torchcaps CapsNet (loss {check['loss'][0]:.6f} vs "
            f"{check['loss'][1]:.6f}, {check['parameters'][0]:,} parameters each)"
        )

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    ceilings: list[dict[str, Any]] = []
    for repeat, name in interleaved(["ceiling", *names], args.repeats):
        result = run_worker(SCRIPT, worker_argv(args, name, repeat == 0), args.worker_timeout)
        result["repeat"] = repeat
        if name == "ceiling":
            ceilings.append(result)
            msg = (
                "failed: " + result["error"]
                if "error" in result
                else f"fp32 {result['fp32_gflops']:.1f}, bf16 {result['bf16_gflops']:.1f} GFLOP/s"
            )
        else:
            result["eval_batch_size"] = args.eval_batch_size
            runs[name].append(result)
            msg = (
                "failed: " + result["error"]
                if "error" in result
                else f"train {result['train_images_per_s']:.1f} img/s, "
                f"eval {result['eval_images_per_s']:.1f} img/s"
            )
        log(f"[repeat {repeat + 1}/{args.repeats}] {name}: {msg} ({result['wall_s']:.1f} s)")

    ok_ceil = [c for c in ceilings if "error" not in c]
    ceiling = {
        "fp32": median([c["fp32_gflops"] for c in ok_ceil]),
        "bf16": median([c["bf16_gflops"] for c in ok_ceil]),
    }
    rows = summarise(names, runs, ceiling, args.batch_size)
    mem_label = "MB" if not args.device.startswith("cuda") else "MB (alloc)"
    info["load_average_end"] = load_average()
    elapsed = time.perf_counter() - started

    print()
    print(
        f"torch.mm ceiling ({args.ceiling_size}x{args.ceiling_size}, median of best-of-call "
        f"per repeat): fp32 {fmt(ceiling['fp32'])} GFLOP/s, bf16 {fmt(ceiling['bf16'])} GFLOP/s"
    )
    flops = {r["config"]: r["train_flops_per_image"] for r in rows if r["train_flops_per_image"]}
    if flops:
        print(
            "counted FLOPs per training image (FlopCounterMode, matmul/conv only): "
            + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in flops.items())
        )
    print(
        f"medians of {args.repeats} repeats; batch {args.batch_size} (train), "
        f"{args.eval_batch_size} (eval); peak memory of the timed steps above the worker's "
        "RSS after imports"
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
                "batch_size",
                "repeats",
                "steps",
                "warmup",
                "eval_batch_size",
                "eval_batches",
                "threads",
                "num_workers",
                "device",
                "ceiling_size",
                "seed",
                "quick",
            )
        }
        write_json(
            args.json,
            {
                "benchmark": "bench_train",
                "machine": info,
                "settings": settings,
                "configs": names,
                "check": check,
                "ceiling_gflops": ceiling,
                "rows": rows,
                "raw": {"ceiling": ceilings, **runs},
                "total_s": elapsed,
            },
        )
        print(f"wrote {args.json}")
    return 0 if all(r["repeats_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
