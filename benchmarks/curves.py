"""Record a table of full learning curves for a study, so pruners can be replayed without training.

    python -m benchmarks.curves --study q1 --preset smoke --n 128 --out benchmarks/curves/q1.json \
        --set epochs=9 --set data.val_size=5000 --set data.train_subset=4000 --set data.image_size=14

draws `--n` parameter sets at random (Optuna's RandomSampler, `--seed`) from the WHOLE space of
the study's preset (with the overrides and the study's own narrowing applied, exactly what a
sweep samples from) and trains each to the end through the real training core
(`kdsweep.core.train.train` with a `report` callback; the config comes from the study file's
own `config_for`), storing every epoch's value of the study's metric with the parameters.

Resumable and parallel-safe: configurations are numbered by their draw order; each finished one
is merged into the output file at once (under a lock, written atomically), and a restarted run
skips ids the file already holds. `--shard K/N` lets N processes share one table (run each with
`nice -n 10` and OMP_NUM_THREADS=1; configs train with threads=1). The Q1 table in the
repository took 26.6 min wall with two shards side by side on the shared 2-core machine under
heavy load (10.4 min of user CPU in all). Q2's smoke preset works the same way:

    python -m benchmarks.curves --study q2 --preset smoke --n 32 --out benchmarks/curves/q2.json

A configuration whose loss stops being finite (TrainingError, which fails a trial in a sweep)
is stored with the epochs it reported and `"diverged": true`; replays treat it as a failed
trial after those epochs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import optuna

from kdsweep.core.teacher import prepare as prepare_teacher
from kdsweep.core.train import TrainingError, train
from kdsweep.service import space as sp
from kdsweep.service import spec as studies


def sample_params(study: studies.StudySpec, preset: str, overrides: dict[str, Any], n: int, seed: int
                  ) -> list[dict[str, Any]]:
    """n parameter sets drawn at random from the study's (narrowed) space; same seed, same list."""
    space = study.space_for(preset, overrides)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [sp.sample(probe.ask(), space) for _ in range(n)]


def load_table(path: Path) -> dict[str, Any]:
    """A recorded table: {"meta": {...}, "configs": [{"id", "params", "curve", "diverged", "seconds"}]}."""
    return json.loads(path.read_text())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the table at `path` (shards of one recording share it).

    Beside the system's temporary files, not the repository: one lock per output path."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"kdsweep-curves-{digest}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _merge(path: Path, meta: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    """Add `row` to the table at `path` (created with `meta`), atomically; returns the table."""
    with locked(path):
        table = load_table(path) if path.exists() else {"meta": meta, "configs": []}
        if table["meta"]["definition"] != meta["definition"] or table["meta"]["seed"] != meta["seed"]:
            raise click.UsageError(f"{path} was recorded with another study definition or seed; "
                                   "choose another --out or delete it.")
        if row is not None and row["id"] not in {c["id"] for c in table["configs"]}:
            table["configs"].append(row)
            table["configs"].sort(key=lambda c: c["id"])
            table["meta"]["cpu_seconds"] = round(sum(c["seconds"] for c in table["configs"]), 1)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=None, separators=(",", ":")).replace('},{"id"', '},\n{"id"')
                       + "\n")
        os.replace(tmp, path)
        return table


def record_one(study: studies.StudySpec, preset: str, overrides: dict[str, Any], params: dict[str, Any],
               metric: str) -> dict[str, Any]:
    """Train one configuration to the end; its per-epoch metric, rounded to 1e-4 (0.01 points)."""
    config = study.config_for(preset, params, overrides, device="cpu", threads=1)
    curve: list[float] = []

    def report(epoch: int, metrics: dict[str, float]) -> None:
        curve.append(round(float(metrics[metric]), 4))

    teacher = prepare_teacher(config)  # a distilling config's teacher (cached once per host), as a sweep's
    start = time.perf_counter()
    diverged = False
    try:
        train(config, report=report, teacher=teacher)
    except TrainingError:
        diverged = True  # a sweep fails this trial after the epochs it reported
    return {"params": params, "curve": curve, "diverged": diverged,
            "seconds": round(time.perf_counter() - start, 2)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--study", "study_name", required=True, help="Study name or file (e.g. q1).")
@click.option("--preset", default="smoke", show_default=True, help="The study's preset the curves are of.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override the preset (as `kdsweep --set`), e.g. epochs=9 (repeatable).")
@click.option("--n", "n", type=click.IntRange(1), default=128, show_default=True, help="Configurations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draw.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Table (JSON).")
@click.option("--shard", default="0/1", show_default=True, help="K/N: record ids with id %% N == K.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Stop after this many new configs.")
def main(study_name: str, preset: str, sets: tuple[str, ...], n: int, seed: int, out: Path, shard: str,
         limit: int | None) -> None:
    """Train N random configurations of a study's preset to the end and store their curves."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        k, _, m = shard.partition("/")
        k_i, n_shards = int(k), int(m)
        if not 0 <= k_i < n_shards:
            raise ValueError
    except ValueError:
        raise click.UsageError(f"--shard {shard!r} is not K/N with 0 <= K < N.") from None
    try:
        study = studies.load(study_name)
        overrides = studies.parse_overrides(sets)
        study.check_overrides(preset, overrides)
        params_list = sample_params(study, preset, overrides, n, seed)
        definition = study.definition(preset, overrides)
    except studies.StudyError as exc:
        raise click.UsageError(str(exc)) from None
    meta = {
        "study": study.name, "preset": preset, "overrides": overrides, "seed": seed, "n": n,
        "metric": study.metric, "epochs": study.base_config(preset, overrides).epochs,
        "definition": definition,
        "command": "python -m benchmarks.curves " + " ".join(a for a in sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {c["id"] for c in _merge(out, meta, None)["configs"]}
    todo = [i for i in range(n) if i % n_shards == k_i and i not in done]
    click.echo(f"{len(done)} of {n} recorded; this process records {len(todo)}", err=True)
    for count, i in enumerate(todo):
        if limit is not None and count >= limit:
            break
        row = {"id": i, **record_one(study, preset, overrides, params_list[i], study.metric)}
        _merge(out, meta, row)
        click.echo(f"config {i}: {row['seconds']:.1f} s, final {row['curve'][-1] if row['curve'] else None}"
                   f"{' (diverged)' if row['diverged'] else ''}  {row['params']}", err=True)


if __name__ == "__main__":
    main()
