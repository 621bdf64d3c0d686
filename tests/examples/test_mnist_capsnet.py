"""examples/mnist_capsnet.py: the MNIST recipe run through train.py's loop, imported as a module,
on the embedded sample (no MNIST, no download).

Runs are kept tiny (the paper model has 8.2M parameters): a few 16- or 32-image batches per epoch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import engine
import loaders
import mnist_capsnet as ex
import runtime
from _helpers import quiet

SMALL = ["--embedded-sample", "--quiet", "--max-test-samples", "64", "--test-batch-size", "32"]
# a few 16-image batches per epoch: for the resume tests
TINY = SMALL + ["--batch-size", "16", "--max-train-samples", "64", "--max-steps", "2"]


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> list[engine.Trainer]:
    """Every Trainer built during the test, in order."""
    built: list[engine.Trainer] = []
    init = engine.Trainer.__init__

    def recording_init(self: engine.Trainer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(engine.Trainer, "__init__", recording_init)
    return built


def test_defaults_are_the_papers_best_configuration() -> None:
    args = ex.parse_args([])
    assert (args.batch_size, args.test_batch_size, args.lr, args.seed) == (128, 1000, 0.001, 1)
    assert (args.log_interval, args.routing_iterations, args.reconstruction) == (10, 3, True)
    assert args.recon_weight == 0.0005 and args.amp == "none"
    assert (args.epochs, args.lr_schedule, args.lr_min_factor) == (15, "cosine", 0.01)
    assert ex.parse_args(["--no-reconstruction"]).reconstruction is False
    assert ex.parse_args(["--with_reconstruction"]).reconstruction is True
    # the original project's underscore spellings and the dashed ones both work
    a = ex.parse_args(
        ["--routing_iterations", "1", "--batch_size", "64", "--test_batch_size", "10"]
    )
    b = ex.parse_args(
        ["--routing-iterations", "1", "--batch-size", "64", "--test-batch-size", "10"]
    )
    assert vars(a) == vars(b)


def test_recipe_builds_the_registered_model() -> None:
    assert ex.RECIPE.model == "capsnet_mnist" and ex.RECIPE.dataset == "mnist"
    args = ex.parse_args(
        ["--routing-iterations", "2", "--no-reconstruction", "--conv-impl", "native"]
    )
    # stored in checkpoints: what changes the weights; conv_impl only changes how they compute
    assert ex.RECIPE.model_kwargs(args) == {"routing_iterations": 2, "reconstruction": False}
    assert ex.RECIPE.runtime_kwargs(args) == {"conv_impl": "native"}


def test_training_writes_outputs_and_loss_decreases(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = SMALL + [
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--max-train-samples",
        "128",
        "--out-dir",
        str(out),
    ]
    said: list[str] = []
    history = ex.run(argv, log=lambda m="", *a, **k: said.append(m))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert any(
        m.startswith("CapsNet (capsnet_mnist): 8,215,568 parameters (8.2M); device cpu")
        for m in said
    ), said
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for key in (
        "epoch",
        "train_loss",
        "test_loss",
        "test_accuracy",
        "epoch_seconds",
        "train_images_per_second",
        "lr",
    ):
        assert key in lines[0]
    # cosine over 3 epochs x 4 batches: after 4 of 12 steps, 0.01 + 0.99 * (1 + cos(pi / 3)) / 2
    assert lines[0]["lr"] == 0.001
    assert lines[1]["lr"] == pytest.approx(0.001 * (0.01 + 0.99 * 0.75))
    assert lines[2]["lr"] == pytest.approx(0.001 * (0.01 + 0.99 * 0.25))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_version"] == torch.__version__ and config["batch_size"] == 32
    assert "device_name" in config
    assert (config["recipe"], config["model_name"]) == ("mnist_capsnet", "capsnet_mnist")
    assert config["model_kwargs"] == {"routing_iterations": 3, "reconstruction": True}
    assert config["num_parameters"] == 8_215_568
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["epoch"] in (1, 2, 3)
        # the checkpoint says which registered model it holds, with which arguments
        assert state["format"] == engine.CHECKPOINT_FORMAT == 2
        assert state["model_name"] == "capsnet_mnist"
        assert state["model_kwargs"] == {"routing_iterations": 3, "reconstruction": True}
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


class _Interrupted(Exception):
    pass


def _interrupt_after_epoch(n: int):  # type: ignore[no-untyped-def]
    """A log function that stops the run after epoch ``n``'s summary line (as a kill would)."""

    def log(msg: str = "", *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if msg.startswith(f"epoch {n:3d} "):
            raise _Interrupted

    return log


def test_resume_after_interruption_continues_the_same_trajectory(tmp_path: Path) -> None:
    # The default (cosine) schedule: the run is stopped after epoch 1, then resumed.
    common = list(TINY)
    common += ["--epochs", "3"]
    straight = ex.run(common + ["--out-dir", str(tmp_path / "a")], log=quiet)
    with pytest.raises(_Interrupted):
        ex.run(common + ["--out-dir", str(tmp_path / "b")], log=_interrupt_after_epoch(1))
    resumed = ex.run(common + ["--resume", "--out-dir", str(tmp_path / "b")], log=quiet)
    assert [r["epoch"] for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == b["train_loss"]  # bitwise identical on CPU
        assert a["test_loss"] == b["test_loss"]
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in metrics] == [1, 2, 3]


def test_resume_with_another_schedule_fails_clearly(tmp_path: Path) -> None:
    common = TINY + ["--max-steps", "1"]
    common += ["--out-dir", str(tmp_path), "--epochs", "1"]
    ex.run(common + ["--lr-schedule", "exponential"], log=quiet)
    with pytest.raises(runtime.CheckpointError, match="--lr-schedule exponential, cannot resume"):
        ex.run(common + ["--resume", "--lr-schedule", "cosine"], log=quiet)


def test_resume_with_other_model_flags_fails_but_conv_impl_may_change(
    tmp_path: Path, trainers: list[engine.Trainer]
) -> None:
    common = TINY + ["--max-steps", "1", "--out-dir", str(tmp_path), "--lr-schedule", "exponential"]
    ex.run(common + ["--epochs", "1", "--conv-impl", "native"], log=quiet)
    last = tmp_path / "last.pt"
    saved = {"routing_iterations": 3, "reconstruction": True}
    for flags, wanted in (
        (["--no-reconstruction"], {"routing_iterations": 3, "reconstruction": False}),
        (["--routing-iterations", "2"], {"routing_iterations": 2, "reconstruction": True}),
    ):
        message = (
            f"checkpoint {last} holds capsnet_mnist with {saved}, this command line builds "
            f"capsnet_mnist with {wanted}: resume with the flags of the run that wrote it"
        )
        with pytest.raises(runtime.CheckpointError, match=re.escape(message)):
            ex.run(common + ["--epochs", "2", "--resume", *flags], log=quiet)
    # conv_impl changes how PrimaryCaps computes, not its weights: not stored, free to change
    resumed = ex.run(common + ["--epochs", "2", "--resume", "--conv-impl", "matmul"], log=quiet)
    assert [r["epoch"] for r in resumed] == [2]
    assert trainers[0].model.primary.conv_impl == "native"
    assert trainers[-1].model.primary.conv_impl == "matmul"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 2 and "conv_impl" not in state["model_kwargs"]


def test_resume_of_a_cosine_run_with_other_epochs_says_so(tmp_path: Path) -> None:
    common = list(TINY)
    common += ["--out-dir", str(tmp_path)]
    ex.run(common + ["--epochs", "1"], log=quiet)
    said: list[str] = []
    history = ex.run(
        common + ["--epochs", "2", "--resume"], log=lambda m="", *a, **k: said.append(m)
    )
    assert any(m.startswith("note: the cosine schedule is rebuilt for --epochs 2") for m in said)
    # the one-epoch run ended on its floor (step 2 of 2); epoch 2 starts at step 2 of the new
    # 4-step curve, its midpoint, from the first batch on
    assert history[0]["lr"] == pytest.approx(0.001 * (0.01 + 0.99 * 0.5))


def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    # The exponential schedule does not depend on --epochs, so a finished run can be extended.
    common = list(TINY)
    common += ["--lr-schedule", "exponential"]
    straight = ex.run(common + ["--epochs", "3", "--out-dir", str(tmp_path / "a")], log=quiet)
    ex.run(common + ["--epochs", "1", "--out-dir", str(tmp_path / "b")], log=quiet)
    resumed = ex.run(
        common + ["--epochs", "3", "--resume", "--out-dir", str(tmp_path / "b")], log=quiet
    )
    assert [r["epoch"] for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["train_loss"] == b["train_loss"]  # bitwise identical on CPU
        assert a["test_loss"] == b["test_loss"]
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in metrics] == [1, 2, 3]


def test_bad_arguments_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ex.parse_args(["--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.parse_args(["--amp", "fp8"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--lr-decay", "1.5"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--lr-min-factor", "-0.1"])
    assert "--lr-min-factor must be in [0, 1], got -0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.parse_args(["--lr-schedule", "step"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--routing-iterations", "0"])
    assert "--routing-iterations must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.parse_args(["--conv-impl", "gemm"])
    missing = tmp_path / "nowhere"
    with pytest.raises(loaders.DataError, match=f"--data-dir {missing}: MNIST expected at"):
        ex.run(["--data-dir", str(missing), "--no-download", "--epochs", "0"], log=quiet)
    with pytest.raises(runtime.CheckpointError, match="does not exist"):
        ex.run(SMALL + ["--resume", "--out-dir", str(tmp_path / "empty")], log=quiet)
    with pytest.raises(SystemExit, match="larger than the 64 training images"):
        ex.run(SMALL + ["--max-train-samples", "64", "--out-dir", str(tmp_path / "x")], log=quiet)


def test_main_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = SMALL + ["--resume", "--out-dir", str(tmp_path / "empty")]
    assert ex.main(argv) == 2
    assert (
        f"error: checkpoint {tmp_path / 'empty' / 'last.pt'} does not exist"
        in capsys.readouterr().err
    )


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    step = engine.train_step
    calls = {"n": 0}

    def nan_in_epoch_2(ctx: engine.StepContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = step(ctx, x, y)
        return loss * float("nan") if calls["n"] > 2 else loss  # epochs have 2 steps

    monkeypatch.setattr(engine, "train_step", nan_in_epoch_2)
    # checked only at the end of the epoch's 2 steps: the message still names step 1
    argv = TINY + ["--epochs", "3", "--out-dir", str(tmp_path), "--log-interval", "2"]
    assert ex.main(argv) == 2
    err = capsys.readouterr().err
    message = r"error: epoch 2: the training loss is not finite from step 1 of the epoch on \(nan at step 2,"
    assert re.search(message, err), err
    assert "last.pt" in err and "--resume" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # the good epoch
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


@pytest.mark.parametrize(("flag", "applied"), [("auto", True), ("keep", True), ("system", False)])
def test_malloc_flag(monkeypatch: pytest.MonkeyPatch, flag: str, applied: bool) -> None:
    # auto on the CPU and keep ask glibc to keep freed memory (runtime.keep_freed_memory,
    # tested in test_runtime.py); system leaves malloc alone. Spied: the setting is global.
    calls: list[bool] = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(True) or True)
    said: list[str] = []
    engine.Trainer(ex.parse_args([*TINY, "--malloc", flag]), ex.RECIPE, log=said.append)
    assert calls == ([True] if applied else [])
    assert ("malloc: keeps freed memory" in said) == applied
