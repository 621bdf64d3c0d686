"""Run one example preset for several seeds and report the final epoch's mean and spread.

    python examples/seed_sweep.py --recipe mnist_capsnet --seeds 1 2 3 \\
        --out-dir runs/sweep --results docs/results.md -- --data-dir DIR

Each seed trains in ``OUT_DIR/seed_<s>`` with the preset's flags after ``--`` plus ``--seed
<s>``; a seed whose directory already holds ``last.pt`` is resumed (``--resume``), and one
that has finished is not run again, so a sweep that does not fit one session continues in the
next with the same command. ``--report-only`` trains nothing. The summary counts only the
seeds that reached the preset's last epoch (``--epochs`` of the flags after ``--``, or the
preset's default; with ``--report-only`` and no flags, what each run's ``config.json``
recorded, or the preset's default for a run without one): the mean and
the sample standard deviation (n - 1) of their final-epoch test accuracy; the others are
listed with the epoch they reached, as partial. With ``--results FILE`` the summary is
written into that Markdown file, in a section between ``<!-- seed-sweep:NAME -->`` and
``<!-- /seed-sweep:NAME -->`` (replaced on every run, appended the first time), with the
command, machine, commit and date.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime import cpu_model


@dataclass(frozen=True)
class SeedRun:
    """What one seed's directory says: epochs done of the total, final and best accuracy."""

    seed: int
    epochs_done: int
    epochs_total: int
    final_accuracy: float | None
    best_accuracy: float | None
    ran_on: str = "-"

    @property
    def complete(self) -> bool:
        return self.epochs_total > 0 and self.epochs_done >= self.epochs_total


def read_run(
    seed: int, directory: Path, epochs: int | None = None, default_epochs: int = 0
) -> SeedRun:
    """The state of ``directory`` (its ``metrics.jsonl``) against ``epochs`` in total.

    ``epochs=None``: the total its ``config.json`` recorded, ``default_epochs`` when it has
    none (a run not started, or one whose files predate the sweep).
    """
    total = epochs or 0
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if epochs is None:
        total = int(config.get("epochs", default_epochs))
    ran_on = (
        "; ".join(
            f"{part.get('device_name', '?')} from {part.get('started_utc', '?')} "
            f"(epoch {part.get('from_epoch', 0)})"
            for part in config.get("sessions") or []
        )
        or "-"
    )
    metrics = directory / "metrics.jsonl"
    rows = []
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return SeedRun(seed, 0, total, None, None, ran_on)
    last = rows[-1]
    best = max(float(r["test_accuracy"]) for r in rows)
    final = float(last["test_accuracy"])
    return SeedRun(seed, int(last["epoch"]), total, final, best, ran_on)


def summary(runs: Sequence[SeedRun]) -> tuple[float, float | None] | None:
    """Mean and sample standard deviation of the complete runs' final accuracy (None if none
    is complete; the deviation is None for one complete run, which has no spread)."""
    finals = [r.final_accuracy for r in runs if r.complete and r.final_accuracy is not None]
    if not finals:
        return None
    spread = statistics.stdev(finals) if len(finals) > 1 else None
    return statistics.fmean(finals), spread


def markdown(name: str, runs: Sequence[SeedRun], command: str, machine: str, commit: str) -> str:
    """The results-page section of a sweep."""
    done = [r for r in runs if r.complete]
    stats = summary(runs)
    lines = [f"<!-- seed-sweep:{name} -->", f"## Seed sweep: {name}", ""]
    if stats is None:
        lines.append(f"**Partial: none of the {len(runs)} seeds has finished. Not a result.**")
    else:
        mean, std = stats
        if std is None:
            head = f"**Final epoch, one seed: {mean:.2f}% (no spread from one run)**"
        else:
            head = f"**Final epoch, mean +- std over {len(done)} seeds: {mean:.2f}% +- {std:.2f}**"
        if len(done) < len(runs):
            head += f" (partial: {len(runs) - len(done)} of {len(runs)} seeds not finished)"
        lines.append(head + (". Standard deviation with n - 1." if std is not None else "."))
    lines += [
        "",
        "| seed | epochs | final test acc (%) | best test acc (%) | ran on (its config.json) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        final = "-" if r.final_accuracy is None else f"{r.final_accuracy:.2f}"
        best = "-" if r.best_accuracy is None else f"{r.best_accuracy:.2f}"
        if r.epochs_done == 0:
            state = f"not started (0 of {r.epochs_total})"
        else:
            state = f"{r.epochs_done} of {r.epochs_total}" + ("" if r.complete else " (partial)")
        lines.append(f"| {r.seed} | {state} | {final} | {best} | {r.ran_on} |")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"Command: `{command}`; this summary written on {machine}, torchcaps commit {commit}, "
        f"{date} (each seed's own machine and start: the last column).",
        "The best epoch is chosen on the test set, for comparison only.",
        f"<!-- /seed-sweep:{name} -->",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the sweep's marked section of ``path``, or append it."""
    text = path.read_text() if path.is_file() else ""
    start, end = f"<!-- seed-sweep:{name} -->", f"<!-- /seed-sweep:{name} -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section
    path.write_text(text)


def _machine() -> str:
    return f"{cpu_model()}, {platform.system()}"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run an example preset for several seeds; report mean +- std of the final "
        "epoch. The preset's own flags follow '--'."
    )
    p.add_argument("--recipe", required=True, help="example module, e.g. mnist_capsnet")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds to run")
    p.add_argument("--out-dir", type=Path, required=True, help="one seed_<s> directory per seed")
    p.add_argument(
        "--results", type=Path, default=None, help="Markdown file to write the summary into"
    )
    p.add_argument("--name", default=None, help="the section's name (default: the recipe)")
    p.add_argument("--report-only", action="store_true", help="train nothing, only report")
    return p


def sweep(argv: Sequence[str] | None = None, log: Callable[..., Any] = print) -> list[SeedRun]:
    """Run (or resume) every seed, then report; return each seed's state."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    for flag in ("--seed", "--out-dir", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise SystemExit(f"seed_sweep: {flag} is set per seed; do not pass it after '--'")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"seed_sweep: --seeds has repeats: {args.seeds}")
    module = importlib.import_module(args.recipe)
    # the preset's epochs, from its flags; for a report without flags, what each run recorded
    preset_epochs = module.parse_args(extra).epochs
    epochs = preset_epochs if extra or not args.report_only else None
    runs = []
    for seed in args.seeds:
        directory = args.out_dir / f"seed_{seed}"
        state = read_run(seed, directory, epochs, preset_epochs)
        if not args.report_only and not state.complete:
            resume = ["--resume"] if (directory / "last.pt").is_file() else []
            log(f"seed {seed}: {'resuming' if resume else 'starting'} in {directory}")
            module.run([*extra, "--seed", str(seed), "--out-dir", str(directory), *resume], log=log)
            state = read_run(seed, directory, epochs, preset_epochs)
        runs.append(state)
    name = args.name or args.recipe
    command = "python examples/seed_sweep.py " + shlex.join(
        [a for a in full if a != "--report-only"]
    )
    section = markdown(name, runs, command, _machine(), _commit())
    log(section)
    if args.results is not None:
        write_section(args.results, name, section)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    sweep(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
