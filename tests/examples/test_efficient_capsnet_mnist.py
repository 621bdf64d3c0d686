"""examples/efficient_capsnet_mnist.py: the Efficient-CapsNet recipe on the shared harness, on the
embedded sample (no MNIST, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import augment
import efficient_capsnet_mnist as ex
from _helpers import SHORT_RUN


def test_defaults_are_the_official_recipe() -> None:
    args = ex.parse_args([])
    assert (args.epochs, args.batch_size, args.lr) == (150, 16, 5e-4)
    assert (args.lr_schedule, args.lr_decay, args.lr_floor) == ("exponential", 0.97, 5e-5)
    assert args.recon_weight == 0.0005 and args.reconstruction is True
    assert ex.RECIPE.model == "efficient_capsnet_mnist" and ex.RECIPE.dataset == "mnist"
    assert ex.RECIPE.augment == augment.EfficientCapsNetAugment()
    assert ex.RECIPE.model_kwargs(ex.parse_args(["--no-reconstruction"])) == {
        "reconstruction": False
    }
    with pytest.raises(SystemExit):
        ex.parse_args(["--recon-weight", "-1"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--lr-floor", "-1e-5"])


def test_a_short_run_trains_and_resumes_on_the_same_trajectory(tmp_path: Path) -> None:
    common = [
        *SHORT_RUN,
        "--lr-decay",
        "0.5",
        "--lr-floor",
        "2e-4",
    ]
    straight = ex.run(common + ["--epochs", "3", "--out-dir", str(tmp_path / "a")], log=print)
    ex.run(common + ["--epochs", "1", "--out-dir", str(tmp_path / "b")], log=print)
    resumed = ex.run(
        common + ["--epochs", "3", "--out-dir", str(tmp_path / "b"), "--resume"], log=print
    )
    assert [h["epoch"] for h in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
    # 5e-4, then x0.5 per epoch, floored at 2e-4
    assert [h["lr"] for h in straight] == pytest.approx([5e-4, 2.5e-4, 2e-4])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["recipe"], config["model_name"]) == (
        "efficient_capsnet_mnist",
        "efficient_capsnet_mnist",
    )
    assert config["num_parameters"] == 1_573_168
