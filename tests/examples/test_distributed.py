"""Data-parallel training of the MNIST example: 2 CPU processes (gloo) on 127.0.0.1.

``torch.distributed.run`` launches ``tests/examples/_dist_worker.py`` (with ``examples/`` on its
``PYTHONPATH``), which calls the example's ``run`` unchanged and records each rank's final parameters, metrics and checkpoint writes. One launch
trains epoch 1, a second launch resumes from ``last.pt`` and trains epoch 2; a single-process
run with the same global batch trains epochs 1-2 straight. Checked:

- both ranks end with bitwise identical parameters;
- the 2-process run equals the single-process run within float tolerance (the global batch is
  sharded across ranks, DDP averages gradients, and the augmentation offsets are drawn for the
  whole global batch, so only the reduction order differs);
- ``--resume`` works under torchrun, and only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import engine
import mnist_capsnet
from _helpers import ROOT, examples_env

WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
ARGS = [
    "--embedded-sample",
    "--batch-size",
    "16",
    "--max-train-samples",
    "64",
    "--max-test-samples",
    "32",
    "--test-batch-size",
    "32",
    "--max-steps",
    "2",
    # The DDP run stops after epoch 1 (--epochs 1) and resumes with --epochs 2; the exponential
    # schedule does not depend on --epochs, the cosine one would change with it.
    "--lr-schedule",
    "exponential",
    "--quiet",
    "--threads",
    "1",
    "--device",
    "cpu",
]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(record: Path, argv: list[str]) -> None:
    # The worker imports the example scripts plainly: examples/ goes on its PYTHONPATH.
    env = examples_env(OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on the loopback interface
    last = None
    for _ in range(2):  # a second try if another process took the free port meanwhile
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            str(record),
            *argv,
        ]
        last = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if last.returncode == 0:
            return
        if "address already in use" not in (last.stdout + last.stderr).lower():
            break  # a real failure, not the port race
    assert last is not None
    raise AssertionError(
        f"torchrun failed ({last.returncode}):\n{last.stdout[-3000:]}\n{last.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ddp")
    out = base / "ddp-run"
    first, second = base / "record1", base / "record2"
    _torchrun(first, [*ARGS, "--epochs", "1", "--out-dir", str(out)])
    _torchrun(second, [*ARGS, "--epochs", "2", "--resume", "--out-dir", str(out)])

    trainers: list[Any] = []
    init = engine.Trainer.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        trainers.append(self)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.Trainer, "__init__", recording_init)
        try:
            single_history = mnist_capsnet.run(
                [*ARGS, "--epochs", "2", "--out-dir", str(base / "single")],
                log=lambda *a, **k: None,
            )
        finally:
            torch.set_num_threads(threads)
    return {
        "out": out,
        "first": first,
        "second": second,
        "single_state": trainers[0].model.state_dict(),
        "single_history": single_history,
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_ranks_end_with_identical_parameters(runs: dict[str, Any]) -> None:
    for record in (runs["first"], runs["second"]):
        a, b = _state(record / "rank0.pt"), _state(record / "rank1.pt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{record.name}: {name} differs between ranks"


def test_two_processes_match_one_process(runs: dict[str, Any]) -> None:
    ddp = _state(runs["second"] / "rank0.pt")
    single = runs["single_state"]
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        # Same samples, shifts and averaged gradients; only the float reduction order differs
        # (per-rank batch 8 vs 16, the gradient all-reduce), over two Adam steps per epoch.
        torch.testing.assert_close(ddp[name], value, atol=1e-4, rtol=1e-3, msg=name)
    ddp_history = [
        *json.loads((runs["first"] / "history0.json").read_text()),
        *json.loads((runs["second"] / "history0.json").read_text()),
    ]
    assert [h["epoch"] for h in ddp_history] == [1, 2]
    for d, s in zip(ddp_history, runs["single_history"]):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)
        assert d["test_accuracy"] == s["test_accuracy"]


def test_resume_under_torchrun_and_rank0_writes(runs: dict[str, Any]) -> None:
    out: Path = runs["out"]
    second = json.loads((runs["second"] / "history0.json").read_text())
    assert [h["epoch"] for h in second] == [2]  # resumed after epoch 1, trained only epoch 2
    assert json.loads((runs["second"] / "history1.json").read_text())[0]["epoch"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]  # one line per epoch: rank 0 only
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 16
    for record in (runs["first"], runs["second"]):
        assert (record / "saves1.txt").read_text() == ""  # rank 1 wrote no checkpoint
        saved = (record / "saves0.txt").read_text().splitlines()
        assert str(out / "last.pt") in saved
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    final = _state(runs["second"] / "rank0.pt")
    for name, value in last["model"].items():
        assert torch.equal(value, final[name]), name
