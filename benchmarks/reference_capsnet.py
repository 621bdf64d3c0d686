"""A plain CapsNet written from the paper, the way public code typically does it: the yardstick.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules" (NIPS 2017, arXiv:1710.09829).
This module is NOT part of torchcaps and is not meant to be fast or reusable; it is what the
benchmarks compare torchcaps against. It follows the habits common in public reimplementations:

- data: a ``Dataset`` of uint8 images whose items go through per-sample torchvision transforms
  (``Pad(2)`` + ``RandomCrop(28)`` + ``ToTensor`` on PIL images) and a ``DataLoader``;
- PrimaryCaps: one convolution, then ``view`` + ``permute`` into (B, 1152, 8) capsules;
- DigitCaps: ``W`` of shape (1, 1152, 10, 16, 8); the input is expanded to the 10 classes as
  ``x[:, :, None, :, None]`` and ``u_hat = W @ x`` broadcasts ``W`` over the batch (a
  (B, 1152, 10, 16, 8) copy of ``W`` is materialised forward and backward);
- dynamic routing with logits ``b`` of shape (B, 1152, 10, 1), softmax over dim 2 (the
  parents), 3 iterations, gradients flowing through every round (the paper's official code);
- squash with ``eps`` inside the square root;
- margin loss (m+ 0.9, m- 0.1, lambda 0.5, summed over classes, mean over the batch) plus
  0.0005 x the per-image sum of squared pixel errors of a 512-1024-784 decoder fed the digit
  capsules masked by the label (training) or by the prediction (evaluation).

Parameter count: 8,215,568, as in the paper (8.2M).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

NUM_CLASSES = 10
PRIMARY_CAPSULES = 32 * 6 * 6  # 1152
PARAMETERS = 8_215_568


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Eq. 1: |s|^2 / (1 + |s|^2) * s / |s|, with eps inside the square root."""
    squared_norm = (s**2).sum(dim=dim, keepdim=True)
    scale = squared_norm / (1.0 + squared_norm)
    return scale * s / torch.sqrt(squared_norm + eps)


class PrimaryCaps(nn.Module):
    """Conv 9x9 stride 2 with 32 x 8 channels, reshaped into 1152 capsules of 8D."""

    def __init__(self, in_channels: int = 256, num_capsules: int = 32, capsule_dim: int = 8):
        super().__init__()
        self.num_capsules = num_capsules
        self.capsule_dim = capsule_dim
        self.conv = nn.Conv2d(in_channels, num_capsules * capsule_dim, kernel_size=9, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # (B, 256, 6, 6)
        batch, _, height, width = out.shape
        # Group 8 consecutive channels at each position into one capsule.
        out = out.view(batch, self.num_capsules, self.capsule_dim, height, width)
        out = out.permute(0, 1, 3, 4, 2).contiguous()
        out = out.view(batch, self.num_capsules * height * width, self.capsule_dim)
        return squash(out)


class DigitCaps(nn.Module):
    """u_hat = W_ij u_i for every pair, then routing by agreement (Procedure 1)."""

    def __init__(
        self,
        in_capsules: int = PRIMARY_CAPSULES,
        in_dim: int = 8,
        out_capsules: int = NUM_CLASSES,
        out_dim: int = 16,
        iterations: int = 3,
    ):
        super().__init__()
        self.in_capsules = in_capsules
        self.out_capsules = out_capsules
        self.iterations = iterations
        self.W = nn.Parameter(0.01 * torch.randn(1, in_capsules, out_capsules, out_dim, in_dim))

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        # (B, 1152, 8) -> (B, 1152, 10, 8, 1): the same input for each of the 10 classes.
        x = x[:, :, None, :, None].expand(-1, -1, self.out_capsules, -1, -1)
        W = self.W.expand(batch, -1, -1, -1, -1)  # repeated over the batch by the matmul
        u_hat = torch.matmul(W, x).squeeze(-1)  # (B, 1152, 10, 16)

        b = torch.zeros(batch, self.in_capsules, self.out_capsules, 1, device=x.device)
        v = u_hat.new_empty(0)
        for iteration in range(self.iterations):
            c = F.softmax(b, dim=2)  # over the parents (the 10 digit capsules)
            s = (c * u_hat).sum(dim=1, keepdim=True)  # (B, 1, 10, 16)
            v = squash(s, dim=-1)
            if iteration < self.iterations - 1:
                b = b + (u_hat * v).sum(dim=-1, keepdim=True)
        return v.squeeze(1)  # (B, 10, 16)


class Decoder(nn.Module):
    """FC 512 ReLU, FC 1024 ReLU, FC 784 sigmoid on the masked digit capsules."""

    def __init__(self, num_capsules: int = NUM_CLASSES, capsule_dim: int = 16):
        super().__init__()
        self.num_capsules = num_capsules
        self.layers = nn.Sequential(
            nn.Linear(num_capsules * capsule_dim, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, 784),
            nn.Sigmoid(),
        )

    def forward(self, v: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = v.norm(dim=-1).argmax(dim=1)
        mask = F.one_hot(labels, self.num_capsules).float()
        masked = v * mask[:, :, None]
        return self.layers(masked.view(v.shape[0], -1)).view(-1, 1, 28, 28)


class CapsNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (+ decoder), 8,215,568 parameters."""

    def __init__(self, routing_iterations: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 256, kernel_size=9)
        self.primary_caps = PrimaryCaps()
        self.digit_caps = DigitCaps(iterations=routing_iterations)
        self.decoder = Decoder()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the digit capsules (B, 10, 16) and the reconstruction (B, 1, 28, 28)."""
        out = F.relu(self.conv1(x))
        v = self.digit_caps(self.primary_caps(out))
        return v, self.decoder(v, labels)


def capsule_loss(images: Tensor, labels: Tensor, v: Tensor, reconstruction: Tensor) -> Tensor:
    """Margin loss + 0.0005 x per-image sum of squared errors, averaged over the batch."""
    lengths = v.norm(dim=-1)
    target = F.one_hot(labels, NUM_CLASSES).float()
    present = target * F.relu(0.9 - lengths) ** 2
    absent = 0.5 * (1.0 - target) * F.relu(lengths - 0.1) ** 2
    margin = (present + absent).sum(dim=1)
    recon = ((reconstruction - images) ** 2).view(images.shape[0], -1).sum(dim=1)
    return (margin + 0.0005 * recon).mean()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class UInt8Digits(Dataset):
    """MNIST-like digits held as a uint8 (N, 28, 28) tensor; items are PIL images transformed."""

    def __init__(self, images: Tensor, labels: Tensor, transform: transforms.Compose):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.images[index].numpy())  # mode "L", as torchvision's MNIST
        return self.transform(image), int(self.labels[index])


def train_transform() -> transforms.Compose:
    """Shift by up to 2 pixels in each direction with zero padding (the paper's augmentation)."""
    return transforms.Compose([transforms.Pad(2), transforms.RandomCrop(28), transforms.ToTensor()])


def make_loader(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    train: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader over uint8 digits: shuffled and augmented for training, plain for evaluation."""
    transform = train_transform() if train else transforms.Compose([transforms.ToTensor()])
    return DataLoader(
        UInt8Digits(images, labels, transform),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
    )


def endless(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield batches forever, starting a new epoch (a new iterator) when one ends."""
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def build_model(device: torch.device | str = "cpu", routing_iterations: int = 3) -> CapsNet:
    return CapsNet(routing_iterations).to(device)


def build_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(
    model: CapsNet, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor
) -> Tensor:
    """One training step on a batch from the loader: forward, loss, backward, Adam step."""
    model.train()
    v, reconstruction = model(images, labels)
    loss = capsule_loss(images, labels, v, reconstruction)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def eval_step(model: CapsNet, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and number of correct predictions of one evaluation batch (decoder masked by the
    prediction)."""
    model.eval()
    v, reconstruction = model(images)
    loss = capsule_loss(images, labels, v, reconstruction)
    correct = (v.norm(dim=-1).argmax(dim=1) == labels).sum()
    return loss, correct


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def copy_from_torchcaps(reference: CapsNet, model: nn.Module) -> None:
    """Load the weights of the torchcaps example's ``CapsNet`` into ``reference``.

    Used by the benchmarks to check that both compute the same function. Layouts: torchcaps's
    ``Conv2dCaps`` orders channels as capsule-major (channel ``n * 8 + d``), as ``PrimaryCaps``
    does; ``DenseCaps.weight_matrices`` is ``(N_in, N_out, D_out, D_in)``.
    """
    reference.conv1.load_state_dict(model.conv1.state_dict())
    reference.primary_caps.conv.load_state_dict(model.primary.conv.state_dict())
    reference.digit_caps.W.copy_(model.digits.weight_matrices.unsqueeze(0))
    linears = [m for m in model.decoder.net if isinstance(m, nn.Linear)]
    ref_linears = [m for m in reference.decoder.layers if isinstance(m, nn.Linear)]
    for ours, theirs in zip(ref_linears, linears, strict=True):
        ours.load_state_dict(theirs.state_dict())
