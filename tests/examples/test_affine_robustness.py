"""examples/affine_robustness.py: the affine-robustness recipe on the shared harness, on the
embedded sample (no MNIST, no download): the 40x40 training canvases, both test sets of the
evaluation, the two models and their losses, short runs that resume on the same trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import affine_robustness as ex
import engine
from _helpers import SHORT_RUN
from torchcaps.datasets import affine_mnist, content_margins
from torchcaps.models import CapsuleOutput, get_model

SMALL_CNN = ["--model", "cnn", "--cnn-channels", "4", "4", "2", "--cnn-hidden", "8", "6"]


def _digits(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 digits (n, 28, 28): a random blob inside rows and columns 4-23."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 4:24, 4:24] = torch.randint(1, 256, (n, 20, 20), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_defaults_and_model_arguments() -> None:
    args = ex.parse_args([])
    assert (args.epochs, args.batch_size, args.lr, args.model) == (15, 128, 1e-3, "capsnet")
    assert (args.max_shift, args.affine_seed) == (2, 0)
    assert ex.RECIPE.model(args) == "capsnet_mnist"
    assert ex.RECIPE.model_kwargs(args) == {
        "in_shape": (1, 40, 40),
        "routing_iterations": 3,
        "reconstruction": True,
    }
    assert ex.RECIPE.runtime_kwargs(args) == {"conv_impl": "auto"}
    cnn = ex.parse_args(SMALL_CNN)
    assert ex.RECIPE.model(cnn) == "baseline_cnn_mnist"
    assert ex.RECIPE.model_kwargs(cnn) == {
        "in_shape": (1, 40, 40),
        "channels": (4, 4, 2),
        "hidden": (8, 6),
        "dropout": 0.5,
    }
    assert ex.RECIPE.runtime_kwargs(cnn) == {}
    paper = ex.RECIPE.model_kwargs(ex.parse_args(["--model", "cnn"]))
    assert (paper["channels"], paper["hidden"]) == ((256, 256, 128), (328, 192))
    for bad in (
        ["--max-shift", "7"],
        ["--max-shift", "-1"],
        ["--affine-seed", "-1"],
        [*SMALL_CNN, "--cnn-hidden", "0", "6"],
        [*SMALL_CNN, "--cnn-dropout", "1"],
        ["--model", "rnn"],
    ):
        with pytest.raises(SystemExit):
            ex.parse_args(bad)


@pytest.mark.parametrize("max_shift", [0, 2, 6])
def test_a_training_digit_is_centred_on_the_canvas_then_shifted(max_shift: int) -> None:
    images, labels = _digits()
    task = ex.AffineTask(max_shift=max_shift)
    x, y = task.train_batch(
        images, labels, torch.arange(12), torch.Generator().manual_seed(1), 0, 1
    )
    assert x.shape == (12, 1, 40, 40) and torch.equal(y, labels)
    top, _, left, _ = content_margins(x)
    # the blob starts at row and column 4 of the digit, 6 + 4 on the canvas before the shift
    dy, dx = top - 10, left - 10
    assert int(dy.abs().max()) <= max_shift and int(dx.abs().max()) <= max_shift
    for k in range(12):
        want = F.pad(images[k].float() / 255, (6, 6, 6, 6)).roll((int(dy[k]), int(dx[k])), (0, 1))
        torch.testing.assert_close(x[k, 0], want)
    if max_shift:
        assert len({(int(a), int(b)) for a, b in zip(dy, dx, strict=True)}) > 1


def test_evaluation_scores_the_centred_and_the_affine_digits() -> None:
    images, labels = _digits(10, seed=2)
    task = ex.AffineTask(affine_seed=5)
    torch.manual_seed(0)
    model = get_model("baseline_cnn_mnist", in_shape=(1, 40, 40), channels=(4, 4, 2), hidden=(8, 6))
    ctx = engine.StepContext(
        model, ex.CrossEntropy(), None, None, None, "none", torch.device("cpu")
    )  # type: ignore[arg-type]
    got = task.evaluate(ctx, images, labels, batch_size=4, memory_format=torch.contiguous_format)
    model.eval()
    affine = affine_mnist(images, labels, seed=5).images
    affine = (affine * 255).round() / 255  # stored as 8-bit images
    centred = F.pad(images.float().unsqueeze(1) / 255, (6, 6, 6, 6))
    for prefix, x in (("test", centred), ("affine", affine)):
        with torch.no_grad():
            logits = model(x).scores
        correct = int((logits.argmax(1) == labels).sum())
        assert got[f"{prefix}_samples"] == 10
        assert got[f"{prefix}_errors"] == 10 - correct
        assert got[f"{prefix}_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert got["test_loss"] != pytest.approx(got["affine_loss"])
    assert task.affine_set(images, labels) is task.affine_set(images, labels)  # made once


def test_the_losses() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g)
    labels = torch.tensor([1, 0, 9, 3])
    out = CapsuleOutput(logits, None, None)
    want = -torch.log_softmax(logits, 1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(ex.CrossEntropy()(out, torch.zeros(4, 1, 40, 40), labels), want)
    assert isinstance(ex.loss(ex.parse_args(SMALL_CNN)), ex.CrossEntropy)
    assert not isinstance(ex.loss(ex.parse_args([])), ex.CrossEntropy)


@pytest.mark.parametrize("model", [SMALL_CNN, ["--model", "capsnet"]], ids=["cnn", "capsnet"])
def test_a_short_run_trains_and_resumes_on_the_same_trajectory(
    tmp_path: Path, model: list[str]
) -> None:
    flags = [
        *SHORT_RUN,
        *model,
        "--batch-size",
        "4",
        "--threads",
        "2",
        "--lr-schedule",
        "exponential",
    ]
    full = ex.run(
        [*flags, "--epochs", "2", "--out-dir", str(tmp_path / "a")], log=lambda *a, **k: None
    )
    assert [r["epoch"] for r in full] == [1, 2]
    assert all(r["test_samples"] == r["affine_samples"] == 32 for r in full)
    assert all(0 <= r["affine_accuracy"] <= 100 and r["train_loss"] > 0 for r in full)
    out = tmp_path / "b"
    ex.run([*flags, "--epochs", "1", "--out-dir", str(out)], log=lambda *a, **k: None)
    ex.run([*flags, "--epochs", "2", "--out-dir", str(out), "--resume"], log=lambda *a, **k: None)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(full, resumed, strict=True):
        assert (a["train_loss"], a["affine_loss"]) == pytest.approx(
            (b["train_loss"], b["affine_loss"])
        )
