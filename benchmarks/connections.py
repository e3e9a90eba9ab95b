"""`workers_per_100_connections`: how many workers one default PostgreSQL server serves.

W worker processes run kdsweep's real worker loop (the `storage_overhead_ms` entry's trivial
objective: Q1's sampler and pruner, no training, so storage calls come as fast as they can —
the worst case for connections) against a fresh database on the local server, while this
process polls `pg_stat_activity` on a connection of its own every 20 ms. Each kdsweep process
names itself in `application_name` ("kdsweep HOST pid N"), so the most connections any one
worker held at once is measured, not assumed. A default server has max_connections = 100 and
superuser_reserved_connections = 3; `launch` (or a dashboard) holds one more. The value is
(100 - 3 - 1) // (most connections per worker): workers one default server serves without a
pooler. With PgBouncer in transaction mode the server sees only PgBouncer's pool, and the
fleet is bounded by PgBouncer's max_client_conn instead (tests/test_fleet.py runs that).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid

from benchmarks.common import Entry, Skip
from benchmarks.storage import PG_ADMIN, _drop, _postgres_db, _worker

MAX_CONNECTIONS, RESERVED, LAUNCH = 100, 3, 1  # PostgreSQL's defaults; launch's own connection


def _poll(url: str, stop: threading.Event, seen: dict[str, int]) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as con:
        while not stop.wait(0.02):
            rows = con.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                               "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()
            names = [r[0] for r in rows if r[0].startswith("kdsweep ")]
            seen["total"] = max(seen.get("total", 0), len(rows))
            for name in set(names):
                seen[name] = max(seen.get(name, 0), names.count(name))


def run(device: str, quick: bool) -> Entry:
    from kdsweep.service import spec as studies
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    workers, trials = (4, 40) if quick else (8, 80)
    pg = _postgres_db()
    if pg is None:
        raise Skip(f"no PostgreSQL server at {PG_ADMIN}")
    url, name = pg
    try:
        study = f"conn-{uuid.uuid4().hex[:8]}"
        st = open_storage(url)
        Sweep.create(st, studies.load("q1"), "smoke", study, trials, seed=0)
        st._inner._backend.engine.dispose()  # this process's connection is not a worker's
        seen: dict[str, int] = {}
        stop = threading.Event()
        poller = threading.Thread(target=_poll, args=(url, stop, seen), daemon=True)
        poller.start()
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(url, study, 10, i, out)) for i in range(workers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        ran = sum(out.get(timeout=600)[1] for _ in procs)
        for p in procs:
            p.join()
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
    finally:
        _drop(name)
    per_worker = {k: v for k, v in seen.items() if k != "total"}
    if len(per_worker) < workers:
        raise RuntimeError(f"saw {len(per_worker)} of {workers} workers in pg_stat_activity")
    most = max(per_worker.values())
    value = (MAX_CONNECTIONS - RESERVED - LAUNCH) // most
    return Entry(
        name="workers_per_100_connections", value=value, unit="workers a max_connections=100 server serves",
        baseline=None, ratio=None, goal=">= 90 workers (one connection each)", device="cpu", met=value >= 90,
        details={"workers": workers, "trials": trials, "trials_run": ran, "wall_s": round(wall, 1),
                 "most_connections_per_worker": most, "peak_connections_all_workers": seen.get("total", 0),
                 "arithmetic": f"({MAX_CONNECTIONS} - {RESERVED} reserved - {LAUNCH} launch) // {most}",
                 "earlier_design": "kdsweep 0.1: 2 per worker, 3 at the study lock: about 30 workers"},
    )
