"""examples/visualize.py: every figure from an untrained CapsNet, and the command line."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

import loaders
import runtime
import visualize as vis
from torchcaps.models import get_model


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return get_model("capsnet_mnist").eval()


@pytest.fixture(scope="module")
def sample():  # type: ignore[no-untyped-def]
    data = loaders.load_embedded()
    return data.test_images[:8], data.test_labels[:8]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def red_pixels(path: Path) -> int:
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[..., :3]
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    return int(red.sum())


def write_metrics(path: Path, epochs: int = 3) -> None:
    lines = [
        json.dumps(
            {
                "epoch": e,
                "train_loss": 0.5 / e,
                "test_loss": 0.4 / e,
                "test_accuracy": 90.0 + e,
                "best_test_accuracy": 90.0 + e,
            }
        )
        for e in range(1, epochs + 1)
    ]
    path.write_text("\n".join(lines[:1] + ["not json"] + lines[1:]) + "\n")


def test_reconstructions(model, sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, labels = sample
    path = vis.plot_reconstructions(model, images[:5], labels[:5], tmp_path / "r.png", columns=4)
    assert path == tmp_path / "r.png"
    assert png_size(path) == vis.reconstructions_size(5, 4) == (400, 450)
    assert vis.reconstructions_size(16) == (800, 450)
    # float input (B, 1, 28, 28) in [0, 1] works too
    x = torch.rand(3, 1, 28, 28)
    out = vis.plot_reconstructions(model, x, torch.tensor([0, 1, 2]), tmp_path / "f.png")
    assert png_size(out) == (300, 250)


def test_reconstructions_mark_misclassified_in_red(model, sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, _ = sample
    pred = vis.predict(model, images[:4])
    right = vis.plot_reconstructions(model, images[:4], pred, tmp_path / "right.png")
    wrong = vis.plot_reconstructions(model, images[:4], (pred + 1) % 10, tmp_path / "wrong.png")
    assert red_pixels(right) == 0
    assert red_pixels(wrong) > 4 * 4 * 80  # a 3-pixel red frame around 8 images


def test_perturbations(model, sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, labels = sample
    assert len(vis.PERTURBATIONS) == 11
    assert (
        vis.PERTURBATIONS[0] == -0.25
        and vis.PERTURBATIONS[5] == 0
        and vis.PERTURBATIONS[-1] == 0.25
    )
    tiles = vis.perturbed_reconstructions(model, images[0], int(labels[0]))
    assert tiles.shape == (16, 11, 28, 28)
    # the middle column is the unperturbed reconstruction in every row; the others differ
    with torch.no_grad():
        _, v, _ = vis.capsules(model, vis.as_input(images[:1]))
        plain = model.decoder(v, labels[:1])[0, 0]
    torch.testing.assert_close(tiles[:, 5], plain.expand(16, 28, 28))
    assert not torch.allclose(tiles[:, 0], tiles[:, 10])

    path = vis.plot_perturbations(
        model, images[:2], [int(labels[0]), 3], tmp_path / "p.png", indices=[0, 1]
    )
    assert png_size(path) == vis.perturbations_size(2) == (800, 640)
    assert vis.perturbations_size(10) == (2000, 1230)


def test_coupling(model, sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, labels = sample
    path = vis.plot_coupling(model, images[0], int(labels[0]), tmp_path / "c.png", index=0)
    assert png_size(path) == vis.COUPLING_SIZE == (1100, 740)
    # one routing iteration gives uniform coupling; the figure still renders (no degenerate norm)
    flat = get_model("capsnet_mnist", routing_iterations=1, reconstruction=False).eval()
    path = vis.plot_coupling(flat, torch.rand(1, 28, 28), None, tmp_path / "c1.png")
    assert png_size(path) == (1100, 740)


def test_curves(tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    assert [r["epoch"] for r in vis.read_metrics(metrics)] == [1, 2, 3]
    path = vis.plot_curves(metrics, tmp_path / "curves.png")
    assert png_size(path) == vis.CURVES_SIZE == (1000, 400)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(vis.VisualizeError, match="no epoch records"):
        vis.plot_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_accuracy_series_lists_every_test_set_but_not_running_bests() -> None:
    records = [
        {"epoch": 1, "test_accuracy": 98.0, "best_test_accuracy": 98.0},
        {"epoch": 2, "test_accuracy": 99.0, "affine_accuracy": 40.0, "best_test_accuracy": 99.0},
    ]
    series = vis.accuracy_series(records)
    assert list(series) == ["test", "affine"]
    assert series["test"] == [98.0, 99.0]
    assert math.isnan(series["affine"][0]) and series["affine"][1] == 40.0


def test_reconstruction_figures_need_a_decoder(sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, labels = sample
    bare = get_model("capsnet_mnist", reconstruction=False)
    with pytest.raises(vis.VisualizeError, match="without reconstruction"):
        vis.plot_reconstructions(bare, images[:2], labels[:2], tmp_path / "r.png")
    with pytest.raises(vis.VisualizeError, match="without reconstruction"):
        vis.plot_perturbations(bare, images[:1], [1], tmp_path / "p.png")


def test_selection(model, sample) -> None:  # type: ignore[no-untyped-def]
    images, labels = sample
    predictions = vis.LazyPredictions(model, images, batch_size=4)
    pred = vis.predict(model, images)
    assert vis.select_reconstructions(predictions, labels, 3) == [0, 1, 2]
    chosen = vis.select_reconstructions(predictions, labels, 4, prefer_misclassified=True)
    assert len(chosen) == 4 and chosen == sorted(chosen)
    wrong = (pred != labels).nonzero().flatten().tolist()
    assert sum(i in wrong for i in chosen) >= min(2, len(wrong))
    per_class = vis.select_per_class(predictions, labels, [int(labels[0]), 3])
    assert int(labels[0]) in per_class and 3 not in per_class  # no 3 among the first 8 digits
    torch.testing.assert_close(predictions.upto(8), pred)


def test_main_on_a_checkpoint(model, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    run.mkdir()
    state = {
        "model": model.state_dict(),
        "args": {"routing_iterations": 3, "reconstruction": True},
        "epoch": 3,
    }
    runtime.atomic_save(state, run / "best.pt")
    write_metrics(run / "metrics.jsonl")
    out = tmp_path / "figures"
    argv = ["--checkpoint", str(run / "best.pt"), "--out-dir", str(out), "--device", "cpu"]
    argv += ["--max-samples", "24", "--num-digits", "4", "--digit", "3", "--index", "2"]
    argv += ["--prefer-misclassified"]
    assert vis.main(argv) == 0
    expected = {
        "reconstructions.png": (400, 250),
        "perturbations.png": (400, 640),
        "coupling.png": (1100, 740),
        "curves.png": (1000, 400),
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, size in expected.items():
        assert png_size(out / name) == size, name
    printed = capsys.readouterr().out
    assert "wrote" in printed and "misclassified among the first" in printed

    # --figures selects; the default output folder is the checkpoint's
    argv = ["--checkpoint", str(run / "best.pt"), "--figures", "curves", "--device", "cpu"]
    assert vis.main(argv) == 0
    assert png_size(run / "curves.png") == (1000, 400)
    assert not (run / "coupling.png").exists()


def test_main_without_decoder_skips_reconstructions(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bare = get_model("capsnet_mnist", routing_iterations=1, reconstruction=False)
    state = {"model": bare.state_dict(), "args": {"routing_iterations": 1}, "epoch": 1}
    runtime.atomic_save(state, tmp_path / "last.pt")
    argv = ["--checkpoint", str(tmp_path / "last.pt"), "--max-samples", "4", "--device", "cpu"]
    assert vis.main(argv + ["--figures", "reconstructions,perturbations", "coupling"]) == 0
    out = capsys.readouterr().out
    assert "skipped reconstructions.png" in out and "skipped perturbations.png" in out
    assert "routing iterations 1, without decoder" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["coupling.png"]
    # nothing drawable at all: exit code 1
    assert vis.main(argv + ["--figures", "reconstructions"]) == 1


def test_main_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert vis.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vis.parse_args(["--checkpoint", "x.pt", "--figures", "histogram"])
    with pytest.raises(SystemExit):
        vis.parse_args(["--checkpoint", "x.pt", "--digit", "10"])
    args = vis.parse_args(["--checkpoint", "x.pt", "--figures", "curves,coupling"])
    assert args.figures == ["coupling", "curves"]
    assert vis.parse_args(["--checkpoint", "x.pt"]).figures == list(vis.FIGURES)


# -- Figure 5: MultiMNIST ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def multimnist_model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return get_model("capsnet_multimnist").eval()


def test_multimnist_figure(multimnist_model, sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from torchcaps.datasets import MultiMNIST

    pairs = MultiMNIST(*sample, seed=0).batch(list(range(5)))
    path = vis.plot_multimnist(
        multimnist_model, pairs.image, pairs.labels, tmp_path / "m.png", columns=3
    )
    assert png_size(path) == vis.reconstructions_size(5, 3) == (300, 450)
    with pytest.raises(ValueError, match=r"labels \(n, 2\), got images \(5, 1, 36, 36\)"):
        vis.plot_multimnist(multimnist_model, pairs.image, pairs.labels[:, 0], tmp_path / "x.png")


def test_main_on_a_multimnist_checkpoint(multimnist_model, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    state = {
        "model": multimnist_model.state_dict(),
        "model_name": "capsnet_multimnist",
        "model_kwargs": {},
        "args": {},
        "epoch": 2,
    }
    runtime.atomic_save(state, tmp_path / "best.pt")
    write_metrics(tmp_path / "metrics.jsonl")
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu", "--num-digits", "4"]
    assert vis.main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["curves.png", "multimnist.png"]
    assert png_size(tmp_path / "multimnist.png") == (400, 250)
    printed = capsys.readouterr().out
    assert "skipped coupling.png: not drawn for a MultiMNIST model (capsnet_multimnist)" in printed
    # and an MNIST model does not draw Figure 5
    mnist = {"model": get_model("capsnet_mnist").state_dict(), "args": {}, "epoch": 1}
    runtime.atomic_save(mnist, tmp_path / "mnist.pt")
    argv = ["--checkpoint", str(tmp_path / "mnist.pt"), "--figures", "multimnist"]
    assert vis.main(argv + ["--device", "cpu"]) == 1
    assert "skipped multimnist.png: not drawn for a single-digit model" in capsys.readouterr().out
