"""examples/em_capsnet_smallnorb.py: the smallNORB preset on the shared harness, on small files
written by the tests in the official format (smallNORB itself cannot be downloaded here): the
preset, the paper's preprocessing in training and at test, a short run, the data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import em_capsnet_smallnorb as ex
from _helpers import fake_smallnorb_split
from augment import SmallNORBAugment
from engine import to_input
from loaders import DataError, load_dataset
from torchcaps.datasets import preprocess_smallnorb


def test_defaults() -> None:
    args = ex.parse_args([])
    assert (args.epochs, args.batch_size, args.lr) == (50, 32, 3e-3)
    assert (args.lr_schedule, args.lr_decay) == ("exponential", 0.9985)
    assert (args.model, args.iterations, args.margin_epochs) == ("small", 2, 10.0)
    assert ex.RECIPE.model(args) == "matrix_capsnet_small_smallnorb"  # type: ignore[operator]
    assert ex.RECIPE.model(ex.parse_args(["--model", "large"])) == "matrix_capsnet_smallnorb"  # type: ignore[operator]
    assert ex.RECIPE.dataset == "smallnorb"
    assert "smallNORB" in ex.build_parser().format_help()


def test_training_and_test_batches_are_the_papers_preprocessing() -> None:
    images = torch.randint(0, 256, (6, 2, 96, 96), dtype=torch.uint8)
    aug = SmallNORBAugment()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x = images.float() / 255.0
    torch.testing.assert_close(aug(x, g1), preprocess_smallnorb(x, train=True, generator=g2))
    test = to_input(images, torch.contiguous_format, ex.RECIPE.eval_transform)
    torch.testing.assert_close(test, preprocess_smallnorb(images, train=False))
    assert test.shape == (6, 2, 32, 32)


def test_sharded_batches_draw_for_the_global_batch() -> None:
    """Two ranks' halves of a global batch get the crops of a one-process run."""
    x = torch.rand(8, 2, 96, 96)
    aug = SmallNORBAugment()
    whole = aug(x, torch.Generator().manual_seed(1))
    halves = [aug(x[r * 4 : (r + 1) * 4], torch.Generator().manual_seed(1), r, 2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), whole)


def test_a_short_run_on_files_in_the_official_format(tmp_path: Path) -> None:
    data = tmp_path / "norb"
    data.mkdir()
    fake_smallnorb_split(data, "train", 16, seed=0)
    fake_smallnorb_split(data, "test", 8, seed=1, compress=True)
    history = ex.run(
        [
            "--data-dir", str(data), "--quiet", "--batch-size", "8", "--max-steps", "1",
            "--epochs", "1", "--iterations", "1", "--out-dir", str(tmp_path / "run"),
        ],
        log=print,
    )  # fmt: skip
    assert len(history) == 1
    assert history[0]["test_samples"] == 8
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["recipe"], config["model_name"]) == (
        "em_capsnet_smallnorb",
        "matrix_capsnet_small_smallnorb",
    )
    assert config["num_parameters"] == 68_754


def test_data_errors_name_the_directory_and_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--data-dir .*training-dat\.mat.*cs\.nyu\.edu"):
        load_dataset("smallnorb", tmp_path)
    with pytest.raises(DataError, match="no embedded sample"):
        load_dataset("smallnorb", None, embedded_sample=True)
    fake_smallnorb_split(tmp_path, "train", 2, seed=0)
    with pytest.raises(DataError, match="testing-dat"):
        load_dataset("smallnorb", tmp_path)
