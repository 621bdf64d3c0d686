"""examples/runtime.py: checkpoints that survive interrupted writes and refuse corrupt or unsafe
files, and the rebuilding of a checkpoint's model from the registry (checkpoint_model, load_model).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import runtime
from _helpers import examples_env
from torchcaps.models import CapsNet, get_model, list_models


# -- writing and reading checkpoints ------------------------------------------------------------
def _small_state(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "model": {"w": torch.full((4096,), float(epoch))}}


def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    runtime.atomic_save(_small_state(1), path)
    good = path.read_bytes()
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then ...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        runtime.atomic_save(_small_state(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert runtime.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left


def test_killed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of atomic_save: the previous checkpoint survives."""
    path = tmp_path / "last.pt"
    runtime.atomic_save(_small_state(1), path)
    good = path.read_bytes()
    ready = tmp_path / "half-written"
    script = textwrap.dedent(
        f"""
        import io, time
        from pathlib import Path
        import torch
        import runtime  # examples/ is on the PYTHONPATH of the subprocess
        real_save = torch.save
        def slow_save(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:1000])
            f.flush()
            Path({str(ready)!r}).write_text("now")
            time.sleep(300)
        torch.save = slow_save
        runtime.atomic_save({{"epoch": 2, "model": {{"w": torch.zeros(4096)}}}}, Path({str(path)!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=examples_env())
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
    assert runtime.load_checkpoint(path)["epoch"] == 1
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.tmp-")]
    assert len(leftovers) == 1  # the killed writer's temporary; never read, replaced next time
    runtime.atomic_save(_small_state(3), path)
    assert runtime.load_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -22, -1], ids=lambda k: f"keep{k}")
def test_truncated_checkpoint_names_the_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "last.pt"
    runtime.atomic_save(_small_state(1), path)
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:n])
    with pytest.raises(runtime.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        runtime.load_checkpoint(path)


@pytest.mark.parametrize("where", ["data.pkl", "tensor-data", "central-directory"])
def test_corrupted_checkpoint_names_the_file(tmp_path: Path, where: str) -> None:
    path = tmp_path / "last.pt"
    runtime.atomic_save(_small_state(1), path)
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
    with pytest.raises(runtime.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        runtime.load_checkpoint(path)


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint would carry."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_checkpoint_with_pickled_callable_is_refused(tmp_path: Path, how: str) -> None:
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
    with pytest.raises(runtime.CheckpointError, match=f"checkpoint {path} cannot be loaded safely"):
        runtime.load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed code from the checkpoint"


def test_corrupt_checkpoint_is_reported_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(runtime.CheckpointError, match=f"checkpoint {bad} cannot be loaded safely"):
        runtime.load_checkpoint(bad)


def test_a_file_that_is_not_an_example_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)  # loads safely, but holds no model and epoch
    with pytest.raises(
        runtime.CheckpointError, match=f"checkpoint {path} is not a torchcaps example checkpoint"
    ):
        runtime.load_checkpoint(path)


# -- the checkpoint's model: checkpoint_model, load_model -----------------------------------------
KWARGS = {"routing_iterations": 2, "reconstruction": False}


@pytest.fixture(scope="module")
def bare_model() -> CapsNet:
    """capsnet_mnist without decoder and with 2 routing iterations (6.8M parameters)."""
    torch.manual_seed(11)
    return get_model("capsnet_mnist", **KWARGS).eval()


def _save(path: Path, model: torch.nn.Module, **fields: Any) -> Path:
    state = {"format": 2, "epoch": 4, "model": model.state_dict(), **fields}
    runtime.atomic_save(state, path)
    return path


def test_a_checkpoint_round_trips_through_the_registry(tmp_path: Path, bare_model: CapsNet) -> None:
    path = _save(tmp_path / "best.pt", bare_model, model_name="capsnet_mnist", model_kwargs=KWARGS)
    state = runtime.load_checkpoint(path)
    assert runtime.checkpoint_model(state, path) == ("capsnet_mnist", KWARGS)
    model, loaded = runtime.load_model(path)
    assert isinstance(model, CapsNet) and not model.training
    assert model.decoder is None and model.digits.routing.iterations == 2
    assert (loaded["model_name"], loaded["model_kwargs"], loaded["epoch"]) == (
        "capsnet_mnist",
        KWARGS,
        4,
    )
    for name, value in bare_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x).scores, bare_model(x).scores)


def test_load_model_applies_overrides_that_keep_the_weights(
    tmp_path: Path, bare_model: CapsNet
) -> None:
    path = _save(tmp_path / "best.pt", bare_model, model_name="capsnet_mnist", model_kwargs=KWARGS)
    model, state = runtime.load_model(path, conv_impl="matmul")
    assert model.primary.conv_impl == "matmul"
    assert state["model_kwargs"] == KWARGS  # what the checkpoint holds, not the overrides


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module."], ids=["compiled", "ddp"])
def test_load_model_strips_wrapper_prefixes(
    tmp_path: Path, bare_model: CapsNet, prefix: str
) -> None:
    path = tmp_path / "last.pt"
    weights = {prefix + k: v for k, v in bare_model.state_dict().items()}
    runtime.atomic_save(
        {"epoch": 1, "model": weights, "model_name": "capsnet_mnist", "model_kwargs": KWARGS}, path
    )
    model, _ = runtime.load_model(path)
    assert torch.equal(model.digits.weight, bare_model.digits.weight)


@pytest.mark.parametrize("decoder", [True, False], ids=["with-decoder", "without-decoder"])
def test_a_legacy_checkpoint_loads_as_capsnet_mnist(tmp_path: Path, decoder: bool) -> None:
    """Checkpoints written before the registry: no model_name, model_kwargs or format."""
    torch.manual_seed(5)
    written = get_model("capsnet_mnist", routing_iterations=1, reconstruction=decoder)
    path = tmp_path / "last.pt"
    state = {
        "format": 2,
        "epoch": 3,
        "model_name": "capsnet_mnist",
        "model_kwargs": {"routing_iterations": 1, "reconstruction": decoder},
        "model": written.state_dict(),
        "args": {"routing_iterations": 1, "reconstruction": decoder},
    }
    for key in ("model_name", "model_kwargs", "format"):
        del state[key]
    runtime.atomic_save(state, path)
    legacy = {"routing_iterations": 1, "reconstruction": decoder}
    assert runtime.checkpoint_model(runtime.load_checkpoint(path), path) == (
        "capsnet_mnist",
        legacy,
    )
    model, loaded = runtime.load_model(path)
    assert (model.decoder is not None) == decoder  # inferred from the weights
    assert model.digits.routing.iterations == 1  # from the saved command line
    assert (loaded["model_name"], loaded["model_kwargs"]) == ("capsnet_mnist", legacy)
    assert torch.equal(model.primary.conv.weight, written.primary.conv.weight)


def test_a_legacy_checkpoint_without_args_gets_the_papers_routing() -> None:
    state = {"epoch": 1, "model": {"decoder.net.0.weight": torch.zeros(1)}}
    assert runtime.checkpoint_model(state, Path("old.pt")) == (
        "capsnet_mnist",
        {"routing_iterations": 3, "reconstruction": True},
    )


def test_an_unknown_model_name_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    runtime.atomic_save({"epoch": 1, "model": {}, "model_name": "capsnet_cifar"}, path)
    message = (
        f"checkpoint {path} holds a model 'capsnet_cifar' that this torchcaps does not know "
        f"(known: {list_models()}); install the torchcaps version that wrote it"
    )
    with pytest.raises(runtime.CheckpointError, match=re.escape(message)):
        runtime.load_model(path)


def test_weights_of_another_model_are_refused(tmp_path: Path, bare_model: CapsNet) -> None:
    # the checkpoint says "with decoder", its weights have none
    path = _save(
        tmp_path / "last.pt",
        bare_model,
        model_name="capsnet_mnist",
        model_kwargs={"routing_iterations": 2, "reconstruction": True},
    )
    with pytest.raises(
        runtime.CheckpointError,
        match=re.escape(f"checkpoint {path} does not hold the weights of capsnet_mnist("),
    ):
        runtime.load_model(path)


# -- malloc -------------------------------------------------------------------------------------
_MALLINFO = """
import ctypes
import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_while_holding(size):
    block = libc.malloc(size)
    held = libc.mallinfo2().hblkhd
    libc.free(block)
    return held

before = mmapped_while_holding(64 << 20)
kept = runtime.keep_freed_memory()
after = mmapped_while_holding(64 << 20)
print(kept, before, after)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's malloc only",
)
def test_keep_freed_memory_serves_large_blocks_from_the_heap() -> None:
    # In a child process: the setting is process-wide. A 64 MB block is mmapped by default
    # (counted in mallinfo2's hblkhd) and comes from the reusable heap afterwards.
    out = subprocess.run(
        [sys.executable, "-c", _MALLINFO], env=examples_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    kept, before, after = out.stdout.split()
    assert kept == "True"
    assert int(before) >= 64 << 20
    assert int(after) < 64 << 20


def test_cpu_info_reads_the_first_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\nflags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n"
    )
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    assert runtime.cpu_info() == ("Test CPU @ 2.0GHz", frozenset({"fpu", "avx2", "amx_bf16"}))
    assert runtime.cpu_model() == "Test CPU @ 2.0GHz"


def test_cpu_info_without_proc_falls_back_to_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(runtime.platform, "processor", lambda: "")
    monkeypatch.setattr(runtime.platform, "machine", lambda: "riscv64")
    assert runtime.cpu_info() == ("riscv64", frozenset())
