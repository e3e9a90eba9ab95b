"""`python -m benchmarks`: run the suite, print a table, write JSON (and optionally Markdown).

Each entry has its own time budget (seconds of its full mode on a quiet 2-core CPU); its
sizes are chosen to fit it, and an entry that overruns says so in its row.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from benchmarks import (
    bf16_accuracy,
    cli,
    connections,
    core,
    dead_time,
    fused,
    gpu,
    pruning,
    q2,
    racing,
    report,
    speed,
    storage,
    workers,
)
from benchmarks.common import Entry, Skip

# name -> (function(device, quick) -> Entry, budget in seconds on a CPU, runs on the CPU too)
ENTRIES: dict[str, tuple[Callable[[str, bool], Entry], float]] = {
    "core_vs_reference": (core.run, 180),
    "q2_vs_plain_ce": (q2.q2_vs_plain_ce, 300),
    "teacher_setups": (q2.teacher_setups, 120),
    "pruning_epoch_savings": (pruning.run, 1800),  # replay only (no training): tuning, scoring, bootstrap
    "pruning_q2": (pruning.run_q2, 600),  # the same on q2's own table
    "pruning_q1_smoke": (pruning.run_q1_smoke, 900),  # the same on the q1 smoke preset's own tables
    "racing_verification": (racing.run, 60),  # replay of a recorded seed table: no training
    "worker_scaling": (workers.run, 240),
    "storage_overhead_ms": (storage.run, 120),
    "q2_fused": (fused.run, 420),
    "q2_speed": (speed.run, 1500),
    "bf16_accuracy": (bf16_accuracy.run, 2700),  # 3 teachers and 6 trials, each in fp32 and bf16
    "trial_dead_time": (dead_time.run, 240),
    "cli_startup_s": (cli.run, 30),
    "workers_per_100_connections": (connections.run, 90),
    "gpu_resnet18_train_32px": (gpu.resnet18_train, 90),
    "gpu_resnet18_train_224px": (gpu.resnet18_train_224, 90),
    "gpu_resnet50_teacher_224px": (gpu.resnet50_teacher, 30),
    "gpu_compile_reuse": (gpu.compile_reuse, 120),
    "gpu_trials_per_device": (gpu.trials_per_device, 150),
}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="benchmarks/results.json",
              show_default=True, help="JSON file of the results.")
@click.option("--only", multiple=True, type=click.Choice(list(ENTRIES)),
              help="Run only these entries (repeatable); the output file keeps its other entries.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the training entries; GPU entries are skipped on cpu.")
@click.option("--quick", is_flag=True, help="Shrink every entry to seconds (plumbing check, not figures).")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None,
              help="Also write the Markdown page (e.g. docs/benchmarks.md).")
@click.option("--note", default=None, help="A sentence about the run for the Markdown page (e.g. machine load).")
def main(output: str, only: tuple[str, ...], device: str, quick: bool, markdown: str | None,
         note: str | None) -> None:
    """Run kdsweep's benchmark suite: side-by-side ratios against ordinary baselines.

    \b
    python -m benchmarks                        # the whole suite on the CPU (~20 min)
    python -m benchmarks --only worker_scaling --quick
    python -m benchmarks --device cuda --only core_vs_reference --only gpu_resnet18_train_32px
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    names = list(only) or list(ENTRIES)
    # --only re-measures some entries: the file keeps the others (every entry carries its own
    # date and load), with these replaced where they stood.
    stored = report.read_entries(Path(output)) if only else []
    results = []
    suite_start = time.perf_counter()
    for name in names:
        fn, budget = ENTRIES[name]
        click.echo(f"== {name} (budget {budget:.0f} s{', quick' if quick else ''})", err=True)
        start = time.perf_counter()
        try:
            entry = fn(device, quick).to_json()
        except Skip as why:
            entry = {"name": name, "skipped": str(why)}
            click.echo(f"   skipped: {why}", err=True)
        except Exception as exc:  # one broken entry must not lose the others' figures
            traceback.print_exc()
            entry = {"name": name, "skipped": f"error: {type(exc).__name__}: {exc}"}
        wall = time.perf_counter() - start
        entry["wall_s"] = round(wall, 1)
        # The conditions of this entry's own run (entries are merged into one file from runs
        # on different days): when it ended and the load average over its last minutes.
        entry["date_utc"] = report.machine_time()
        entry["load_avg"] = [round(x, 1) for x in os.getloadavg()]
        entry["budget_s"] = None if quick else budget
        if quick and not entry.get("skipped"):
            entry.setdefault("details", {})["mode"] = "--quick (shrunk sizes: plumbing, not the entry's figure)"
        if not quick and wall > budget and not entry.get("skipped"):
            entry.setdefault("details", {})["over_budget"] = f"took {wall:.0f} s of {budget:.0f} s"
        results.append(entry)
        click.echo(f"   {wall:.0f} s", err=True)
        meta = {**report.machine(), "suite_s": round(time.perf_counter() - suite_start, 1),
                "quick": quick, "device": device, "complete": len(results) == len(names)}
        report.write_json(Path(output), report.merged(stored, results), meta)  # after every entry: a crash keeps the rest
        if markdown:
            _write_markdown(markdown, report.merged(stored, results), meta, note)
    click.echo(report.table(results))
    kept = f"; {len(stored)} stored entries kept or replaced" if stored else ""
    click.echo(f"wrote {output} ({meta['suite_s']:.0f} s{kept})")
    if markdown:
        click.echo(f"wrote {markdown}")


def _write_markdown(path: str, results: list, meta: dict, note: str | None) -> None:
    command = "python -m benchmarks " + " ".join(sys.argv[1:])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report.markdown(results, meta, command, note))


if __name__ == "__main__":
    main()
