"""Render a training run's ``metrics.jsonl`` as the Markdown table of ``docs/results.md``.

Usage::

    python docs/metrics_table.py RUN_DIR/metrics.jsonl [--epochs-total N]

Prints a summary (epochs completed, final and best test accuracy, median epoch time) and one
table row per epoch, in the column order of ``docs/results.md``. Numbers are copied from the
file, rounded for display only; nothing is computed that the run did not record except the
summary's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

COLUMNS = (
    "epoch",
    "lr",
    "train loss",
    "test loss",
    "test acc (%)",
    "test errors",
    "epoch s",
    "train img/s",
)


def read_metrics(path: Path) -> list[dict]:
    """Return the per-epoch records of ``path``, checking that epochs run 1, 2, ... in order."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    if epochs != list(range(1, len(records) + 1)):
        raise ValueError(f"{path}: expected epochs 1..{len(records)} in order, got {epochs}")
    return records


def summary(records: list[dict], epochs_total: int | None = None) -> list[str]:
    """Summary lines: epochs completed, final and best accuracy, median epoch time."""
    last = records[-1]
    best = max(records, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    done = f"{len(records)}" + (f" of {epochs_total}" if epochs_total else "")
    median_s = statistics.median(r["epoch_seconds"] for r in records)
    final = (
        f"{last['test_accuracy']:.2f}% ({last['test_errors']} errors of {last['test_samples']:,})"
    )
    return [
        f"epochs completed: {done}",
        f"final: {final}, epoch {last['epoch']}",
        f"best: {best['test_accuracy']:.2f}% ({best['test_errors']} errors) at epoch "
        f"{best['epoch']}",
        f"median epoch time: {median_s:.0f} s",
    ]


def table(records: list[dict]) -> list[str]:
    """The Markdown table, header first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        cells = (
            f"{r['epoch']}",
            f"{r['lr']:.2e}",
            f"{r['train_loss']:.5f}",
            f"{r['test_loss']:.5f}",
            f"{r['test_accuracy']:.2f}",
            f"{r['test_errors']}",
            f"{r['epoch_seconds']:.0f}",
            f"{r['train_images_per_second']:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("--epochs-total", type=int, default=None, help="the run's planned epochs")
    args = parser.parse_args(argv)
    records = read_metrics(args.metrics)
    print("\n".join(summary(records, args.epochs_total)))
    print()
    print("\n".join(table(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
