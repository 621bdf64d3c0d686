"""The shared command line and epoch loop of the examples; also a script for any recipe.

    python examples/train.py --recipe mnist_capsnet --epochs 1      # = mnist_capsnet.py

Each example script (``mnist_capsnet.py``, ...) is a :class:`~presets.Recipe` handed to
:func:`run`: the model from :mod:`torchcaps.models`, the dataset, the loss, its defaults and its
own flags. A run writes ``metrics.jsonl``, ``config.json``, ``last.pt`` and ``best.pt`` to
``--out-dir``; ``--resume`` continues from ``last.pt`` on the same trajectory;
``torchrun --nproc_per_node=N`` trains data-parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Big CPU buffers on transparent huge pages: PyTorch's THP_MEM_ALLOC_ENABLE, read at its first
# allocation, so set before torch is imported. The EM layers' per-step buffers of hundreds of
# MB otherwise cost more in page faults than in arithmetic (docs/performance.md). Set
# THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

from engine import NonFiniteLossError, Trainer, accuracy_series, precision_summary
from loaders import DATA_DIR_HELP, DataError
from presets import Recipe, add_flag
from runtime import (
    CheckpointError,
    Dist,
    atomic_save,
    checkpoint_model,
    cpu_model,
    load_checkpoint,
    setup_distributed,
    truncate_metrics,
    write_json,
)


def get_args_parser(recipe: Recipe, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of ``recipe``'s example: the shared flags, then the recipe's own."""
    p = argparse.ArgumentParser(
        description=recipe.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    add_flag(
        p,
        "--batch-size",
        type=int,
        default=128,
        metavar="N",
        help="training batch size (global, across all processes)",
    )
    add_flag(
        p, "--test-batch-size", type=int, default=1000, metavar="N", help="evaluation batch size"
    )
    add_flag(p, "--epochs", type=int, default=15, metavar="N", help="number of epochs")
    add_flag(p, "--lr", type=float, default=0.001, help="Adam learning rate (the peak)")
    add_flag(
        p,
        "--lr-schedule",
        choices=("cosine", "exponential"),
        default="cosine",
        help="cosine: from --lr down to --lr-min-factor x --lr along a half cosine, updated "
        "after every batch over all --epochs; exponential: --lr multiplied by --lr-decay "
        "after every epoch",
    )
    add_flag(
        p,
        "--lr-decay",
        type=float,
        default=0.9,
        help="with --lr-schedule exponential: the learning rate multiplier applied after "
        "every epoch",
    )
    add_flag(
        p,
        "--lr-floor",
        type=float,
        default=0.0,
        help="with --lr-schedule exponential: the smallest learning rate (0: no floor)",
    )
    add_flag(
        p,
        "--lr-min-factor",
        type=float,
        default=0.01,
        help="with --lr-schedule cosine: the final learning rate as a fraction of --lr",
    )
    add_flag(p, "--no-cuda", action="store_true", help="never use CUDA (same as --device cpu)")
    add_flag(p, "--seed", type=int, default=1, help="random seed")
    add_flag(
        p,
        "--log-interval",
        type=int,
        default=10,
        metavar="N",
        help="batches between progress updates (the only host syncs of an epoch)",
    )
    datasets = (recipe.dataset, *recipe.alt_datasets)
    add_flag(
        p,
        "--dataset",
        choices=datasets,
        default=recipe.dataset,
        help="the dataset to train and test on",
    )
    add_flag(
        p,
        "--data-dir",
        type=Path,
        default=None,
        help="; ".join(
            (f"{d}: " if len(datasets) > 1 else "")
            + DATA_DIR_HELP.get(d, f"{d} root; default ./data")
            for d in datasets
        ),
    )
    add_flag(p, "--no-download", action="store_true", help="never download the dataset")
    add_flag(
        p,
        "--embedded-sample",
        action="store_true",
        help="use the embedded 5,000/1,000-image sample (not the full dataset)",
    )
    add_flag(
        p,
        "--device",
        default="auto",
        help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...",
    )
    add_flag(
        p,
        "--out-dir",
        type=Path,
        default=Path("runs") / recipe.name,
        help="the run's folder: metrics.jsonl, config.json, last.pt, best.pt",
    )
    add_flag(
        p,
        "--resume",
        action="store_true",
        help="continue from <out-dir>/last.pt (model, optimiser, schedule, RNG, epoch)",
    )
    add_flag(
        p,
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast precision of convolutions and decoder (routing stays float32); "
        "fp16 needs CUDA; bf16 runs float32 on CPUs without bf16 instructions (emulated bf16 is "
        "slower there; the log says so)",
    )
    add_flag(p, "--compile", action="store_true", help="torch.compile the model")
    add_flag(
        p,
        "--channels-last",
        choices=("auto", "yes", "no"),
        default="auto",
        help="channels_last memory format for the convolutions (auto: yes; "
        "measured faster on CPU and GPU)",
    )
    add_flag(
        p,
        "--max-train-samples",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N training images (smoke runs)",
    )
    add_flag(
        p,
        "--max-test-samples",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N test images (smoke runs)",
    )
    add_flag(
        p,
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads on CPU (default: leave PyTorch's choice)",
    )
    add_flag(
        p,
        "--malloc",
        choices=("auto", "keep", "system"),
        default="auto",
        help="keep: glibc's malloc keeps freed memory for reuse instead of unmapping large "
        "blocks (fewer page faults per step); system: leave malloc as it is; auto: keep when "
        "training on the CPU",
    )
    add_flag(
        p,
        "--max-steps",
        type=int,
        default=None,
        help="stop each epoch after N steps (smoke runs and tests)",
    )
    add_flag(p, "--quiet", action="store_true", help="no progress bar, only epoch lines")
    recipe.add_arguments(p)
    p.set_defaults(**recipe.defaults)
    return p


def parse_args(recipe: Recipe, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check ``argv`` for ``recipe`` (errors exit with the usage line)."""
    parser = get_args_parser(recipe)
    args = parser.parse_args(argv)
    for name in ("batch_size", "test_batch_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0, got {args.epochs}")
    for name in ("max_train_samples", "max_test_samples", "max_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (0 < args.lr_decay <= 1):
        parser.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if not (0 <= args.lr_floor < math.inf):
        parser.error(f"--lr-floor must be >= 0, got {args.lr_floor}")
    if not (0 <= args.lr_min_factor <= 1):
        parser.error(f"--lr-min-factor must be in [0, 1], got {args.lr_min_factor}")
    if args.embedded_sample and args.data_dir is not None:
        parser.error("--embedded-sample and --data-dir are mutually exclusive")
    try:  # the recipe checks its own flags
        recipe.model_kwargs(args)
        recipe.loss(args)
        if recipe.task is not None:
            recipe.task(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(
    recipe: Recipe, argv: Sequence[str] | None = None, log: Callable[..., Any] = print
) -> list[dict[str, Any]]:
    """Train as the command line says; return the metrics of the epochs run now."""
    args = parse_args(recipe, argv)
    dist_info = setup_distributed(args.device, args.no_cuda)
    try:
        return _run(args, recipe, log, dist_info)
    finally:
        if dist_info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resume(trainer: Trainer, path: Path, log: Callable[..., Any]) -> None:
    """Load ``path`` into ``trainer``, after checking that it is this run's model and schedule."""
    args = trainer.args
    # RNG states must stay CPU ByteTensors; load_state_dict moves the rest to the device.
    state = load_checkpoint(path, map_location="cpu")
    name, kwargs = checkpoint_model(state, path)
    if (name, kwargs) != (trainer.model_name, trainer.model_kwargs):
        raise CheckpointError(
            f"checkpoint {path} holds {name} with {kwargs}, this command line builds "
            f"{trainer.model_name} with {trainer.model_kwargs}: resume with the flags of the "
            "run that wrote it, or use another --out-dir"
        )
    saved = state.get("args", {})
    # Checkpoints without a saved --lr-schedule were trained with the exponential schedule.
    saved_schedule = saved.get("lr_schedule", "exponential")
    if saved_schedule != args.lr_schedule:
        raise CheckpointError(
            f"checkpoint {path} was trained with --lr-schedule {saved_schedule}, "
            f"cannot resume it with --lr-schedule {args.lr_schedule}"
        )
    # Checkpoints without a saved --dataset were trained on the recipe's own.
    saved_dataset = saved.get("dataset", trainer.recipe.dataset)
    if saved_dataset != args.dataset:
        raise CheckpointError(
            f"checkpoint {path} was trained on {saved_dataset}, cannot resume it with "
            f"--dataset {args.dataset}"
        )
    if args.lr_schedule == "cosine" and saved.get("epochs", args.epochs) != args.epochs:
        log(
            f"note: the cosine schedule is rebuilt for --epochs {args.epochs} (the checkpoint "
            f"was written by a run of --epochs {saved['epochs']}): the learning rate jumps "
            "to that curve; an uninterrupted run would differ"
        )
    trainer.load_state_dict(state)


def _sessions(config: Path, resume: bool, epoch: int, device_name: str) -> list[dict[str, Any]]:
    """The run's invocations for ``config.json``: those it recorded before (on ``--resume``)
    and this one (its start in UTC, its device, the epoch it starts from), so that a run
    carried across machines says where each part ran."""
    before: list[dict[str, Any]] = []
    if resume and config.is_file():
        with contextlib.suppress(ValueError, OSError):
            before = list(json.loads(config.read_text()).get("sessions") or [])
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [*before, {"started_utc": now, "device_name": device_name, "from_epoch": epoch}]


def _run(
    args: argparse.Namespace, recipe: Recipe, log: Callable[..., Any], dist_info: Dist
) -> list[dict[str, Any]]:
    trainer = Trainer(args, recipe, log, dist_info)
    log = trainer.log
    out: Path = args.out_dir
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if args.resume:
        _resume(trainer, out / "last.pt", log)
        if dist_info.main:
            truncate_metrics(metrics_path, trainer.epoch)
        log(f"resumed from {out / 'last.pt'} at epoch {trainer.epoch}")
    elif dist_info.main and metrics_path.exists():
        metrics_path.unlink()
    device_name = (
        torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else cpu_model()
    )
    if dist_info.main:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config.update(
            recipe=recipe.name,
            model_name=trainer.model_name,
            model_kwargs=trainer.model_kwargs,
            torch_version=torch.__version__,
            device=str(trainer.device),
            device_name=device_name,
            data=trainer.data_source,
            world_size=dist_info.world,
            num_threads=torch.get_num_threads(),
            num_parameters=trainer.num_parameters,
            python=platform.python_version(),
            sessions=_sessions(out / "config.json", args.resume, trainer.epoch, device_name),
        )
        write_json(out / "config.json", config)
    log(
        f"{type(trainer.model).__name__} ({trainer.model_name}): {trainer.num_parameters:,} "
        f"parameters ({trainer.num_parameters / 1e6:.1f}M); device {trainer.device} "
        f"({device_name}); data: {trainer.data_source}; {trainer.train_images.shape[0]} train / "
        f"{trainer.test_images.shape[0]} test images"
    )
    log(
        precision_summary(
            trainer.model, trainer.amp, trainer.device, requested=args.amp, compiled=args.compile
        )
    )
    progress = sys.stderr.isatty() and not args.quiet and dist_info.main
    history = []
    while trainer.epoch < args.epochs:
        lr = trainer.optimizer.param_groups[0]["lr"]
        tr = trainer.train_epoch(progress)
        if not trainer.schedule_per_step:
            trainer.scheduler.step()
        trainer.epoch += 1
        ev = trainer.evaluate()
        record = {"epoch": trainer.epoch, "lr": lr, **tr, **ev}
        improved = ev["test_accuracy"] > trainer.best_accuracy
        if improved:
            trainer.best_accuracy = ev["test_accuracy"]
        record["best_test_accuracy"] = trainer.best_accuracy
        if dist_info.main:
            state = trainer.state_dict()
            atomic_save(state, out / "last.pt")
            if improved:
                atomic_save(state, out / "best.pt")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        history.append(record)
        # a task's further test sets (e.g. affine_accuracy) after the test set's figures
        more = "".join(
            f"  {name} acc {values[0]:.2f}%"
            for name, values in accuracy_series([ev]).items()
            if name != "test"
        )
        log(
            f"epoch {trainer.epoch:3d}  train loss {tr['train_loss']:.5f}  "
            f"test loss {ev['test_loss']:.5f}  test acc {ev['test_accuracy']:.2f}% "
            f"({ev['test_errors']}/{ev['test_samples']} errors){more}  "
            f"{tr['train_images_per_second']:.0f} img/s  {tr['epoch_seconds']:.1f} s",
            flush=True,
        )
    return history


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """:func:`run`, with data, checkpoint and non-finite-loss errors as one ``error:`` line and
    exit code 2."""
    try:
        run(recipe, argv)
    except (DataError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def entry_points(
    recipe: Recipe,
) -> tuple[
    Callable[[], argparse.ArgumentParser],
    Callable[..., argparse.Namespace],
    Callable[..., list[dict[str, Any]]],
    Callable[..., int],
]:
    """``build_parser()``, ``parse_args(argv)``, ``run(argv, log)`` and ``main(argv)`` of an
    example script, bound to its ``recipe`` (what every script exports)."""

    def build_parser() -> argparse.ArgumentParser:
        return get_args_parser(recipe)

    def parse_args_(argv: Sequence[str] | None = None) -> argparse.Namespace:
        return parse_args(recipe, argv)

    def run_(
        argv: Sequence[str] | None = None, log: Callable[..., Any] = print
    ) -> list[dict[str, Any]]:
        return run(recipe, argv, log)

    def main_(argv: Sequence[str] | None = None) -> int:
        return main(recipe, argv)

    return build_parser, parse_args_, run_, main_


if __name__ == "__main__":
    import importlib

    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--recipe", default="mnist_capsnet")
    known, rest = chooser.parse_known_args()
    sys.exit(main(importlib.import_module(known.recipe).RECIPE, rest))
