"""cli_startup_s: how fast the command line answers what needs no training.

A usage error (`kdsweep launch q2 --workers 0`) and `--help` run in fresh processes, as a user
types them; the baseline is a bare `python -c pass` in the same interpreter, so the ratio shows
what kdsweep adds to the interpreter's own start. Goal: a usage error in under 0.5 s (it used
to take 2-4 s because torch and Optuna were imported before the arguments were parsed).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Entry

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "usage_error": ["launch", "q2", "--workers", "0"],
    "help": ["--help"],
    "launch_help": ["launch", "--help"],
}


def _seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: str, quick: bool) -> Entry:
    repeats = 1 if quick else 5
    bare = _seconds([sys.executable, "-c", "pass"], repeats)
    measured = {name: _seconds([sys.executable, "-m", "kdsweep", *args], repeats)
                for name, args in COMMANDS.items()}
    value = measured["usage_error"]
    return Entry(
        name="cli_startup_s", value=round(value, 3), unit="s (median, usage error, fresh process)",
        baseline=round(bare, 3), ratio=round(value / bare, 2), goal="value < 0.5 s", device="cpu",
        met=value < 0.5,
        details={"seconds": {k: round(v, 3) for k, v in measured.items()}, "repeats": repeats,
                 "commands": {k: "kdsweep " + " ".join(v) for k, v in COMMANDS.items()}},
    )
