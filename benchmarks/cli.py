"""cli_startup_s: how fast the command line answers what needs no training.

Usage errors (a bad option, an unknown study, a preset typo, a bad `--set`) and `--help` run
in fresh processes, as a user types them; the baseline is a bare `python -c pass` in the same
interpreter, timed in the same run (interleaved), so the ratio shows what kdsweep adds to the
interpreter's own start whatever the machine's load. Goal: every usage error within 5x a bare
interpreter (they used to take 4-8 s: torch and Optuna were imported before the study file,
preset and settings were checked).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Entry

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "usage_error": ["launch", "q2", "--workers", "0"],
    "unknown_study": ["launch", "nosuch"],
    "bad_preset": ["launch", "q2", "--preset", "smok"],
    "bad_set": ["launch", "q2", "--preset", "smoke", "--set", "epochs=two"],
    "help": ["--help"],
    "launch_help": ["launch", "--help"],
}
USAGE_ERRORS = ("usage_error", "unknown_study", "bad_preset", "bad_set")
GOAL_RATIO = 5.0


def _once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def run(device: str, quick: bool) -> Entry:
    repeats = 1 if quick else 5
    bare_argv = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {"bare": [], **{name: [] for name in COMMANDS}}
    for _ in range(repeats):  # interleaved: a load change hits the baseline and the commands alike
        for name, args in COMMANDS.items():
            times["bare"].append(_once(bare_argv))
            times[name].append(_once([sys.executable, "-m", "kdsweep", *args]))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    bare = median["bare"]
    ratios = {name: median[name] / bare for name in COMMANDS}
    worst = max(USAGE_ERRORS, key=lambda n: ratios[n])
    return Entry(
        name="cli_startup_s", value=round(median[worst], 3),
        unit=f"s (median, slowest usage error: {worst}, fresh process)",
        baseline=round(bare, 3), ratio=round(ratios[worst], 2),
        goal=f"every usage error <= {GOAL_RATIO:g}x a bare `python -c pass`", device="cpu",
        met=all(ratios[n] <= GOAL_RATIO for n in USAGE_ERRORS),
        details={"seconds": {k: round(v, 3) for k, v in median.items()},
                 "ratio_to_bare": {k: round(v, 2) for k, v in ratios.items()}, "repeats": repeats,
                 "load_1min": round(os.getloadavg()[0], 1),
                 "commands": {k: "kdsweep " + " ".join(v) for k, v in COMMANDS.items()}},
    )
