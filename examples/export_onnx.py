"""Export a trained model of the examples (any registered model) to ONNX for inference.

    python examples/export_onnx.py --checkpoint runs/mnist_capsnet/best.pt --out capsnet.onnx
    python examples/export_onnx.py --out capsnet.onnx            # untrained model: a smoke test
    python examples/export_onnx.py --checkpoint best.pt --lengths-only --verify 100

The exported graph is the evaluation model: ``images`` (B, *in_shape), float32 in [0, 1] ->
``lengths`` (B, K), the class scores (for CapsNet the capsules' lengths; the prediction is their
argmax), and, unless ``--lengths-only`` (or a model without decoder), ``reconstruction``
(B, *in_shape), the decoder's output masked by the prediction (``target=None``). The batch
dimension is dynamic. The checkpoint is read with ``runtime.load_model`` (``weights_only=True``:
a checkpoint that carries code is refused), which rebuilds the model from the registry name and
keyword arguments stored in it.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter, opset 18
by default (``--opset``). It needs the ``onnx`` and ``onnxscript`` packages
(``pip install onnx onnxscript``); ``--verify N`` also needs ``onnxruntime`` and compares the
ONNX model with PyTorch on N random images (same predictions, lengths within 1e-4).

Other export paths, as tested with torch 2.14.1 (``tests/models/test_capsnet.py``,
``tests/examples/test_export_onnx.py``):

- ``torch.export.export``: works, with a dynamic batch dimension; this is what the ONNX
  exporter above uses.
- ``torch.compile(fullgraph=True)``: works, no graph breaks.
- TorchScript, ``torch.jit.trace``: works and generalises to other batch sizes (the shape
  checks of the library emit ``TracerWarning``\\ s; they only guard error paths), for models
  with a decoder; without one, the output holds ``None``, which a traced module cannot return.
  TorchScript itself is deprecated upstream (``FutureWarning`` since torch 2.9); prefer
  ``torch.export``.
- TorchScript, ``torch.jit.script``: unsupported. The library's signatures use PEP 604
  annotations (``Tensor | None``), ``typing.overload`` and Python-level argument validation
  (``isinstance``, f-strings, ``math.prod`` over shapes) that the TorchScript compiler rejects.
- The legacy TorchScript-based ONNX exporter (``dynamo=False``): unsupported. It records the
  example input's batch size as a constant in the ``Reshape`` that flattens the input capsules
  of ``DenseCaps``, so the ONNX model fails on any other batch size.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import runtime
from torchcaps.models import get_model, list_models


class InferenceModel(nn.Module):
    """The evaluation forward of a registered model: images -> scores (and the reconstruction).

    The decoder is masked by the prediction (``target=None``).
    """

    def __init__(self, model: nn.Module, reconstruction: bool = True) -> None:
        super().__init__()
        self.model = model
        self.in_shape = tuple(model.in_shape)
        self.reconstruction = reconstruction and getattr(model, "decoder", None) is not None

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.model(images)
        if self.reconstruction:
            assert out.reconstruction is not None
            return out.scores, out.reconstruction
        return out.scores

    @property
    def output_names(self) -> list[str]:
        return ["lengths", "reconstruction"] if self.reconstruction else ["lengths"]


def build_model(
    checkpoint: Path | None,
    *,
    lengths_only: bool = False,
    seed: int = 0,
    model_name: str = "capsnet_mnist",
) -> InferenceModel:
    """The inference model of ``checkpoint`` (or untrained ``model_name``, seeded, when None)."""
    if checkpoint is not None:
        model, _ = runtime.load_model(checkpoint)
    else:
        torch.manual_seed(seed)
        model = get_model(model_name).eval()
    return InferenceModel(model, not lengths_only).eval()


def export_onnx(
    model: InferenceModel, out: Path, *, opset: int = 18, verbose: bool = False
) -> Path:
    """Export ``model`` to ``out`` with a dynamic batch dimension; return ``out``."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(
                f"ONNX export needs the {package!r} package: pip install onnx onnxscript"
            )
    example = torch.rand(2, *model.in_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=model.output_names,
            dynamic_shapes=({0: batch},),
            verbose=verbose,
        )
    assert program is not None
    program.save(str(out))
    return out


def verify_onnx(model: InferenceModel, path: Path, n: int = 100, seed: int = 0) -> dict[str, Any]:
    """Run the ONNX model with onnxruntime on ``n`` random images; compare with PyTorch.

    Returns the largest absolute difference of each output and the number of samples whose
    predicted class differs; raises ``SystemExit`` when onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SystemExit("--verify needs onnxruntime: pip install onnxruntime") from exc
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *model.in_shape, generator=g)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    if isinstance(expected, Tensor):
        expected = (expected,)
    report: dict[str, Any] = {"samples": n}
    for name, e, o in zip(model.output_names, expected, got):
        report[f"max_abs_diff_{name}"] = float((torch.from_numpy(o) - e).abs().max())
    onnx_pred = torch.from_numpy(got[0]).argmax(dim=1)
    report["prediction_mismatches"] = int((onnx_pred != expected[0].argmax(dim=1)).sum())
    report["onnx_predictions"] = onnx_pred
    report["torch_predictions"] = expected[0].argmax(dim=1)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Export the MNIST CapsNet to ONNX (inference: lengths + reconstruction).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="last.pt/best.pt of mnist_capsnet.py"
    )
    p.add_argument("--out", type=Path, default=Path("capsnet.onnx"), help="the .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument(
        "--lengths-only", action="store_true", help="export only the lengths, no decoder"
    )
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="compare with PyTorch on N random images via onnxruntime (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of an untrained model")
    p.add_argument(
        "--model",
        default="capsnet_mnist",
        choices=list_models(),
        help="the registered model to export untrained when there is no --checkpoint",
    )
    p.add_argument("--verbose", action="store_true", help="the exporter's progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = build_model(
            args.checkpoint, lengths_only=args.lengths_only, seed=args.seed, model_name=args.model
        )
    except runtime.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print("no --checkpoint: exporting an UNTRAINED model", file=sys.stderr)
    export_onnx(model, args.out, opset=args.opset, verbose=args.verbose)
    print(f"wrote {args.out} (opset {args.opset}, outputs {model.output_names})")
    if args.verify:
        report = verify_onnx(model, args.out, args.verify)
        diffs = {k: v for k, v in report.items() if k.startswith("max_abs_diff")}
        print(
            f"onnxruntime vs PyTorch on {args.verify} images: {diffs}, "
            f"{report['prediction_mismatches']} different predictions"
        )
        if report["prediction_mismatches"] or max(diffs.values()) > 1e-4:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
