"""Record a table of seed replicates of a sweep's race candidates, so races can be replayed.

    python -m benchmarks.seed_table --storage sqlite:///q1.db --study-name q1 --top 12 --seeds 12 \
        --out benchmarks/racing/q1_seeds.json --shard 0/2

takes the sweep's top `--top` configs (what a fixed grid verifies; the subset that
`kdsweep best --verify` would race, `kdsweep.service.racing.candidates`, is recorded beside them
as `live_rule`), and trains each on `--seeds` fresh seeds (the verification's own seeds) through the
real training core (`kdsweep.core.train.train`, the config from the sweep's stored definition,
one thread), storing each run's final value of the study's metric.

Resumable and parallel-safe like `benchmarks.curves`: runs are recorded seed by seed (every
candidate on seed 0, then seed 1, ...), so an interrupted table is a full rectangle of
candidates x the seeds done; each finished run is merged into the output at once under a lock,
and a restarted run skips what the file holds. Run each shard with `nice -n 10` and
OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from benchmarks.curves import locked
from kdsweep.core.train import TrainingError, train
from kdsweep.service import keys, racing
from kdsweep.service import spec as studies
from kdsweep.service.sweep import Sweep


def _write(path: Path, table: dict[str, Any]) -> None:
    import json
    import os

    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


def _merge(path: Path, meta: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    import json

    with locked(path):
        table = json.loads(path.read_text()) if path.exists() else {"meta": meta, "runs": []}
        if table["meta"]["candidates"] != meta["candidates"]:
            raise click.UsageError(f"{path} holds other candidates; choose another --out or delete it.")
        if run is not None and (run["trial"], run["seed"]) not in {(r["trial"], r["seed"]) for r in table["runs"]}:
            table["runs"].append(run)
            table["runs"].sort(key=lambda r: (r["seed"], r["trial"]))
            table["meta"]["cpu_seconds"] = round(sum(r["seconds"] for r in table["runs"]), 1)
        _write(path, table)
        return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--storage", required=True, help="The sweep's storage URL.")
@click.option("--study-name", required=True, help="The sweep.")
@click.option("--study", "study_file", default=None, help="Its study file (default: the stored name).")
@click.option("--top", type=click.IntRange(2), default=12, show_default=True, help="Candidates at most.")
@click.option("--seeds", type=click.IntRange(2), default=12, show_default=True, help="Seeds per candidate.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Table (JSON).")
@click.option("--shard", default="0/1", show_default=True, help="K/N: record runs with index %% N == K.")
@click.option("--reverse", is_flag=True, help="Take the shard's runs last first (a helper for a slow shard).")
def main(storage: str, study_name: str, study_file: str | None, top: int, seeds: int, out: Path,
         shard: str, reverse: bool) -> None:
    """Train the race candidates of a sweep on fresh seeds and store their final values."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    k, _, m = shard.partition("/")
    k_i, n_shards = int(k), int(m)
    sweep = Sweep.open(storage, study_name)
    spec = studies.load(study_file or sweep.spec_name)
    ranked = sweep.top(10_000)
    chosen = ranked[:top]  # the grid's configs; the live rule's subset is recorded beside them
    live = [t.number for t in racing.candidates(ranked, top)]
    base = int(chosen[0].user_attrs.get(keys.TRAIN_SEED, 0))
    seed_list = racing.seeds_for(seeds, base)
    config0 = spec.config_for(sweep.preset, chosen[0].params, sweep.overrides)
    meta = {
        "study": spec.name, "preset": sweep.preset, "overrides": sweep.overrides, "metric": sweep.metric,
        "maximize": sweep.maximize, "sweep_trials": len(ranked), "top": top, "seeds": seed_list,
        "candidates": [{"trial": t.number, "sweep_value": t.value, "params": t.params} for t in chosen],
        "preset_config": dataclasses.asdict(config0) | {"seed": None},
        "live_rule": live,
        "rule": "candidates: the sweep's top configs by one-seed value; live_rule: those "
                "kdsweep.service.racing.candidates keeps (the one-seed paired (McNemar) intervals "
                "cannot separate them from the winner)",
        "command": "python -m benchmarks.seed_table " + " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["trial"], r["seed"]) for r in _merge(out, meta, None)["runs"]}
    todo = [(t, s) for s in seed_list for t in chosen]
    todo = [(t, s) for i, (t, s) in enumerate(todo) if i % n_shards == k_i and (t.number, s) not in done]
    click.echo(f"{len(chosen)} candidates x {seeds} seeds; {len(done)} recorded; this shard records {len(todo)}",
               err=True)
    for t, s in reversed(todo) if reverse else todo:
        if (t.number, s) in {(r["trial"], r["seed"]) for r in _merge(out, meta, None)["runs"]}:
            continue  # another process recorded it meanwhile
        config = spec.config_for(sweep.preset, t.params, sweep.overrides, device="cpu", threads=1, seed=s)
        start = time.perf_counter()
        try:
            # What the objective returns for a trial (and so for a verification run).
            value: float | None = round(float(train(config).final_val_acc), 4)
        except TrainingError:
            value = None
        run = {"trial": t.number, "seed": s, "value": value, "seconds": round(time.perf_counter() - start, 2)}
        _merge(out, meta, run)
        click.echo(f"trial {t.number} seed {s}: {value} ({run['seconds']:.1f} s)", err=True)


if __name__ == "__main__":
    main()
