"""The training loop of every example: batches, the step, an epoch, evaluation, schedules.

:func:`train_step` is the one training step (forward under autocast, loss, backward, optimiser
and scheduler); :func:`train_one_epoch` and ``benchmarks/bench_train.py`` both call it, so what
is timed is what is trained. :class:`Trainer` holds the state of a run (model, optimiser,
schedule, scaler, data RNG) and turns it into a checkpoint and back.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from augment import Augment
from loaders import load_dataset
from presets import LossFn, Recipe, Task
from runtime import Dist, keep_freed_memory, pick_device
from torchcaps.models import CapsuleOutput, get_model


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops (its last checkpoint is kept)."""


# Version of the checkpoint layout written by Trainer.state_dict (1: before the model registry,
# without model_name/model_kwargs; still readable).
CHECKPOINT_FORMAT = 2


def scaled(images: Tensor) -> Tensor:
    """uint8 (B, H, W) or (B, C, H, W) -> float (B, C, H, W) in [0, 1] (C = 1 for the first)."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    return x.float() / 255.0


def to_input(
    images: Tensor,
    memory_format: torch.memory_format,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """uint8 images -> the model's float input: :func:`scaled`, then ``transform`` if any."""
    x = scaled(images)
    if transform is not None:
        x = transform(x)
    return x.contiguous(memory_format=memory_format)


def train_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> Iterator[Tensor]:
    """Seeded shuffle; yield this rank's indices of each global batch (drop the last partial)."""
    perm = torch.randperm(n, generator=generator, device=generator.device)
    per_rank = batch_size // world
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start + rank * per_rank : start + (rank + 1) * per_rank]


def effective_amp(amp: str, device: torch.device) -> str:
    """The autocast precision a run uses for ``--amp amp`` on ``device``.

    ``bf16`` on a CPU without bf16 instructions (no AVX512-BF16 or AMX-BF16) becomes ``none``:
    there bf16 matmuls are emulated and slower than float32 (0.41x on a Xeon,
    benchmarks/RESULTS.md), so float32 is the fast path.
    """
    from torchcaps.layers._tap_matmul import cpu_has_bf16_instructions

    if amp == "bf16" and device.type == "cpu" and not cpu_has_bf16_instructions():
        return "none"
    return amp


def precision_summary(
    model: nn.Module,
    amp: str,
    device: torch.device,
    requested: str | None = None,
    compiled: bool = False,
) -> str:
    """Which precision each part of ``model`` computes in under ``--amp amp`` on ``device``.

    ``requested``: the ``--amp`` asked for, when :func:`effective_amp` changed it;
    ``compiled``: the model runs under ``torch.compile`` (whose graphs take torch's
    convolution, not the tap products). What ``Conv2dCaps(conv_impl="auto")`` does is asked
    of its own rule (``auto_tap_matmul_dtype``) under the run's autocast.
    """
    from torchcaps import Conv2dCaps
    from torchcaps.layers._tap_matmul import auto_tap_matmul_dtype, wide_enough

    if amp == "none":
        if requested is not None and requested != amp:
            return (
                f"precision: float32 throughout (--amp {requested} asked for, but this CPU has "
                "no bf16 instructions: emulated bf16 is slower than float32)"
            )
        return "precision: float32 throughout"
    parts = [f"precision: --amp {amp}: convolutions and linear layers in {amp} autocast"]
    wide = [
        m.conv.weight
        for m in model.modules()
        if isinstance(m, Conv2dCaps)
        and m.conv_impl == "auto"
        and m.groups == 1
        and wide_enough(m.conv.weight)
    ]
    if wide and device.type == "cpu" and amp == "bf16":
        if compiled:
            parts.append(f"wide Conv2dCaps as torch's convolution in {amp} (compiled)")
        else:
            with autocast_context(amp, device):
                chosen = {auto_tap_matmul_dtype(w.new_empty(1, w.shape[1], 1, 1), w) for w in wide}
            if torch.bfloat16 in chosen:
                parts.append("wide Conv2dCaps as bfloat16 tap products with float32 sums")
            elif torch.float32 in chosen:
                parts.append(
                    "wide Conv2dCaps in float32 (this CPU has no bf16 instructions: bf16 would "
                    "be emulated, slower than float32)"
                )
    parts.append("routing, squash and losses in float32")
    return "; ".join(parts)


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``--amp bf16``/``fp16``; nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepContext:
    """Everything a training step needs besides the batch."""

    model: nn.Module  # what is called: possibly compiled or DistributedDataParallel
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped after every batch
    amp: str
    device: torch.device
    # what the model's forward receives as target in training: the labels themselves, or
    # the task's part of its target object
    model_target: Callable[[Any], Tensor] | None = None


def forward_loss(
    ctx: StepContext, images: Tensor, labels: Any, *, train: bool
) -> tuple[Tensor, CapsuleOutput]:
    """Loss and output of a batch; in training the decoder is masked by the labels."""
    target = None
    if train:
        target = labels if ctx.model_target is None else ctx.model_target(labels)
    with autocast_context(ctx.amp, ctx.device):
        out = ctx.model(images, target)
    return ctx.loss_fn(out, images, labels), out


def train_step(ctx: StepContext, images: Tensor, labels: Any) -> Tensor:
    """One optimisation step on a batch; returns the loss (detached, not synchronised)."""
    loss, _ = forward_loss(ctx, images, labels, train=True)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    return loss.detach()


T = TypeVar("T")


class PerDataset(Generic[T]):
    """What a task derives from a dataset's tensors (a test set, a pair generator), built by
    ``build(images, labels)`` on first use and again only for other tensors (by identity)."""

    def __init__(self, build: Callable[[Tensor, Tensor], T]) -> None:
        self.build = build
        self._made: tuple[Tensor, T] | None = None

    def __call__(self, images: Tensor, labels: Tensor) -> T:
        if self._made is None or self._made[0] is not images:
            self._made = (images, self.build(images, labels))
        return self._made[1]


class Classification:
    """The :class:`~presets.Task` of a recipe without one: batch ``index`` is the augmented
    ``(images[index], labels[index])``, the labels are the model's target, and the evaluation
    is :func:`evaluate` (with the recipe's ``eval_transform``)."""

    def __init__(
        self, augment: Augment, eval_transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.augment = augment
        self.eval_transform = eval_transform

    def train_batch(
        self,
        images: Tensor,
        labels: Tensor,
        index: Tensor,
        generator: torch.Generator,
        rank: int,
        world: int,
    ) -> tuple[Tensor, Tensor]:
        return self.augment(scaled(images[index]), generator, rank, world), labels[index]

    def model_target(self, target: Tensor) -> Tensor:
        return target

    def evaluate(
        self,
        ctx: StepContext,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        memory_format: torch.memory_format,
    ) -> dict[str, float]:
        return evaluate(
            ctx,
            images,
            labels,
            batch_size=batch_size,
            memory_format=memory_format,
            transform=self.eval_transform,
        )


def task_step(
    ctx: StepContext,
    task: Task,
    images: Tensor,
    labels: Tensor,
    index: Tensor,
    *,
    generator: torch.Generator,
    memory_format: torch.memory_format,
    rank: int = 0,
    world: int = 1,
) -> Tensor:
    """One training step on batch ``index`` of the uint8 split: the task's batch, in
    ``memory_format``, through :func:`train_step` (the loss, detached, not synchronised)."""
    x, y = task.train_batch(images, labels, index, generator, rank, world)
    return train_step(ctx, x.contiguous(memory_format=memory_format), y)


def train_one_epoch(
    ctx: StepContext,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    steps: int,
    task: Task,
    generator: torch.Generator,
    memory_format: torch.memory_format,
    rank: int = 0,
    world: int = 1,
    on_log: Callable[[int, Tensor], None] | None = None,
    log_interval: int = 10,
    first_step: int = 0,
) -> dict[str, float]:
    """Train on ``steps`` shuffled batches; ``on_log(step, loss)`` every ``log_interval`` steps.

    ``task`` makes each batch from its indices (:class:`Classification` for a recipe without
    a task of its own).

    A loss with a ``set_step(step, steps_per_epoch)`` method is told the run's step number
    (``first_step`` + the step of this epoch) before every step, for schedules that move with
    training (the spread loss's margin).

    Every step records, on the device, whether its loss is finite; every ``log_interval`` steps
    (the only points that synchronise with the device) that record is read: a NaN or infinite
    loss raises :class:`NonFiniteLossError` naming the first step that had one, before anything
    is saved. Returns the mean loss of this process's batches, the seconds and the
    images per second.
    """
    ctx.model.train()
    total = torch.zeros((), device=ctx.device)
    first_bad = torch.zeros((), dtype=torch.long, device=ctx.device)  # 0: none yet, else step
    seen = 0
    start = time.perf_counter()
    batches = train_batches(images.shape[0], batch_size, generator, rank, world)
    set_step = getattr(ctx.loss_fn, "set_step", None)
    for step, index in enumerate(batches):
        if step >= steps:
            break
        if set_step is not None:
            set_step(first_step + step, steps)
        loss = task_step(
            ctx,
            task,
            images,
            labels,
            index,
            generator=generator,
            memory_format=memory_format,
            rank=rank,
            world=world,
        )
        total += loss
        seen += 1
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), step + 1, first_bad)
        if (step + 1) % log_interval == 0 or step + 1 == steps:
            bad = int(first_bad)
            if bad:
                raise NonFiniteLossError(
                    f"the training loss is not finite from step {bad} of the epoch on "
                    f"({float(loss)} at step {step + 1}, the first check after it)"
                )
            if on_log is not None:
                on_log(step + 1, loss)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(total) / max(seen, 1),
        "epoch_seconds": seconds,
        "train_images_per_second": seen * batch_size / seconds if seconds > 0 else math.nan,
        "train_steps": seen,
    }


@torch.no_grad()
def evaluate(
    ctx: StepContext,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    memory_format: torch.memory_format,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Loss and accuracy on uint8 ``images``; the decoder is masked by the prediction.

    ``transform`` maps every scaled batch to the model's input (the recipe's
    ``eval_transform``, e.g. a centre crop).
    """
    ctx.model.eval()
    total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    n = images.shape[0]
    start = time.perf_counter()
    for s in range(0, n, batch_size):
        x = to_input(images[s : s + batch_size], memory_format, transform)
        y = labels[s : s + batch_size]
        loss, out = forward_loss(ctx, x, y, train=False)
        total_loss += loss.double() * y.shape[0]
        correct += (out.scores.argmax(dim=1) == y).sum()
    return evaluation_metrics(total_loss, correct, n, time.perf_counter() - start)


def evaluation_metrics(
    total_loss: Tensor, correct: Tensor, n: int, seconds: float
) -> dict[str, float]:
    """The metrics of an evaluation from its summed loss, its correct count (device scalars,
    read here: the evaluation's one host sync), its ``n`` samples and its seconds."""
    correct_i = int(correct)
    return {
        "test_loss": float(total_loss) / n,
        "test_accuracy": 100.0 * correct_i / n,
        "test_errors": n - correct_i,
        "test_samples": n,
        "test_images_per_second": n / seconds if seconds > 0 else math.nan,
    }


def accuracy_series(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Each test set's accuracy (%) per record: ``test`` first, then every further
    ``<name>_accuracy`` of the records (a task's other test sets, e.g. ``affine``), in the order
    first seen; NaN where a record lacks it. ``best_*`` running maxima are not series."""
    names = ["test"]
    for r in records:
        for key in r:
            name = key.removesuffix("_accuracy")
            if key.endswith("_accuracy") and not key.startswith("best_") and name not in names:
                names.append(name)
    return {n: [float(r.get(n + "_accuracy", math.nan)) for r in records] for n in names}


def cosine_factor(step: int, total_steps: int, min_factor: float) -> float:
    """Learning-rate multiplier after ``step`` of ``total_steps``: a half cosine from 1 down to
    ``min_factor``, then held at ``min_factor``."""
    t = min(step, total_steps) / max(total_steps, 1)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    total_steps: int,
    lr_decay: float = 0.9,
    lr_min_factor: float = 0.01,
    lr_floor: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``schedule``.

    ``"cosine"``: a ``LambdaLR`` over ``total_steps`` batches, stepped after every batch; only
    its step count is saved in a checkpoint, so the curve is rebuilt from the command line on
    resume. ``"exponential"``: ``lr_decay`` per epoch, stepped after every epoch, never below
    ``lr_floor`` (an absolute learning rate; 0: no floor, a plain ``ExponentialLR``).
    """
    if schedule == "exponential" and lr_floor > 0:
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: max(lr_decay**epoch, lr_floor / base)
        )
    if schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, lr_decay)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, lr_min_factor)
    )


class Trainer:
    """Everything of one run: data on the device, model, optimiser, schedule, scaler and RNG.

    Built from the parsed command line of ``train.py`` and an example's :class:`Recipe`.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        recipe: Recipe,
        log: Callable[..., Any] = print,
        dist_info: Dist | None = None,
    ) -> None:
        self.args = args
        self.recipe = recipe
        self.dist = dist_info or Dist()
        self.log = log if self.dist.main else (lambda *a, **k: None)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.device = pick_device(args.device, args.no_cuda, self.dist)
        if args.malloc == "keep" or (args.malloc == "auto" and self.device.type == "cpu"):
            kept = keep_freed_memory()
            self.log(f"malloc: {'keeps freed memory' if kept else 'unchanged (not glibc)'}")
        self.amp = effective_amp(args.amp, self.device)
        if args.amp == "fp16" and self.device.type != "cuda":
            raise SystemExit("--amp fp16 needs a CUDA device (use --amp bf16 on the CPU)")
        if args.batch_size % self.dist.world:
            raise SystemExit(
                f"--batch-size {args.batch_size} must be divisible by the number of processes "
                f"{self.dist.world}"
            )
        data = load_dataset(
            getattr(args, "dataset", recipe.dataset),
            args.data_dir,
            download=not args.no_download,
            embedded_sample=args.embedded_sample,
            log=self.log,
        )
        self.data_source = data.source
        ntr = min(args.max_train_samples or len(data.train_labels), len(data.train_labels))
        nte = min(args.max_test_samples or len(data.test_labels), len(data.test_labels))
        if ntr < args.batch_size:
            raise SystemExit(
                f"--batch-size {args.batch_size} is larger than the {ntr} training images"
            )
        # The whole dataset lives on the training device as uint8 (47 MB for MNIST).
        self.train_images = data.train_images[:ntr].to(self.device)
        self.train_labels = data.train_labels[:ntr].to(self.device)
        self.test_images = data.test_images[:nte].to(self.device)
        self.test_labels = data.test_labels[:nte].to(self.device)

        self.memory_format = (
            torch.channels_last
            if args.channels_last in ("yes", "auto")
            else torch.contiguous_format
        )
        self.model_name = recipe.model if isinstance(recipe.model, str) else recipe.model(args)
        self.model_kwargs = recipe.model_kwargs(args)
        runtime = recipe.runtime_kwargs(args)
        self.model = get_model(self.model_name, **self.model_kwargs, **runtime).to(self.device)
        self.model = self.model.to(memory_format=self.memory_format)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.steps_per_epoch = ntr // args.batch_size
        if args.max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps)
        self.scheduler = make_scheduler(
            self.optimizer,
            args.lr_schedule,
            total_steps=args.epochs * self.steps_per_epoch,
            lr_decay=args.lr_decay,
            lr_min_factor=args.lr_min_factor,
            lr_floor=args.lr_floor,
        )
        # The cosine schedule moves after every batch, the exponential one after every epoch.
        self.schedule_per_step = args.lr_schedule == "cosine"
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
        # Shuffling and augmentation come from one seeded generator on the data's device, so a
        # resumed run draws exactly the same batches.
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.epoch = 0
        self.best_accuracy = -1.0
        self.net: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        if args.compile:
            self.net = torch.compile(self.net)
        self.task: Task = (
            recipe.task(args)
            if recipe.task is not None
            else Classification(recipe.augment, recipe.eval_transform)
        )
        self.step_context = StepContext(
            model=self.net,
            loss_fn=recipe.loss(args),
            optimizer=self.optimizer,
            scaler=self.scaler,
            scheduler=self.scheduler if self.schedule_per_step else None,
            amp=self.amp,
            device=self.device,
            model_target=self.task.model_target,
        )

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: model (with its registry name and kwargs), optimiser, schedule, RNG."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "best_accuracy": self.best_accuracy,
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            # The optimiser state holds the learning rate of the run that wrote the checkpoint;
            # set it from this run's curve (the same value unless --epochs changed).
            sched = self.scheduler
            for group, base, fn in zip(
                self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
            ):
                group["lr"] = base * fn(sched.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"].to(self.generator.get_state().device))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.best_accuracy = float(state["best_accuracy"])

    # -- epochs -------------------------------------------------------------------------------
    def train_epoch(self, progress: bool) -> dict[str, float]:
        """One epoch of :func:`train_one_epoch`, with a progress bar or log lines."""
        args = self.args
        n = self.train_images.shape[0]
        steps = self.steps_per_epoch
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=steps,
                desc=f"epoch {self.epoch + 1}",
                leave=False,
                unit="batch",
                dynamic_ncols=True,
            )

        def on_log(step: int, loss: Tensor) -> None:
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{float(loss):.4f}")
            elif not args.quiet and self.dist.main:
                self.log(
                    f"  epoch {self.epoch + 1} [{step * args.batch_size}/{n}] "
                    f"loss {float(loss):.5f}",
                    flush=True,
                )

        try:
            result = self._train_one_epoch(on_log)
        finally:
            if bar is not None:
                bar.close()
        if self.dist.enabled:
            import torch.distributed as dist

            t = torch.tensor([result["train_loss"]], device=self.device)
            dist.all_reduce(t)
            result["train_loss"] = float(t) / self.dist.world
        return result

    def _train_one_epoch(self, on_log: Callable[[int, Tensor], None]) -> dict[str, float]:
        args = self.args
        try:
            return train_one_epoch(
                self.step_context,
                self.train_images,
                self.train_labels,
                batch_size=args.batch_size,
                steps=self.steps_per_epoch,
                task=self.task,
                generator=self.generator,
                memory_format=self.memory_format,
                rank=self.dist.rank,
                world=self.dist.world,
                on_log=on_log,
                log_interval=args.log_interval,
                first_step=self.epoch * self.steps_per_epoch,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"epoch {self.epoch + 1}: {exc}; stopped before saving anything of this epoch, "
                f"so {args.out_dir / 'last.pt'} (if any) holds the last good epoch: lower --lr, "
                "try --amp none, or resume from it with --resume"
            ) from exc

    def batches(self) -> Iterator[Tensor]:
        """This process's batch indices, epoch after epoch without end, each epoch shuffled by
        the run's generator (what the benchmarks step through)."""
        while True:
            yield from train_batches(
                self.train_images.shape[0],
                self.args.batch_size,
                self.generator,
                self.dist.rank,
                self.dist.world,
            )

    def step(self, index: Tensor, ctx: StepContext | None = None) -> Tensor:
        """One training step on batch ``index`` (:func:`task_step`), through ``ctx`` (default:
        the trainer's own step context; a benchmark passes one with a compiled model)."""
        return task_step(
            ctx if ctx is not None else self.step_context,
            self.task,
            self.train_images,
            self.train_labels,
            index,
            generator=self.generator,
            memory_format=self.memory_format,
            rank=self.dist.rank,
            world=self.dist.world,
        )

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation on the test set (:func:`evaluate` for classification)."""
        return self.task.evaluate(
            self.step_context,
            self.test_images,
            self.test_labels,
            batch_size=self.args.test_batch_size,
            memory_format=self.memory_format,
        )
