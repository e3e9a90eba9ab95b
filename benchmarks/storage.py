"""`storage_overhead_ms`: what Optuna and its storage cost per trial, on SQLite and PostgreSQL.

W worker processes run kdsweep's real worker loop (`kdsweep.service.worker.run_worker`: stale-trial
check, atomic pop of a WAITING slot, heartbeat, the Q1 study's TPE sampler over its full
space, then per step `trial.report` + `trial.should_prune` against Q1's Hyperband pruner,
and `tell`) on storage opened by `kdsweep.service.storage.open_storage`. The objective does no
training, so every second is overhead: ms per trial = workers x (first trial start to last
trial end, as stored) / trials, i.e. how much longer each trial takes; the workers' own CPU
time per trial (database server excluded) is reported beside it. PostgreSQL gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna

from benchmarks.common import Entry, Skip, scratch
from kdsweep.service import space as sp
from kdsweep.service import spec as studies
from kdsweep.service.objective import Objective

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class TrivialObjective(Objective):
    """Q1's objective minus the training: samples Q1's space through kdsweep's own sampling,
    then reports `steps` fake accuracies with a prune check after each."""

    steps: int = 10

    def __call__(self, trial: optuna.Trial) -> float:
        sp.sample(trial, self.study.space_for(self.preset))
        rng = random.Random(trial.number)
        acc = rng.uniform(0.3, 0.9)
        for step in range(1, self.steps + 1):
            acc += rng.uniform(0.0, 0.02)
            trial.report(acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc


def _worker(url: str, study_name: str, steps: int, index: int, out: mp.Queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    storage = open_storage(url)
    objective = TrivialObjective(studies.load("q1"), "smoke", {}, Path(tempfile.gettempdir()), steps=steps)
    cpu = time.process_time()
    summary = run_worker(Sweep.join(storage, study_name, objective.study), objective)
    out.put((time.process_time() - cpu, summary.ran))


def measure(url: str, workers: int, trials: int, steps: int) -> dict[str, float]:
    """Create the study with `trials` slots, run `workers` processes; ms of overhead per trial."""
    from kdsweep.service import spec as studies
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    study_def = studies.load("q1")
    name = f"bench-{uuid.uuid4().hex[:8]}"
    Sweep.create(open_storage(url), study_def, "smoke", name, trials, seed=0)
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, name, steps, i, out)) for i in range(workers)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):  # a worker that dies must fail the entry, not hang it
        try:
            results.append(out.get(timeout=2))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"a storage benchmark worker exited with code {dead[0]}") from None
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    ran = sum(n for _, n in results)
    # From the first trial's start to the last one's end, as stored: process start-up and the
    # final wait for the other workers are not trial overhead.
    import optuna

    done = [t for t in optuna.load_study(study_name=name, storage=open_storage(url)).trials
            if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    cpu = sum(c for c, _ in results)
    return {"ms_per_trial": 1000 * workers * span / len(done),
            "worker_cpu_ms_per_trial": 1000 * cpu / len(done), "trials_finished": len(done),
            "trials_run": ran, "slots": trials, "span_s": span, "wall_s": wall}


def _postgres_db() -> tuple[str, str] | None:
    """A fresh database on the local server: (url, name), or None when there is no server."""
    try:
        import psycopg
    except ImportError:
        return None
    name = f"kdsweep_bench_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN.replace("postgresql://", "postgresql://", 1),
                             autocommit=True, connect_timeout=3) as con:
            con.execute(f'CREATE DATABASE "{name}"')
    except Exception:
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def _drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(device: str, quick: bool) -> Entry:
    workers, trials, steps = (4, 40, 10) if quick else (4, 200, 10)
    figures: dict[str, dict[str, float]] = {}
    with scratch("storage") as tmp:
        figures["sqlite"] = measure(f"sqlite:///{tmp / 'bench.db'}", workers, trials, steps)
    pg = _postgres_db()
    if pg is None:
        figures["postgresql"] = {"skipped": "no PostgreSQL server at 127.0.0.1:5432"}
    else:
        url, name = pg
        try:
            figures["postgresql"] = measure(url, workers, trials, steps)
        finally:
            _drop(name)
    measured = [f["ms_per_trial"] for f in figures.values() if "ms_per_trial" in f]
    if not measured:
        raise Skip("no storage could be measured")
    value = max(measured)
    return Entry(
        name="storage_overhead_ms", value=value, unit="ms per trial (worse backend)",
        baseline=None, ratio=None, goal="< 50 ms", device="cpu", met=value < 50,
        details={"workers": workers, "trials": trials, "steps_per_trial": steps,
                 "pruner": "Q1's HyperbandPruner", "sampler": "TPE (multivariate, constant liar)",
                 **{k: v for k, v in figures.items()}},
    )
