"""Reliability: numerics under autocast and at extremes, determinism, torch.compile and export,
checkpoints that survive interrupted writes and refuse corrupt or unsafe files, bad datasets.

Timings on 2 busy CPU cores: the 200-step bf16 loop uses a reduced CapsNet built from the same
torchcaps modules (8 conv channels, 2 x 6 x 6 primary capsules); the paper-size model is checked
for a few steps. ``torch.compile`` runs with ``backend="aot_eager"`` (inductor needs ~40 s to
compile here) and ``fullgraph=True``, which fails on any graph break.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import load_example
from torchcaps import (
    Conv2dCaps,
    DenseCaps,
    DynamicRouting,
    MarginLoss,
    MaskedDecoder,
    ReconstructionLoss,
    capsule_lengths,
    squash,
)
from torchcaps.functional import margin_loss, reconstruction_loss

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine, OpenMP threads competing with other
    processes make these small models up to 100x slower (measured: 0.5 s vs 0.006 s a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ex() -> Any:
    return load_example("mnist_capsnet.py")


@pytest.fixture(scope="module")
def export(ex: Any) -> Any:
    return load_example("export_onnx.py")


class SmallCapsNet(nn.Module):
    """The paper's architecture at a reduced width: 28x28 input, 8 conv channels, 72 capsules."""

    def __init__(self, iterations: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=9)
        self.primary = Conv2dCaps(8, 2, 8, kernel_size=9, stride=2)  # 2 x 6 x 6 capsules of 8D
        self.digits = DenseCaps(72, 8, 10, 16, routing=DynamicRouting(iterations))
        self.decoder = MaskedDecoder(10, 16, (1, 28, 28), hidden=(32, 64))

    def forward(self, x: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v = self.digits(self.primary(F.relu(self.conv1(x))))
        return capsule_lengths(v), self.decoder(v, target)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, torch.dtype]]:
    lengths, recon = model(x, y)
    margin = MarginLoss()(lengths, y)
    rec = ReconstructionLoss()(recon, x)
    dtypes = {"lengths": lengths.dtype, "margin": margin.dtype, "recon_loss": rec.dtype}
    return margin + rec, dtypes


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _grads_finite(model: nn.Module) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# -- numerics: autocast -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device, amp_dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
        pytest.param("cuda", torch.float16, marks=CUDA),
    ],
    ids=["cpu-bf16", "cuda-bf16", "cuda-fp16"],
)
def test_amp_training_stays_finite_for_200_steps(device: str, amp_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = SmallCapsNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # fp16 needs loss scaling (GradScaler); bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    g = torch.Generator(device=device).manual_seed(0)
    losses = []
    for step in range(200):
        x = torch.rand(4, 1, 28, 28, generator=g, device=device)
        y = torch.randint(0, 10, (4,), generator=g, device=device)
        with torch.autocast(device, dtype=amp_dtype):
            loss, dtypes = _loss(model, x, y)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        assert set(dtypes.values()) == {torch.float32}, dtypes
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert _grads_finite(model) or scaler.is_enabled(), f"step {step}: non-finite gradient"
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-20:]) < sum(losses[:20])  # it learns something, even from noise


def test_float32_inside_autocast() -> None:
    """Routing, capsule lengths and losses are computed and returned in float32 under autocast."""
    torch.manual_seed(0)
    model = SmallCapsNet()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = model.primary(F.relu(model.conv1(x)))
        assert u.dtype == torch.bfloat16  # convolutions run in bf16 ...
        v = model.digits(u)
        assert v.dtype == torch.float32  # ... DenseCaps' predictions and routing in float32
        s = torch.randn(2, 10, 16)
        assert squash(s).dtype == torch.float32
        assert DynamicRouting(3)(torch.randn(2, 72, 10, 16)).dtype == torch.float32
        lengths = capsule_lengths(v)
        recon = model.decoder(v, y)
        assert recon.dtype == torch.bfloat16  # the decoder's Linear layers run in bf16
        assert lengths.dtype == torch.float32
        assert margin_loss(lengths, y).dtype == torch.float32
        assert reconstruction_loss(recon, x).dtype == torch.float32  # promoted with the target
    with torch.no_grad():
        ref_v = model.digits(model.primary(F.relu(model.conv1(x))))
    torch.testing.assert_close(v.detach(), ref_v, atol=5e-3, rtol=5e-2)


def test_paper_model_bf16_steps_match_float32(ex: Any) -> None:
    """The full-size CapsNet: a bf16 autocast step's loss is within 2% of the float32 step's."""
    torch.manual_seed(0)
    model = ex.CapsNet()
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([1, 8])
    loss32, _ = _loss(model, x, y)
    (g32,) = torch.autograd.grad(loss32, [model.primary.conv.weight])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16, dtypes = _loss(model, x, y)
        assert set(dtypes.values()) == {torch.float32}, dtypes
        assert torch.isfinite(loss16)
        opt.zero_grad(set_to_none=True)
        loss16.backward()
        assert _grads_finite(model), f"step {step}"
        if step == 0:
            # Stated tolerance: bf16 keeps 8 bits of mantissa; the loss (margin + reconstruction,
            # both computed in float32 from bf16 activations) agrees to 2 %.
            torch.testing.assert_close(loss16.detach(), loss32.detach(), rtol=2e-2, atol=1e-3)
            g16 = model.primary.conv.weight.grad
            cos = F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
            assert cos > 0.95, f"bf16 gradient direction differs: cosine {float(cos):.3f}"
        opt.step()


# -- numerics: extreme inputs -------------------------------------------------------------------
def _pipeline(x: Tensor, n_out: int = 3, d_out: int = 4, iterations: int = 3) -> dict[str, Tensor]:
    """DenseCaps + DynamicRouting -> lengths -> MarginLoss, MaskedDecoder -> reconstruction."""
    b, n_in, d_in = x.shape
    torch.manual_seed(0)
    caps = DenseCaps(n_in, d_in, n_out, d_out, routing=DynamicRouting(iterations))
    decoder = MaskedDecoder(n_out, d_out, (1, 4, 4), hidden=(8,))
    x = x.clone().requires_grad_(True)
    v = caps(x)
    lengths = capsule_lengths(v)
    target = torch.arange(b) % n_out
    recon = decoder(v, target)
    loss = MarginLoss()(lengths, target) + ReconstructionLoss()(recon, torch.rand(b, 1, 4, 4))
    loss.backward()
    out = {"v": v, "lengths": lengths, "recon": recon, "loss": loss, "grad_x": x.grad}
    for name, p in [*caps.named_parameters(), *decoder.named_parameters()]:
        out[f"grad_{name}"] = p.grad
    # and squash on its own, values and gradients
    s = x.detach().clone().requires_grad_(True)
    sq = squash(s)
    (out["grad_squash"],) = torch.autograd.grad(sq.sum(), s)
    out["squash"] = sq
    return out


@pytest.mark.parametrize(
    "case",
    [
        "zeros",
        "huge-1e4",
        "huge-1e8",
        "huge-1e15",
        "huge-1e30",
        "batch-one",
        "one-input-capsule",
        "one-output-capsule",
        "20-iterations",
        "huge-20-iterations",
        "all-at-once",
    ],
)
def test_extreme_inputs_give_finite_values_and_gradients(case: str) -> None:
    g = torch.Generator().manual_seed(1)
    shape, kwargs = (4, 6, 8), {}
    scale = 1.0
    if case == "zeros":
        scale = 0.0
    elif case.startswith("huge"):
        scale = 1e4 if case == "huge-20-iterations" else float(case.split("-")[1])
    if case == "batch-one":
        shape = (1, 6, 8)
    if case == "one-input-capsule":
        shape = (4, 1, 8)
    if case == "one-output-capsule":
        kwargs["n_out"] = 1
    if "20-iterations" in case:
        kwargs["iterations"] = 20
    if case == "all-at-once":
        shape, kwargs, scale = (1, 1, 8), {"n_out": 1, "iterations": 20}, 1e8
    x = torch.randn(shape, generator=g) * scale
    out = _pipeline(x, **kwargs)
    for name, t in out.items():
        assert t is not None and bool(torch.isfinite(t).all()), f"{case}: {name} not finite"
    assert bool((out["lengths"] <= 1).all())
    if case == "zeros":
        assert bool((out["v"] == 0).all()) and bool((out["squash"] == 0).all())


# -- determinism --------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _train_losses(steps: int = 3) -> list[float]:
    torch.manual_seed(123)
    model = SmallCapsNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(steps):
        x = torch.rand(4, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss, _ = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_deterministic_algorithms_give_bitwise_identical_runs() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with _deterministic():
        first = _train_losses()
        second = _train_losses()
    assert torch.are_deterministic_algorithms_enabled() == before  # flag restored
    assert first == second  # bitwise: float equality of every step's loss


# -- torch.compile ------------------------------------------------------------------------------
def test_compile_dense_caps_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DenseCaps(32, 8, 4, 6, routing=DynamicRouting(3))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 2, 4, 4, 8, requires_grad=True)
    v, c = compiled(x, return_coupling=True)
    v_ref, c_ref = layer(x, return_coupling=True)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-6, rtol=1e-5)
    (gx,) = torch.autograd.grad(v.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(v_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compile_inductor_dense_caps_matches_eager() -> None:
    """The default backend once (compiling takes ~10-40 s on 2 CPU cores), inference only."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DenseCaps(32, 8, 4, 6, routing=DynamicRouting(3))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-5)


def test_compile_paper_model_inference_fullgraph_matches_eager(ex: Any) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ex.CapsNet().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        lengths, recon = compiled(x)
        lengths_ref, recon_ref = model(x)
    torch.testing.assert_close(lengths, lengths_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(recon, recon_ref, atol=1e-6, rtol=1e-5)


def test_compile_training_loss_has_no_graph_breaks() -> None:
    """Forward + margin + reconstruction loss with labels (the training graph) in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallCapsNet()

    def step(x: Tensor, y: Tensor) -> Tensor:
        return _loss(model, x, y)[0]

    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 9])
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x, y)
    torch.testing.assert_close(loss, step(x, y), atol=1e-6, rtol=1e-5)


# -- torch.export, TorchScript, ONNX -----------------------------------------------------------
@pytest.mark.parametrize("lengths_only", [True, False], ids=["lengths", "lengths+recon"])
def test_torch_export_matches_eager(export: Any, lengths_only: bool) -> None:
    model = export.build_model(None, lengths_only=lengths_only)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    x = torch.rand(5, 1, 28, 28)  # another batch size than the example's
    with torch.no_grad():
        got, expected = program.module()(x), model(x)
    if lengths_only:
        got, expected = (got,), (expected,)
    assert len(got) == len(expected) == (1 if lengths_only else 2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_jit_trace_of_inference_model_works(export: Any) -> None:
    model = export.build_model(None)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; the shape checks of the library emit
        # TracerWarnings (they only guard error paths). See examples/export_onnx.py.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.rand(2, 1, 28, 28),))
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(traced(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _checkpoint_like_training(ex: Any, path: Path, epoch: int = 1, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    state = {
        "epoch": epoch,
        "best_accuracy": 10.0,
        "model": ex.CapsNet().state_dict(),
        "args": {"routing_iterations": 3, "reconstruction": True},
    }
    ex.atomic_save(state, path)
    return state


def test_onnx_export_predicts_like_pytorch(ex: Any, export: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "best.pt"
    _checkpoint_like_training(ex, ckpt)
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


def test_export_script_reports_bad_checkpoint(export: Any, tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00" * 64)
    assert export.main(["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"checkpoint {bad}" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# -- checkpoints --------------------------------------------------------------------------------
def _small_state(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "model": {"w": torch.full((4096,), float(epoch))}}


def test_failed_save_keeps_previous_checkpoint(
    ex: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    ex.atomic_save(_small_state(1), path)
    good = path.read_bytes()
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then ...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ex.atomic_save(_small_state(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert ex.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left


def test_killed_save_keeps_previous_checkpoint(ex: Any, tmp_path: Path) -> None:
    """SIGKILL a process in the middle of atomic_save: the previous checkpoint survives."""
    path = tmp_path / "last.pt"
    ex.atomic_save(_small_state(1), path)
    good = path.read_bytes()
    ready = tmp_path / "half-written"
    script = textwrap.dedent(
        f"""
        import importlib.util, io, sys, time
        from pathlib import Path
        import torch
        spec = importlib.util.spec_from_file_location("ex", {str(EXAMPLES / "mnist_capsnet.py")!r})
        ex = importlib.util.module_from_spec(spec)
        sys.modules["ex"] = ex
        spec.loader.exec_module(ex)
        real_save = torch.save
        def slow_save(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:1000])
            f.flush()
            Path({str(ready)!r}).write_text("now")
            time.sleep(300)
        torch.save = slow_save
        ex.atomic_save({{"epoch": 2, "model": {{"w": torch.zeros(4096)}}}}, Path({str(path)!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the writer died before writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert path.read_bytes() == good
    assert ex.load_checkpoint(path)["epoch"] == 1
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.tmp-")]
    assert len(leftovers) == 1  # the killed writer's temporary; never read, replaced next time
    ex.atomic_save(_small_state(3), path)
    assert ex.load_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -22, -1], ids=lambda k: f"keep{k}")
def test_truncated_checkpoint_names_the_file(ex: Any, tmp_path: Path, keep: float) -> None:
    path = tmp_path / "last.pt"
    ex.atomic_save(_small_state(1), path)
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:n])
    with pytest.raises(ex.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        ex.load_checkpoint(path)


@pytest.mark.parametrize("where", ["data.pkl", "tensor-data", "central-directory"])
def test_corrupted_checkpoint_names_the_file(ex: Any, tmp_path: Path, where: str) -> None:
    path = tmp_path / "last.pt"
    ex.atomic_save(_small_state(1), path)
    raw = bytearray(path.read_bytes())
    if where == "data.pkl":
        pos = raw.index(b"data.pkl") + 80
    elif where == "tensor-data":  # flipped bits inside the weights: torch.load alone misses it
        pos = len(raw) // 2
    else:
        pos = raw.rindex(b"PK\x01\x02")
    for i in range(pos, pos + 8):
        raw[i] ^= 0xA5
    path.write_bytes(bytes(raw))
    with pytest.raises(ex.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        ex.load_checkpoint(path)


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint would carry."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_checkpoint_with_pickled_callable_is_refused(ex: Any, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    if how == "os.system":
        cmd = f"\"{sys.executable}\" -c \"open(r'{marker}', 'w').close()\""
        payload = _Payload(os.system, (cmd,))
    else:
        payload = _Payload(open, (str(marker), "w"))
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "model": {"w": torch.ones(3)}, "extra": payload}, path)
    # The payload is live: an unsafe torch.load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ex.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        ex.load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed code from the checkpoint"


# -- datasets -----------------------------------------------------------------------------------
def _fake_mnist(root: Path, ex: Any, *, magic: dict[str, int] | None = None) -> Path:
    """Full-size MNIST files (sparse zeros) with valid headers unless ``magic`` overrides one."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for images, labels, count in ex.MNIST_FILES.values():
        for name, dims in ((images, (count, 28, 28)), (labels, (count,))):
            header = (magic or {}).get(name, 0x0800 + len(dims))
            data = header.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
            with open(raw / name, "wb") as f:
                f.write(data)
                f.truncate(len(data) + int(torch.tensor(dims).prod()))
    return raw


def test_bad_magic_in_data_dir_is_a_data_error(ex: Any, tmp_path: Path) -> None:
    # 0x0D: an idx file of float32 data, not uint8
    _fake_mnist(tmp_path, ex, magic={"train-images-idx3-ubyte": 0x00000D03})
    with pytest.raises(ex.DataError, match="train-images-idx3-ubyte is not an idx file"):
        ex.run(["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=_quiet)


def test_label_out_of_range_in_data_dir_is_a_data_error(ex: Any, tmp_path: Path) -> None:
    raw = _fake_mnist(tmp_path, ex)
    labels = raw / "t10k-labels-idx1-ubyte"
    with open(labels, "r+b") as f:
        f.seek(8 + 1234)
        f.write(bytes([10]))
    with pytest.raises(ex.DataError, match="test labels out of range 0..9"):
        ex.run(["--data-dir", str(tmp_path), "--no-download", "--epochs", "0"], log=_quiet)
