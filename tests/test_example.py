"""The MNIST example's training loop, imported as a module, on the embedded sample (no MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_capsnet.py"


@pytest.fixture(scope="module")
def ex():  # type: ignore[no-untyped-def]
    return load_example("mnist_capsnet.py")


def _quiet(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    pass


SMALL = ["--embedded-sample", "--quiet", "--max-test-samples", "64", "--test-batch-size", "32"]
# a few 16-image batches per epoch: for the resume tests
TINY = SMALL + ["--batch-size", "16", "--max-train-samples", "64", "--max-steps", "2"]


def test_paper_model(ex) -> None:  # type: ignore[no-untyped-def]
    model = ex.CapsNet()
    assert ex.count_parameters(model) == 8_215_568
    assert ex.count_parameters(ex.CapsNet(reconstruction=False)) == 6_804_224
    lengths, recon = model(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
    assert lengths.shape == (2, 10) and recon.shape == (2, 1, 28, 28)
    assert model.digits.routing.iterations == 3


def test_defaults_are_the_papers_best_configuration(ex) -> None:  # type: ignore[no-untyped-def]
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


def test_random_shift_is_a_per_sample_shift(ex) -> None:  # type: ignore[no-untyped-def]
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    shifted = ex.random_shift(images, 2, g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[k, dy : dy + 28, dx : dx + 28], shifted[k])
        ]
        assert len(matches) == 1  # a window of the zero-padded image: a shift of at most 2
        seen.add(matches[0])
    assert len(seen) > 10  # offsets drawn independently per sample


def test_training_writes_outputs_and_loss_decreases(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
    history = ex.run(argv, log=_quiet)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
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
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["epoch"] in (1, 2, 3)


class _Interrupted(Exception):
    pass


def _interrupt_after_epoch(n: int):  # type: ignore[no-untyped-def]
    """A log function that stops the run after epoch ``n``'s summary line (as a kill would)."""

    def log(msg: str = "", *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if msg.startswith(f"epoch {n:3d} "):
            raise _Interrupted

    return log


def test_cosine_factor_values(ex) -> None:  # type: ignore[no-untyped-def]
    assert ex.cosine_factor(0, 100, 0.01) == 1.0
    assert ex.cosine_factor(50, 100, 0.01) == pytest.approx(0.505)
    assert ex.cosine_factor(25, 100, 0.0) == pytest.approx((1 + 2**-0.5) / 2)
    assert ex.cosine_factor(100, 100, 0.01) == pytest.approx(0.01)
    assert ex.cosine_factor(150, 100, 0.01) == pytest.approx(0.01)  # held after the end
    steps = [ex.cosine_factor(t, 40, 0.1) for t in range(41)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly decreasing


def test_resume_after_interruption_continues_the_same_trajectory(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The default (cosine) schedule: the run is stopped after epoch 1, then resumed.
    common = list(TINY)
    common += ["--epochs", "3"]
    straight = ex.run(common + ["--out-dir", str(tmp_path / "a")], log=_quiet)
    with pytest.raises(_Interrupted):
        ex.run(common + ["--out-dir", str(tmp_path / "b")], log=_interrupt_after_epoch(1))
    resumed = ex.run(common + ["--resume", "--out-dir", str(tmp_path / "b")], log=_quiet)
    assert [r["epoch"] for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == b["train_loss"]  # bitwise identical on CPU
        assert a["test_loss"] == b["test_loss"]
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in metrics] == [1, 2, 3]


def test_resume_with_another_schedule_fails_clearly(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = TINY + ["--max-steps", "1"]
    common += ["--out-dir", str(tmp_path), "--epochs", "1"]
    ex.run(common + ["--lr-schedule", "exponential"], log=_quiet)
    with pytest.raises(ex.CheckpointError, match="--lr-schedule exponential, cannot resume"):
        ex.run(common + ["--resume", "--lr-schedule", "cosine"], log=_quiet)


def test_resume_of_a_cosine_run_with_other_epochs_says_so(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = list(TINY)
    common += ["--out-dir", str(tmp_path)]
    ex.run(common + ["--epochs", "1"], log=_quiet)
    said: list[str] = []
    history = ex.run(
        common + ["--epochs", "2", "--resume"], log=lambda m="", *a, **k: said.append(m)
    )
    assert any(m.startswith("note: the cosine schedule is rebuilt for --epochs 2") for m in said)
    # the one-epoch run ended on its floor (step 2 of 2); epoch 2 starts at step 2 of the new
    # 4-step curve, its midpoint, from the first batch on
    assert history[0]["lr"] == pytest.approx(0.001 * (0.01 + 0.99 * 0.5))


def test_resume_continues_the_same_trajectory(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The exponential schedule does not depend on --epochs, so a finished run can be extended.
    common = list(TINY)
    common += ["--lr-schedule", "exponential"]
    straight = ex.run(common + ["--epochs", "3", "--out-dir", str(tmp_path / "a")], log=_quiet)
    ex.run(common + ["--epochs", "1", "--out-dir", str(tmp_path / "b")], log=_quiet)
    resumed = ex.run(
        common + ["--epochs", "3", "--resume", "--out-dir", str(tmp_path / "b")], log=_quiet
    )
    assert [r["epoch"] for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["train_loss"] == b["train_loss"]  # bitwise identical on CPU
        assert a["test_loss"] == b["test_loss"]
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in metrics] == [1, 2, 3]


def test_bad_arguments_fail_clearly(ex, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
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
    missing = tmp_path / "nowhere"
    with pytest.raises(ex.DataError, match=f"--data-dir {missing}: MNIST expected at"):
        ex.run(["--data-dir", str(missing), "--no-download", "--epochs", "0"], log=_quiet)
    with pytest.raises(ex.CheckpointError, match="does not exist"):
        ex.run(SMALL + ["--resume", "--out-dir", str(tmp_path / "empty")], log=_quiet)
    with pytest.raises(SystemExit, match="larger than the 64 training images"):
        ex.run(SMALL + ["--max-train-samples", "64", "--out-dir", str(tmp_path / "x")], log=_quiet)


def test_truncated_data_file_is_reported(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ex.MNIST_SHA256:
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    with pytest.raises(
        ex.DataError, match="train-images-idx3-ubyte has 104 bytes, expected 47040016"
    ):
        ex.run(["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=_quiet)


def test_corrupt_checkpoint_is_reported_with_its_name(ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ex.CheckpointError, match=f"checkpoint {bad} cannot be loaded safely"):
        ex.load_checkpoint(bad)


def test_embedded_sample_is_real_mnist(ex) -> None:  # type: ignore[no-untyped-def]
    data = ex.load_embedded()
    assert data.train_images.shape == (5000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert data.train_images.dtype == torch.uint8
    # every class is present in both splits
    assert set(data.train_labels.tolist()) == set(range(10))
    assert set(data.test_labels.tolist()) == set(range(10))
    size = sum(p.stat().st_size for p in ex.EMBEDDED_DIR.iterdir())
    assert size < 2 * 1024 * 1024
