"""examples/seed_sweep.py: a sweep of tiny runs on the embedded sample (resumed and continued
across invocations), its statistics against hand computation, and the results-page section."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import seed_sweep
from _helpers import quiet

TINY = ["--embedded-sample", "--quiet", "--max-train-samples", "32", "--batch-size", "16",
        "--max-steps", "1", "--max-test-samples", "16", "--no-reconstruction"]  # fmt: skip


def test_a_sweep_runs_every_seed_then_resumes_and_reports(tmp_path: Path) -> None:
    out, page = tmp_path / "sweep", tmp_path / "results.md"
    page.write_text("# Results\n\nsomething before\n")
    common = ["--recipe", "mnist_capsnet", "--seeds", "3", "4", "--out-dir", str(out),
              "--results", str(page), "--name", "tiny"]  # fmt: skip
    first = seed_sweep.sweep([*common, "--", *TINY, "--epochs", "1"], log=quiet)
    assert [(r.seed, r.epochs_done, r.complete) for r in first] == [(3, 1, True), (4, 1, True)]
    # the two seeds differ: they were trained with their own --seed
    configs = [json.loads((out / f"seed_{s}" / "config.json").read_text()) for s in (3, 4)]
    assert [c["seed"] for c in configs] == [3, 4]
    # a longer preset: both resume from epoch 1 (their metrics keep epoch 1's line)
    second = seed_sweep.sweep([*common, "--", *TINY, "--epochs", "2"], log=quiet)
    assert [(r.epochs_done, r.epochs_total) for r in second] == [(2, 2), (2, 2)]
    lines = (out / "seed_3" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    finals = [r.final_accuracy for r in second]
    mean, std = statistics.fmean(finals), statistics.stdev(finals)  # type: ignore[arg-type]
    text = page.read_text()
    assert text.startswith("# Results\n\nsomething before\n")
    assert text.count("<!-- seed-sweep:tiny -->") == 1  # replaced, not appended twice
    assert f"mean +- std over 2 seeds: {mean:.2f}% +- {std:.2f}" in text
    assert "| 3 | 2 of 2 |" in text and "--seeds 3 4" in text
    # each seed's config.json lists its two invocations: the start and the resume at epoch 1
    sessions = json.loads((out / "seed_3" / "config.json").read_text())["sessions"]
    assert [part["from_epoch"] for part in sessions] == [0, 1]
    assert second[0].ran_on.count(" from ") == 2 and "(epoch 1)" in second[0].ran_on
    assert second[0].ran_on in text
    # report only: nothing trains, the same numbers
    again = seed_sweep.sweep([*common, "--report-only"], log=quiet)
    assert again == second


def test_partial_seeds_are_listed_but_not_counted(tmp_path: Path) -> None:
    runs = [
        seed_sweep.SeedRun(1, 10, 10, 99.5, 99.6),
        seed_sweep.SeedRun(2, 10, 10, 99.7, 99.7),
        seed_sweep.SeedRun(3, 4, 10, 98.0, 98.0),
    ]
    assert seed_sweep.summary(runs) == pytest.approx((99.6, statistics.stdev([99.5, 99.7])))
    text = seed_sweep.markdown("x", runs, "cmd", "cpu", "abc1234")
    assert "over 2 seeds: 99.60% +- 0.14** (partial: 1 of 3 seeds not finished)" in text
    assert "| 3 | 4 of 10 (partial) | 98.00 | 98.00 | - |" in text
    waiting = seed_sweep.markdown("x", [seed_sweep.SeedRun(7, 0, 15, None, None)], "c", "m", "k")
    assert "| 7 | not started (0 of 15) | - | - | - |" in waiting
    # one complete seed has a mean but no spread
    assert seed_sweep.summary(runs[1:]) == (99.7, None)
    one = seed_sweep.markdown("x", runs[1:], "cmd", "cpu", "abc1234")
    assert "**Final epoch, one seed: 99.70% (no spread from one run)** (partial: 1 of 2" in one
    assert "+-" not in one
    assert seed_sweep.summary(runs[2:]) is None
    assert "none of the 1 seeds has finished" in seed_sweep.markdown("x", runs[2:], "c", "m", "k")
    assert seed_sweep.read_run(5, tmp_path / "absent") == seed_sweep.SeedRun(5, 0, 0, None, None)


def test_a_report_without_flags_falls_back_on_the_presets_epochs(tmp_path: Path) -> None:
    # seed 1: metrics but no config.json (a run copied in from elsewhere); seed 2: nothing yet.
    # Without flags after '--' both are measured against the preset's default epochs.
    out = tmp_path / "sweep"
    default = seed_sweep.importlib.import_module("mnist_capsnet").parse_args([]).epochs
    (out / "seed_1").mkdir(parents=True)
    rows = [{"epoch": e, "test_accuracy": 99.0 + e / 100} for e in range(1, default + 1)]
    (out / "seed_1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = seed_sweep.sweep(
        ["--recipe", "mnist_capsnet", "--seeds", "1", "2", "--out-dir", str(out), "--report-only"],
        log=quiet,
    )
    final = 99.0 + default / 100
    assert runs == [
        seed_sweep.SeedRun(1, default, default, final, final),
        seed_sweep.SeedRun(2, 0, default, None, None),
    ]
    assert runs[0].complete


def test_flags_set_per_seed_are_refused(tmp_path: Path) -> None:
    base = ["--recipe", "mnist_capsnet", "--seeds", "1", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--seed is set per seed"):
        seed_sweep.sweep([*base, "--", "--seed", "3"], log=quiet)
    with pytest.raises(SystemExit, match="--out-dir is set per seed"):
        seed_sweep.sweep([*base, "--", "--out-dir=x"], log=quiet)
    with pytest.raises(SystemExit, match="repeats"):
        seed_sweep.sweep(["--recipe", "mnist_capsnet", "--seeds", "1", "1", "--out-dir", "x"])
