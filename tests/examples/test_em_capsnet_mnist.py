"""examples/em_capsnet_mnist.py: matrix capsules with EM routing on the shared harness, on the
embedded sample (no MNIST, no download): the preset, the spread margin's schedule (set by the
harness before every step, continued on resume), a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import em_capsnet_mnist as ex
from _helpers import SHORT_RUN
from presets import ScheduledSpreadLoss
from torchcaps import SpreadLoss, spread_margin
from torchcaps.models import CapsuleOutput


def test_defaults() -> None:
    args = ex.parse_args([])
    assert (args.epochs, args.batch_size, args.lr) == (10, 32, 3e-3)
    assert (args.lr_schedule, args.lr_decay) == ("exponential", 0.9)
    assert (args.model, args.iterations, args.margin_schedule) == ("small", 2, "linear")
    assert args.margin_epochs == 5.0
    assert ex.RECIPE.model(args) == "matrix_capsnet_small_mnist"  # type: ignore[operator]
    assert ex.RECIPE.model(ex.parse_args(["--model", "large"])) == "matrix_capsnet_mnist"  # type: ignore[operator]
    assert ex.RECIPE.model_kwargs(ex.parse_args(["--iterations", "3"])) == {
        "routing_iterations": 3,
        "coordinates": "receptive_field",
    }
    grid = ex.RECIPE.model_kwargs(ex.parse_args(["--coordinates", "grid"]))
    assert grid["coordinates"] == "grid"
    with pytest.raises(SystemExit):
        ex.parse_args(["--coordinates", "pixels"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--model", "huge"])


def test_the_margin_follows_the_step_number() -> None:
    loss = ScheduledSpreadLoss("linear", ramp_epochs=2.0)
    seen = []
    for step in (0, 50, 100, 200, 400):
        loss.set_step(step, steps_per_epoch=100)
        seen.append(loss.loss.margin)
    assert seen == pytest.approx([0.2, 0.375, 0.55, 0.9, 0.9])
    authors = ScheduledSpreadLoss("authors")
    authors.set_step(123_456, steps_per_epoch=100)
    assert authors.loss.margin == spread_margin(123_456, schedule="authors")
    # the loss is the spread loss of the class activations at that margin
    scores = torch.rand(4, 10)
    labels = torch.tensor([0, 3, 9, 3])
    out = CapsuleOutput(scores, torch.zeros(4, 10, 16), None)
    expected = SpreadLoss(margin=authors.loss.margin)(scores, labels)
    torch.testing.assert_close(authors(out, torch.zeros(4, 1, 28, 28), labels), expected)


def test_a_short_run_trains_and_resumes_on_the_same_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[tuple[int, int]] = []
    set_step = ScheduledSpreadLoss.set_step

    def recording(self: ScheduledSpreadLoss, step: int, steps_per_epoch: int) -> None:
        told.append((step, steps_per_epoch))
        set_step(self, step, steps_per_epoch)

    monkeypatch.setattr(ScheduledSpreadLoss, "set_step", recording)
    common = [
        *SHORT_RUN,
        "--batch-size",
        "16",
        "--margin-epochs",
        "2",  # the margin moves within and across epochs: a resume must continue it
    ]
    straight = ex.run(common + ["--epochs", "3", "--out-dir", str(tmp_path / "a")], log=print)
    assert told == [(s, 2) for s in range(6)]  # the run's step number before every step
    ex.run(common + ["--epochs", "1", "--out-dir", str(tmp_path / "b")], log=print)
    told.clear()
    resumed = ex.run(
        common + ["--epochs", "3", "--out-dir", str(tmp_path / "b"), "--resume"], log=print
    )
    assert told == [(s, 2) for s in range(2, 6)]  # continued, not restarted
    assert [h["epoch"] for h in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
    assert all(0.0 <= h["test_accuracy"] <= 100.0 for h in straight)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["recipe"], config["model_name"]) == (
        "em_capsnet_mnist",
        "matrix_capsnet_small_mnist",
    )
    assert config["num_parameters"] == 68_444
