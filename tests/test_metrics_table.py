"""docs/metrics_table.py renders a run's metrics.jsonl exactly as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import metrics_table as mt  # docs/ is on pytest's pythonpath
import pytest


def _record(epoch: int, acc: float, errors: int, seconds: float) -> dict:
    return {
        "epoch": epoch,
        "lr": 0.001 * 0.9 ** (epoch - 1),
        "train_loss": 0.1 / epoch,
        "test_loss": 0.05 / epoch,
        "test_accuracy": acc,
        "test_errors": errors,
        "test_samples": 10000,
        "epoch_seconds": seconds,
        "train_images_per_second": 60000 / seconds,
    }


def _write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_table_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        _record(1, 99.10, 90, 600.0),
        _record(2, 99.64, 36, 570.4),
        _record(3, 99.61, 39, 580.0),
    ]
    assert mt.main([str(_write(tmp_path, records)), "--epochs-total", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "epochs completed: 3 of 30",
        "final: 99.61% (39 errors of 10,000), epoch 3",
        "best: 99.64% (36 errors) at epoch 2",
        "median epoch time: 580 s",
    ]
    assert out[5].startswith("| epoch | lr |")
    assert out[7] == "| 1 | 1.00e-03 | 0.10000 | 0.05000 | 99.10 | 90 | 600 | 100 |"
    assert out[8] == "| 2 | 9.00e-04 | 0.05000 | 0.02500 | 99.64 | 36 | 570 | 105 |"
    assert len(out) == 10


def test_best_prefers_the_earliest_epoch_on_ties(tmp_path: Path) -> None:
    records = [_record(1, 99.5, 50, 600.0), _record(2, 99.5, 50, 600.0)]
    lines = mt.summary(mt.read_metrics(_write(tmp_path, records)))
    assert lines[2] == "best: 99.50% (50 errors) at epoch 1"


def test_rejects_missing_or_reordered_epochs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected epochs 1\.\.2 in order, got \[1, 3\]"):
        mt.read_metrics(_write(tmp_path, [_record(1, 99.0, 100, 1.0), _record(3, 99.0, 100, 1.0)]))
