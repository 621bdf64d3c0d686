"""examples/multimnist_capsnet.py: the MultiMNIST recipe on the shared harness, on the embedded
sample (no MNIST, no download): the paper's top-2 metric, the pairs of a training batch, the
loss on both digits, the fixed test pairs, a short run that resumes on the same trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
import multimnist_capsnet as ex
from _helpers import SHORT_RUN
from torchcaps.datasets import MultiMNIST
from torchcaps.models import CapsuleOutput, get_model


def _digits(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_defaults() -> None:
    args = ex.parse_args([])
    assert (args.epochs, args.batch_size, args.lr, args.routing_iterations) == (15, 128, 1e-3, 3)
    assert (args.test_pairs, args.test_seed, args.recon_weight) == (1, 0, 0.0005)
    assert ex.RECIPE.model == "capsnet_multimnist"
    assert ex.RECIPE.model_kwargs(args) == {"routing_iterations": 3, "reconstruction": True}
    for bad in (["--test-pairs", "0"], ["--test-seed", "-1"], ["--routing-iterations", "0"]):
        with pytest.raises(SystemExit):
            ex.parse_args(bad)


def test_top2_correct_needs_both_digits_among_the_two_longest_capsules() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # top two {0, 1}
            [0.9, 0.1, 0.8, 0.0],  # {0, 2}
            [0.1, 0.2, 0.3, 0.4],  # {3, 2}
        ]
    )
    labels = torch.tensor([[1, 0], [0, 1], [2, 3]])
    assert ex.top2_correct(scores, labels).tolist() == [True, False, True]


def test_a_training_batch_is_fresh_pairs_with_their_components() -> None:
    images, labels = _digits()
    task = ex.MultiMNISTTask()
    index = torch.arange(6)
    x, target = task.train_batch(images, labels, index, torch.Generator().manual_seed(3), 0, 1)
    assert x.shape == (6, 1, 36, 36) and target.components.shape == (6, 2, 1, 36, 36)
    assert bool((target.labels[:, 0] != target.labels[:, 1]).all())
    hot = torch.zeros(6, 10).scatter_(1, target.labels, 1.0)
    torch.testing.assert_close(target.multi_hot.float(), hot)
    torch.testing.assert_close(x, target.components.sum(dim=1).clamp(max=1.0))
    assert task.model_target(target) is target.labels
    # two ranks of a global batch hold the halves of what one process draws
    one, t1 = task.train_batch(
        images, labels, torch.arange(6), torch.Generator().manual_seed(5), 0, 1
    )
    halves = [
        task.train_batch(images, labels, torch.arange(3), torch.Generator().manual_seed(5), r, 2)
        for r in range(2)
    ]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), one)
    torch.testing.assert_close(torch.cat([h[1].labels for h in halves]), t1.labels)


def test_the_loss_is_the_multi_hot_margin_loss_plus_both_reconstructions() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 10, generator=g, dtype=torch.float64)
    recon = torch.rand(3, 2, 1, 36, 36, generator=g, dtype=torch.float64)
    components = torch.rand(3, 2, 1, 36, 36, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 4], [9, 0], [2, 3]])
    hot = torch.zeros(3, 10, dtype=torch.float64).scatter_(1, labels, 1.0)
    out = CapsuleOutput(scores, torch.zeros(3, 10, 16), recon)
    got = ex.PairLoss(0.0005)(
        out, torch.zeros(3, 1, 36, 36), ex.PairTarget(labels, hot, components)
    )
    # the paper's margin loss (m+ 0.9, m- 0.1, lambda 0.5), summed over classes, batch mean
    margin = (
        hot * (0.9 - scores).clamp(min=0) ** 2 + 0.5 * (1 - hot) * (scores - 0.1).clamp(min=0) ** 2
    )
    sse = (recon - components).square().sum(dim=(1, 2, 3, 4))  # both digits of each pair
    torch.testing.assert_close(got.double(), margin.sum(1).mean() + 0.0005 * sse.mean())
    no_decoder = CapsuleOutput(scores, torch.zeros(3, 10, 16), None)
    torch.testing.assert_close(
        ex.PairLoss()(no_decoder, torch.zeros(3), ex.PairTarget(labels, hot, components)).double(),
        margin.sum(1).mean(),
    )


def test_evaluation_scores_the_fixed_test_pairs_with_the_top2_metric() -> None:
    images, labels = _digits(20, seed=1)
    task = ex.MultiMNISTTask(test_pairs=2, test_seed=7)
    torch.manual_seed(0)
    model = get_model("capsnet_multimnist", reconstruction=False).eval()
    ctx = engine.StepContext(model, ex.PairLoss(), None, None, None, "none", torch.device("cpu"))  # type: ignore[arg-type]
    got = task.evaluate(ctx, images, labels, batch_size=16, memory_format=torch.contiguous_format)
    pairs = MultiMNIST(images, labels, seed=7, length=40)
    assert len(task.test_set(images, labels)) == 40
    everything = pairs.batch(list(range(40)))
    with torch.no_grad():
        scores = model(everything.image).scores
    correct = int(ex.top2_correct(scores, everything.labels).sum())
    assert (got["test_samples"], got["test_errors"]) == (40, 40 - correct)
    assert got["test_accuracy"] == pytest.approx(100 * correct / 40)
    assert got["test_loss"] == pytest.approx(
        float(ex.MarginLoss()(scores, everything.target)), rel=1e-5
    )


def test_a_short_run_trains_and_resumes_on_the_same_trajectory(tmp_path: Path) -> None:
    flags = [*SHORT_RUN, "--batch-size", "4", "--threads", "2", "--lr-schedule", "exponential"]
    full = ex.run(
        [*flags, "--epochs", "2", "--out-dir", str(tmp_path / "a")], log=lambda *a, **k: None
    )
    assert [r["epoch"] for r in full] == [1, 2]
    assert full[0]["test_samples"] == 32  # 32 test digits, one partner each
    assert all(r["train_loss"] > 0 and 0 <= r["test_accuracy"] <= 100 for r in full)
    out = tmp_path / "b"
    ex.run([*flags, "--epochs", "1", "--out-dir", str(out)], log=lambda *a, **k: None)
    ex.run([*flags, "--epochs", "2", "--out-dir", str(out), "--resume"], log=lambda *a, **k: None)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(full, resumed, strict=True):
        assert (a["train_loss"], a["test_loss"]) == pytest.approx((b["train_loss"], b["test_loss"]))
