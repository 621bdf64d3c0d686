"""Train the CapsNet of Sabour, Frosst & Hinton (2017) on MNIST, built from torchcaps parts.

    python examples/mnist_capsnet.py                       # the paper's best configuration
    python examples/mnist_capsnet.py --epochs 1 --quiet    # a quick look

The model: Conv2d(1, 256, 9) + ReLU -> Conv2dCaps(256, 32, 8, 9, stride 2) -> DenseCaps(1152, 8,
10, 16, DynamicRouting(3)) -> capsule lengths -> MarginLoss, plus MaskedDecoder(10, 16, (1, 28,
28)) for the reconstruction loss (0.0005 x per-image sum of squared errors). MNIST is held as one
uint8 tensor on the training device and augmented there (random shifts of up to 2 pixels, per
sample, batched). Without MNIST and without internet, the run falls back to a small embedded
sample, loudly. ``torchrun --nproc_per_node=N examples/mnist_capsnet.py`` trains data-parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import struct
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcaps import (
    Conv2dCaps,
    DenseCaps,
    DynamicRouting,
    MarginLoss,
    MaskedDecoder,
    ReconstructionLoss,
    capsule_lengths,
)

EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "mnist_sample"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# SHA-256 of the standard, uncompressed MNIST files (checked before training).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class CapsNet(nn.Module):
    """The paper's MNIST CapsNet (8.2M parameters with the decoder, 6.8M without)."""

    def __init__(
        self, routing_iterations: int = 3, reconstruction: bool = True, conv_impl: str = "auto"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 256, kernel_size=9)
        self.primary = Conv2dCaps(256, 32, 8, kernel_size=9, stride=2, conv_impl=conv_impl)
        self.digits = DenseCaps(1152, 8, 10, 16, routing=DynamicRouting(routing_iterations))
        self.decoder = MaskedDecoder(10, 16, (1, 28, 28)) if reconstruction else None

    def forward(self, x: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Return the digit capsules' lengths (B, 10) and the reconstruction (or None).

        The decoder is masked by ``target`` (the true label, in training) or, when ``target``
        is None, by the longest capsule (the prediction, at evaluation).
        """
        v = self.digits(self.primary(F.relu(self.conv1(x))))
        lengths = capsule_lengths(v)
        recon = self.decoder(v, target) if self.decoder is not None else None
        return lengths, recon


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="CapsNet (Sabour et al. 2017) on MNIST with torchcaps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Flags of the original project (underscore and dashed spellings).
    p.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=128,
        metavar="N",
        help="training batch size (global, across all processes)",
    )
    p.add_argument(
        "--test-batch-size",
        "--test_batch_size",
        type=int,
        default=1000,
        metavar="N",
        help="evaluation batch size",
    )
    p.add_argument("--epochs", type=int, default=15, metavar="N", help="number of epochs")
    p.add_argument("--lr", type=float, default=0.001, help="Adam learning rate (the peak)")
    p.add_argument(
        "--lr-schedule",
        "--lr_schedule",
        choices=("cosine", "exponential"),
        default="cosine",
        help="cosine: from --lr down to --lr-min-factor x --lr along a half cosine, updated "
        "after every batch over all --epochs; exponential: --lr multiplied by --lr-decay after "
        "every epoch",
    )
    p.add_argument(
        "--lr-decay",
        "--lr_decay",
        type=float,
        default=0.9,
        help="with --lr-schedule exponential: the learning rate multiplier applied after every "
        "epoch",
    )
    p.add_argument(
        "--lr-min-factor",
        "--lr_min_factor",
        type=float,
        default=0.01,
        help="with --lr-schedule cosine: the final learning rate as a fraction of --lr",
    )
    p.add_argument(
        "--no-cuda", "--no_cuda", action="store_true", help="never use CUDA (same as --device cpu)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument(
        "--log-interval",
        "--log_interval",
        type=int,
        default=10,
        metavar="N",
        help="batches between progress updates (the only host syncs of an epoch)",
    )
    p.add_argument(
        "--routing_iterations",
        "--routing-iterations",
        type=int,
        default=3,
        help="routing iterations r of DynamicRouting (the paper's Procedure 1)",
    )
    recon = p.add_mutually_exclusive_group()
    recon.add_argument(
        "--with_reconstruction",
        "--with-reconstruction",
        dest="reconstruction",
        action="store_true",
        default=True,
        help="train with the reconstruction decoder (the default)",
    )
    recon.add_argument(
        "--no-reconstruction",
        "--no_reconstruction",
        dest="reconstruction",
        action="store_false",
        help="train without the decoder",
    )
    # New flags.
    p.add_argument(
        "--data-dir",
        "--data_dir",
        type=Path,
        default=None,
        help="MNIST root in torchvision layout (<dir>/MNIST/raw/...); "
        "default ./data, falling back to the embedded sample when absent",
    )
    p.add_argument(
        "--no-download", "--no_download", action="store_true", help="never download MNIST"
    )
    p.add_argument(
        "--embedded-sample",
        "--embedded_sample",
        action="store_true",
        help="use the embedded 5,000/1,000-digit MNIST sample (not the full dataset)",
    )
    p.add_argument(
        "--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."
    )
    p.add_argument(
        "--out-dir",
        "--out_dir",
        type=Path,
        default=Path("runs/mnist_capsnet"),
        help="the run's folder: metrics.jsonl, config.json, last.pt, best.pt",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out-dir>/last.pt (model, optimiser, schedule, RNG, epoch)",
    )
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast precision of convolutions and decoder (routing stays float32); "
        "fp16 needs CUDA",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--channels-last",
        "--channels_last",
        choices=("auto", "yes", "no"),
        default="auto",
        help="channels_last memory format for the convolutions (auto: yes; "
        "measured faster on CPU and GPU)",
    )
    p.add_argument(
        "--conv-impl",
        "--conv_impl",
        choices=("auto", "native", "matmul"),
        default="auto",
        help="how PrimaryCaps computes its convolution (Conv2dCaps conv_impl; auto: per-tap "
        "matmuls for float32 on CPU, torch's convolution otherwise)",
    )
    p.add_argument(
        "--max-train-samples",
        "--max_train_samples",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N training images (smoke runs)",
    )
    p.add_argument(
        "--max-test-samples",
        "--max_test_samples",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N test images (smoke runs)",
    )
    p.add_argument(
        "--recon-weight",
        "--recon_weight",
        type=float,
        default=0.0005,
        help="weight of the per-image sum of squared pixel errors (the paper's 0.0005)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads on CPU (default: leave PyTorch's choice)",
    )
    p.add_argument(
        "--max-steps",
        "--max_steps",
        type=int,
        default=None,
        help="stop each epoch after N steps (smoke runs and tests)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only epoch lines")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "test_batch_size", "log_interval", "routing_iterations"):
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
    if not (0 <= args.lr_min_factor <= 1):
        parser.error(f"--lr-min-factor must be in [0, 1], got {args.lr_min_factor}")
    if not (args.recon_weight >= 0 and math.isfinite(args.recon_weight)):
        parser.error(f"--recon-weight must be >= 0, got {args.recon_weight}")
    if args.embedded_sample and args.data_dir is not None:
        parser.error("--embedded-sample and --data-dir are mutually exclusive")
    return args


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class DataError(RuntimeError):
    """MNIST could not be found, downloaded or read."""


def read_idx(path: Path, expected_ndim: int) -> Tensor:
    """Read an idx file (optionally gzipped) as a uint8 tensor, checking its header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 + 4 * expected_ndim:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than an idx header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic >> 8 != 0x08 or (magic & 0xFF) != expected_ndim:
        raise DataError(
            f"{path} is not an idx file of {expected_ndim}-d uint8 data (magic 0x{magic:08x})"
        )
    dims = struct.unpack(">" + "I" * expected_ndim, raw[4 : 4 + 4 * expected_ndim])
    offset = 4 + 4 * expected_ndim
    size = math.prod(dims)
    if len(raw) != offset + size:
        raise DataError(
            f"{path} has {len(raw) - offset} data bytes, its header {tuple(dims)} promises {size}: "
            "the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).view(*dims)


@dataclass
class MNISTData:
    train_images: Tensor  # (N, 28, 28) uint8
    train_labels: Tensor  # (N,) int64
    test_images: Tensor
    test_labels: Tensor
    source: str


def _load_split(directory: Path, split: str, suffix: str = "") -> tuple[Tensor, Tensor]:
    image_name, label_name, _ = MNIST_FILES[split]
    images = read_idx(directory / (image_name + suffix), 3)
    labels = read_idx(directory / (label_name + suffix), 1).long()
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise DataError(
            f"{directory}: {split} images {tuple(images.shape)} do not match labels "
            f"{tuple(labels.shape)} or are not 28x28"
        )
    if int(labels.max()) > 9:
        raise DataError(f"{directory}: {split} labels out of range 0..9")
    return images, labels


def load_embedded() -> MNISTData:
    train = _load_split(EMBEDDED_DIR, "train", ".gz")
    test = _load_split(EMBEDDED_DIR, "test", ".gz")
    return MNISTData(*train, *test, source=f"embedded sample ({EMBEDDED_DIR})")


def _check_full_files(raw_dir: Path) -> None:
    """Check sizes (and headers, via read_idx) of the full MNIST files before training."""
    for split, (image_name, label_name, count) in MNIST_FILES.items():
        for name, size in ((image_name, 16 + count * 784), (label_name, 8 + count)):
            path = raw_dir / name
            if path.stat().st_size != size:
                raise DataError(
                    f"{path} has {path.stat().st_size} bytes, expected {size} for the {split} "
                    "split of MNIST: the file is truncated or not MNIST"
                )


def _mnist_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).is_file() for name in MNIST_SHA256)


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "downloading MNIST needs torchvision: pip install torchcaps[examples]"
        ) from exc
    for train in (True, False):
        MNIST(str(root), train=train, download=True)


def load_mnist(args: argparse.Namespace, log: Any = print) -> MNISTData:
    """Find, download or fall back to the embedded sample, as the command line asks."""
    if args.embedded_sample:
        return load_embedded()
    explicit = args.data_dir is not None
    root = args.data_dir if explicit else Path("data")
    if not _mnist_present(root):
        error: str
        if args.no_download:
            error = "it is not there and --no-download was given"
        else:
            log(f"MNIST not found under {root}/MNIST/raw; downloading ...")
            try:
                _download(root)
                error = ""
            except Exception as exc:
                error = f"download failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if error:
            if explicit:
                raise DataError(
                    f"--data-dir {root}: MNIST expected at {root}/MNIST/raw/"
                    f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte, but {error}"
                )
            bar = "!" * 78
            log(
                f"{bar}\n!! MNIST is not available under ./data ({error}).\n"
                f"!! Falling back to the EMBEDDED SAMPLE: 5,000 training and 1,000 test digits.\n"
                f"!! This is NOT the full dataset; its accuracy says nothing about the paper's.\n"
                f"!! Pass --data-dir DIR (torchvision layout) for the real run.\n{bar}"
            )
            return load_embedded()
    raw = root / "MNIST" / "raw"
    _check_full_files(raw)
    train = _load_split(raw, "train")
    test = _load_split(raw, "test")
    return MNISTData(*train, *test, source=str(raw))


def random_shift(
    images: Tensor, max_shift: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> Tensor:
    """Shift each image independently by up to ``max_shift`` pixels in x and y, zero padded.

    Batched on the images' device: pad, then gather one (H, W) window per sample.
    ``images``: (B, H, W) uint8 -> (B, H, W) uint8. Under data parallelism ``images`` is this
    rank's shard of a global batch of ``world * B`` images: the offsets are drawn for the whole
    global batch (the same draw on every rank) and the rank's slice is used, so every image gets
    the shift it would get in a single-process run with the same seed.
    """
    b, h, w = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, b * world), generator=generator, device=generator.device
    )[:, rank * b : (rank + 1) * b].to(images.device)
    rows = (offsets[0].unsqueeze(1) + torch.arange(h, device=images.device)).unsqueeze(2)
    cols = (offsets[1].unsqueeze(1) + torch.arange(w, device=images.device)).unsqueeze(1)
    batch_index = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded[batch_index, rows, cols]


def to_input(images: Tensor, memory_format: torch.memory_format) -> Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    return (images.unsqueeze(1).float() / 255.0).contiguous(memory_format=memory_format)


def train_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> Iterator[Tensor]:
    """Seeded shuffle; yield this rank's indices of each global batch (drop the last partial)."""
    perm = torch.randperm(n, generator=generator, device=generator.device)
    per_rank = batch_size // world
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start + rank * per_rank : start + (rank + 1) * per_rank]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str, no_cuda: bool) -> Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist()
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not no_cuda and device_arg in ("auto", "cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(args: argparse.Namespace, d: Dist) -> torch.device:
    if args.no_cuda or args.device == "cpu":
        return torch.device("cpu")
    if args.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank)
        return torch.device("cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    return device


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or unsafe."""


def _check_zip_records(path: Path) -> None:
    """Verify the CRC-32 that torch.save stores for every record (torch.load does not check it).

    Without this, bytes flipped inside a tensor's data load silently as wrong weights. Files
    that are not zip archives (truncated, or the legacy format) are left to torch.load.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (corrupt: record {bad!r} fails its "
            "CRC-32 check)"
        )


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure names the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_zip_records(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely (truncated, corrupt, or it holds objects "
            f"other than tensors and plain containers): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"checkpoint {path} is not a torchcaps example checkpoint")
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def cosine_factor(step: int, total_steps: int, min_factor: float) -> float:
    """Learning-rate multiplier after ``step`` of ``total_steps``: a half cosine from 1 down to
    ``min_factor``, then held at ``min_factor``."""
    t = min(step, total_steps) / max(total_steps, 1)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``--lr-schedule``.

    The cosine schedule is a ``LambdaLR`` over ``epochs x steps_per_epoch`` batches; only its
    step count is saved in a checkpoint, so the curve is rebuilt from the command line on
    ``--resume``.
    """
    if args.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, args.lr_decay)
    total = args.epochs * steps_per_epoch
    min_factor = args.lr_min_factor
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total, min_factor)
    )


class Trainer:
    """Everything of one run: data on the device, model, optimiser, schedule and RNG."""

    def __init__(self, args: argparse.Namespace, log: Any = print, dist_info: Dist | None = None):
        self.args = args
        self.dist = dist_info or Dist()
        self.log = log if self.dist.main else (lambda *a, **k: None)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.device = pick_device(args, self.dist)
        if args.amp == "fp16" and self.device.type != "cuda":
            raise SystemExit("--amp fp16 needs a CUDA device (use --amp bf16 on the CPU)")
        if args.batch_size % self.dist.world:
            raise SystemExit(
                f"--batch-size {args.batch_size} must be divisible by the number of processes "
                f"{self.dist.world}"
            )
        data = load_mnist(args, self.log)
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

        cl = args.channels_last
        use_cl = cl in ("yes", "auto")
        self.memory_format = torch.channels_last if use_cl else torch.contiguous_format
        self.model = CapsNet(args.routing_iterations, args.reconstruction, args.conv_impl).to(
            self.device
        )
        self.model = self.model.to(memory_format=self.memory_format)
        self.num_parameters = count_parameters(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.steps_per_epoch = ntr // args.batch_size
        if args.max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps)
        self.scheduler = make_scheduler(self.optimizer, args, self.steps_per_epoch)
        # The cosine schedule moves after every batch, the exponential one after every epoch.
        self.schedule_per_step = args.lr_schedule == "cosine"
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
        self.margin = MarginLoss()
        self.recon = ReconstructionLoss(args.recon_weight)
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

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "epoch": self.epoch,
            "best_accuracy": self.best_accuracy,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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

    # -- steps --------------------------------------------------------------------------------
    def loss(self, images: Tensor, labels: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        """Margin (+ reconstruction) loss of a batch; returns (loss, lengths)."""
        with autocast_context(self.args.amp, self.device):
            lengths, recon = self.net(images, labels if train else None)
        loss = self.margin(lengths.float(), labels)
        if recon is not None:
            loss = loss + self.recon(recon.float(), images.float())
        return loss, lengths

    def train_epoch(self, progress: bool) -> dict[str, float]:
        args = self.args
        self.net.train()
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
        total = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        for step, idx in enumerate(
            train_batches(n, args.batch_size, self.generator, self.dist.rank, self.dist.world)
        ):
            if step >= steps:
                break
            shifted = random_shift(
                self.train_images[idx], 2, self.generator, self.dist.rank, self.dist.world
            )
            images = to_input(shifted, self.memory_format)
            labels = self.train_labels[idx]
            loss, _ = self.loss(images, labels, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.schedule_per_step:
                self.scheduler.step()
            total += loss.detach()
            seen += 1
            if (step + 1) % args.log_interval == 0 or step + 1 == steps:
                if bar is not None:
                    bar.update(step + 1 - bar.n)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                elif not args.quiet and self.dist.main:
                    self.log(
                        f"  epoch {self.epoch + 1} [{(step + 1) * args.batch_size}/{n}] "
                        f"loss {float(loss.detach()):.5f}",
                        flush=True,
                    )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        train_loss = float(total) / max(seen, 1)
        if self.dist.enabled:
            import torch.distributed as dist

            t = torch.tensor([train_loss], device=self.device)
            dist.all_reduce(t)
            train_loss = float(t) / self.dist.world
        images_per_second = seen * args.batch_size / seconds if seconds > 0 else float("nan")
        return {
            "train_loss": train_loss,
            "epoch_seconds": seconds,
            "train_images_per_second": images_per_second,
            "train_steps": seen,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.net.eval()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = self.test_images.shape[0]
        start = time.perf_counter()
        for s in range(0, n, self.args.test_batch_size):
            images = to_input(
                self.test_images[s : s + self.args.test_batch_size], self.memory_format
            )
            labels = self.test_labels[s : s + self.args.test_batch_size]
            loss, lengths = self.loss(images, labels, train=False)
            total_loss += loss.double() * labels.shape[0]
            correct += (lengths.argmax(dim=1) == labels).sum()
        seconds = time.perf_counter() - start
        correct_i = int(correct)
        return {
            "test_loss": float(total_loss) / n,
            "test_accuracy": 100.0 * correct_i / n,
            "test_errors": n - correct_i,
            "test_samples": n,
            "test_images_per_second": n / seconds if seconds > 0 else float("nan"),
        }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only the metrics of epochs <= ``upto_epoch`` (those the checkpoint knows about)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("epoch", 0) <= upto_epoch:
                keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def run(argv: Sequence[str] | None = None, log: Any = print) -> list[dict[str, Any]]:
    """Train as the command line says; return the metrics of the epochs run now."""
    args = parse_args(argv)
    dist_info = setup_distributed(args.device, args.no_cuda)
    try:
        return _run(args, log, dist_info)
    finally:
        if dist_info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args: argparse.Namespace, log: Any, dist_info: Dist) -> list[dict[str, Any]]:
    trainer = Trainer(args, log, dist_info)
    log = trainer.log
    out: Path = args.out_dir
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if args.resume:
        # RNG states must stay CPU ByteTensors; load_state_dict moves the rest to the device.
        state = load_checkpoint(out / "last.pt", map_location="cpu")
        saved = state.get("args", {})
        # Checkpoints from before --lr-schedule existed were trained with ExponentialLR.
        saved_schedule = saved.get("lr_schedule", "exponential")
        if saved_schedule != args.lr_schedule:
            raise CheckpointError(
                f"checkpoint {out / 'last.pt'} was trained with --lr-schedule {saved_schedule}, "
                f"cannot resume it with --lr-schedule {args.lr_schedule}"
            )
        if args.lr_schedule == "cosine" and saved.get("epochs", args.epochs) != args.epochs:
            log(
                f"note: the cosine schedule is rebuilt for --epochs {args.epochs} (the checkpoint "
                f"was written by a run of --epochs {saved['epochs']}): the learning rate jumps "
                "to that curve; an uninterrupted run would differ"
            )
        trainer.load_state_dict(state)
        if dist_info.main:
            _rewrite_metrics(metrics_path, trainer.epoch)
        log(f"resumed from {out / 'last.pt'} at epoch {trainer.epoch}")
    elif dist_info.main and metrics_path.exists():
        metrics_path.unlink()
    device_name = (
        torch.cuda.get_device_name(trainer.device)
        if trainer.device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    if dist_info.main:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config.update(
            torch_version=torch.__version__,
            device=str(trainer.device),
            device_name=device_name,
            data=trainer.data_source,
            world_size=dist_info.world,
            num_threads=torch.get_num_threads(),
            num_parameters=trainer.num_parameters,
            python=platform.python_version(),
        )
        _write_json(out / "config.json", config)
    log(
        f"CapsNet: {trainer.num_parameters:,} parameters ({trainer.num_parameters / 1e6:.1f}M); "
        f"device {trainer.device} ({device_name}); data: {trainer.data_source}; "
        f"{trainer.train_images.shape[0]} train / {trainer.test_images.shape[0]} test images"
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
        log(
            f"epoch {trainer.epoch:3d}  train loss {tr['train_loss']:.5f}  "
            f"test loss {ev['test_loss']:.5f}  test acc {ev['test_accuracy']:.2f}% "
            f"({ev['test_errors']}/{ev['test_samples']} errors)  "
            f"{tr['train_images_per_second']:.0f} img/s  {tr['epoch_seconds']:.1f} s",
            flush=True,
        )
    return history


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
