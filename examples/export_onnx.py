"""Export the MNIST CapsNet of ``mnist_capsnet.py`` to ONNX for inference.

    python examples/export_onnx.py --checkpoint runs/mnist_capsnet/best.pt --out capsnet.onnx
    python examples/export_onnx.py --out capsnet.onnx            # untrained model: a smoke test
    python examples/export_onnx.py --checkpoint best.pt --lengths-only --verify 100

The exported graph is the evaluation model: ``images`` (B, 1, 28, 28), float32 in [0, 1] ->
``lengths`` (B, 10), the digit capsules' lengths (the prediction is their argmax), and, unless
``--lengths-only`` (or a checkpoint trained with ``--no-reconstruction``), ``reconstruction``
(B, 1, 28, 28), the decoder's output masked by the longest capsule (``target=None``). The batch
dimension is dynamic. The checkpoint is read with ``load_checkpoint`` of the training example
(``weights_only=True``: a checkpoint that carries code is refused); its saved arguments pick
the routing iterations and whether the decoder exists.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter, opset 18
by default (``--opset``). It needs the ``onnx`` and ``onnxscript`` packages
(``pip install onnx onnxscript``); ``--verify N`` also needs ``onnxruntime`` and compares the
ONNX model with PyTorch on N random images (same predictions, lengths within 1e-4).

Other export paths, as tested with torch 2.14.1 (``tests/test_reliability.py``):

- ``torch.export.export``: works, with a dynamic batch dimension; this is what the ONNX
  exporter above uses.
- ``torch.compile(fullgraph=True)``: works, no graph breaks.
- TorchScript, ``torch.jit.trace``: works and generalises to other batch sizes (the shape
  checks of the library emit ``TracerWarning``\\ s; they only guard error paths). TorchScript
  itself is deprecated upstream (``FutureWarning`` since torch 2.9); prefer ``torch.export``.
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

HERE = Path(__file__).resolve().parent
INPUT_SHAPE = (1, 28, 28)


def _example() -> Any:
    """The training example's module (``CapsNet``, ``load_checkpoint``, ``CheckpointError``)."""
    module = sys.modules.get("mnist_capsnet")
    if module is not None and hasattr(module, "CapsNet"):
        return module
    spec = importlib.util.spec_from_file_location("mnist_capsnet", HERE / "mnist_capsnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mnist_capsnet"] = module
    spec.loader.exec_module(module)
    return module


class InferenceCapsNet(nn.Module):
    """The evaluation forward of ``CapsNet``: images -> lengths (and the reconstruction)."""

    def __init__(self, model: nn.Module, reconstruction: bool = True) -> None:
        super().__init__()
        self.model = model
        self.reconstruction = reconstruction and getattr(model, "decoder", None) is not None

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        lengths, recon = self.model(images)  # target=None: masked by the prediction
        if self.reconstruction:
            return lengths, recon
        return lengths

    @property
    def output_names(self) -> list[str]:
        return ["lengths", "reconstruction"] if self.reconstruction else ["lengths"]


def build_model(
    checkpoint: Path | None, *, lengths_only: bool = False, seed: int = 0
) -> InferenceCapsNet:
    """The inference model from ``checkpoint`` (or untrained, seeded, when it is None)."""
    ex = _example()
    iterations, reconstruction = 3, True
    state = None
    if checkpoint is not None:
        state = ex.load_checkpoint(checkpoint)
        saved = state.get("args") or {}
        iterations = int(saved.get("routing_iterations", iterations))
        reconstruction = bool(saved.get("reconstruction", reconstruction))
    torch.manual_seed(seed)
    model = ex.CapsNet(iterations, reconstruction)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ex.CheckpointError(
                f"checkpoint {checkpoint} does not hold this CapsNet's weights: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
    return InferenceCapsNet(model, reconstruction and not lengths_only).eval()


def export_onnx(
    model: InferenceCapsNet, out: Path, *, opset: int = 18, verbose: bool = False
) -> Path:
    """Export ``model`` to ``out`` with a dynamic batch dimension; return ``out``."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(
                f"ONNX export needs the {package!r} package: pip install onnx onnxscript"
            )
    example = torch.rand(2, *INPUT_SHAPE)
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


def verify_onnx(model: InferenceCapsNet, path: Path, n: int = 100, seed: int = 0) -> dict[str, Any]:
    """Run the ONNX model with onnxruntime on ``n`` random images; compare with PyTorch.

    Returns the largest absolute difference of each output and the number of samples whose
    predicted class differs; raises ``SystemExit`` when onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SystemExit("--verify needs onnxruntime: pip install onnxruntime") from exc
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *INPUT_SHAPE, generator=g)
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
    p.add_argument("--verbose", action="store_true", help="the exporter's progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ex = _example()
    try:
        model = build_model(args.checkpoint, lengths_only=args.lengths_only, seed=args.seed)
    except ex.CheckpointError as exc:
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
