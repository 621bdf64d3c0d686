"""examples/export_onnx.py: the inference model of a checkpoint, exported to ONNX and run with
onnxruntime; bad checkpoints are reported. (torch.export and TorchScript of the model itself are
checked in tests/models/test_capsnet.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import export_onnx as export
import runtime
from torchcaps.models import get_model


def _checkpoint_like_training(path: Path, epoch: int = 1, seed: int = 3) -> dict:
    """A checkpoint as mnist_capsnet.py wrote them before the model registry (no model_name)."""
    torch.manual_seed(seed)
    state = {
        "epoch": epoch,
        "best_accuracy": 10.0,
        "model": get_model("capsnet_mnist").state_dict(),
        "args": {"routing_iterations": 3, "reconstruction": True},
    }
    runtime.atomic_save(state, path)
    return state


def test_onnx_export_predicts_like_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "best.pt"
    _checkpoint_like_training(ckpt)
    out = tmp_path / "model.onnx"
    rc = export.main(["--checkpoint", str(ckpt), "--out", str(out), "--opset", "18"])
    assert rc == 0 and out.is_file()
    model = export.build_model(ckpt)
    images = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_lengths, onnx_recon = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        lengths, recon = model(images)
    assert onnx_lengths.shape == (100, 10) and onnx_recon.shape == (100, 1, 28, 28)
    assert torch.equal(torch.from_numpy(onnx_lengths).argmax(1), lengths.argmax(1))
    torch.testing.assert_close(torch.from_numpy(onnx_lengths), lengths, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(onnx_recon), recon, atol=1e-5, rtol=1e-4)
    report = export.verify_onnx(model, out, n=100)  # the script's own check agrees
    assert report["prediction_mismatches"] == 0


def test_inference_model_of_a_checkpoint(tmp_path: Path) -> None:
    """The checkpoint's weights, the decoder masked by the prediction; --lengths-only drops it."""
    ckpt = tmp_path / "best.pt"
    state = _checkpoint_like_training(ckpt, seed=4)
    full = export.build_model(ckpt)
    lengths_only = export.build_model(ckpt, lengths_only=True)
    assert full.output_names == ["lengths", "reconstruction"] and full.in_shape == (1, 28, 28)
    assert lengths_only.output_names == ["lengths"]
    reference = get_model("capsnet_mnist").eval()
    reference.load_state_dict(state["model"])
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        scores, recon = full(x)
        out = reference(x)
        torch.testing.assert_close(scores, out.scores)
        torch.testing.assert_close(recon, out.reconstruction)
        torch.testing.assert_close(lengths_only(x), out.scores)  # a tensor, not a tuple
    bare = export.InferenceModel(get_model("capsnet_mnist", reconstruction=False))
    assert bare.output_names == ["lengths"]  # a model without decoder exports the lengths only


def test_export_script_reports_bad_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00" * 64)
    assert export.main(["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"checkpoint {bad}" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
