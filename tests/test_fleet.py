"""A fleet against a server with few connection slots: the connection budget, PgBouncer, a
launch that loses its database, and a server that is full.

A throwaway cluster with max_connections=20 and no slots reserved for superusers (the tests'
own user is one), so every slot counts. Workers are real `kdsweep worker` processes on the
tests' tiny study (an MLP on 2k Fashion-MNIST images, two epochs: about a second a trial).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import Cluster, free_port, wait_until
from test_faults import (
    TINY,
    assert_complete,
    create,
    epochs_logged,
    finish,
    load,
    start_worker,
    worker_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SLOTS = 20


@pytest.fixture(scope="module")
def small_server() -> Iterator[Cluster]:
    cluster = Cluster(max_connections=SLOTS, superuser_reserved_connections=0)
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "20")


def fresh_database(cluster: Cluster, name: str) -> str:
    import psycopg

    with psycopg.connect(cluster.url("postgres").replace("postgresql+psycopg", "postgresql"), autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.execute(f'CREATE DATABASE "{name}"')
    return cluster.url(name)


class ConnectionWatch:
    """Polls pg_stat_activity on one connection of its own: the most client connections seen
    at once, and the most held by one kdsweep process (its application_name names its pid)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.con = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
        self.peak = 0
        self.per_process = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            rows = self.con.execute("SELECT application_name FROM pg_stat_activity "
                                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()
            self.peak = max(self.peak, len(rows))
            names = [r[0] for r in rows if r[0].startswith("kdsweep ")]
            if names:
                self.per_process = max(self.per_process, max(names.count(n) for n in set(names)))

    def __enter__(self) -> ConnectionWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.con.close()


def test_sixteen_workers_on_twenty_slots(tmp_path: Path, fmnist_dir: Path, small_server: Cluster) -> None:
    """16 workers, one connection each, on a server of 20 slots: no connection turned away."""
    url = fresh_database(small_server, "fleet")
    workers, n = 16, 16
    create(url, "quick", n)
    rejected_before = small_server.rejected()
    with ConnectionWatch(url) as watch:
        procs = [start_worker(tmp_path, url, i, KDSWEEP_GRACE="20") for i in range(workers)]
        try:
            finish([p for p, _ in procs], timeout=900)
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
    logs = "".join(log.read_text() for _, log in procs)
    assert all(p.returncode == 0 for p, _ in procs), logs[-4000:]
    assert small_server.rejected() == rejected_before, "the server turned connections away"
    assert "Traceback" not in logs and "retry" not in logs, logs[-4000:]
    assert_complete(load(url), n)
    print(f"peak client connections {watch.peak} for {workers} workers; at most {watch.per_process} per worker")
    assert watch.per_process == 1, watch.per_process
    assert watch.peak <= workers + 1  # the workers, and `load` above at most


def test_launch_stops_its_workers_when_the_database_stays_down(tmp_path: Path, fmnist_dir: Path,
                                                               small_server: Cluster) -> None:
    url = fresh_database(small_server, "outage")
    cmd = [sys.executable, "-m", "kdsweep", "launch", str(TINY), "--preset", "slow", "--n-trials", "4",
           "--workers", "2", "--device", "cpu", "--no-tensorboard", "--artifacts", str(tmp_path / "artifacts")]
    env = worker_env(url, KDSWEEP_RETRIES="2", KDSWEEP_GRACE="20")
    launch = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              start_new_session=True)
    children: set[int] = set()
    opened: list = []  # one storage for every poll: a new one each time would hold a slot each
    try:
        def mid_trial() -> bool:
            import optuna

            from kdsweep.service.storage import open_storage

            try:
                kids = Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()
                children.update(map(int, kids))
                if not opened:  # after launch made the schema (launch's first start is not under test)
                    import psycopg

                    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as con:
                        if not con.execute("SELECT to_regclass('studies') IS NOT NULL").fetchone()[0]:
                            return False
                    opened.append(open_storage(url, heartbeat=False))
                study = optuna.load_study(study_name="tiny", storage=opened[0])
            except (FileNotFoundError, KeyError):
                return False
            except Exception as exc:  # the schema half made by launch as we looked
                print("not yet:", type(exc).__name__)
                return False
            return any(len(t.intermediate_values) >= 1 for t in study.trials)

        wait_until(mid_trial, 300, 0.2, "a trial of the launch to report an epoch")
        assert len(children) == 2, children
        small_server.stop("fast")
        out, _ = launch.communicate(timeout=150)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        if not small_server.is_up():
            small_server.start()
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    for pid in left:  # clean up before failing: they would run on alone
        os.kill(pid, signal.SIGKILL)
    assert launch.returncode == 1, out[-3000:]
    assert not left, f"launch left {len(left)} worker(s) running: {left}"
    # The workers' own one-sentence errors come first (they share the terminal); launch's is last.
    last = out.strip().splitlines()[-1]
    assert last.startswith("Error:") and "did not answer" in last and "Traceback" not in out, out[-3000:]


def test_a_full_server_is_named_after_the_retries(tmp_path: Path, small_server: Cluster) -> None:
    """Every slot taken: a worker retries (another client may leave), then says what to do."""
    import psycopg

    from kdsweep.service import spec
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    url = fresh_database(small_server, "full")
    storage = open_storage(url)
    Sweep.create(storage, spec.load(str(TINY)), "quick", "tiny", 2, seed=0)
    storage.rdb.engine.dispose()  # this process's own connection: closed now, not whenever it is collected
    hogs: list[psycopg.Connection] = []

    def take_free_slots() -> None:
        while len(hogs) < SLOTS:
            try:
                hogs.append(psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True))
            except psycopg.OperationalError as exc:
                assert "too many clients" in str(exc), exc
                return

    def every_slot_is_ours() -> bool:
        # Clients that were leaving (`create` above, an earlier test's workers) free their
        # slots a moment after they exit: take each one, until the server holds only ours.
        take_free_slots()
        if not hogs:
            return False
        mine = [con.info.backend_pid for con in hogs]
        others = hogs[0].execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                 "AND NOT (pid = ANY(%s))", (mine,)).fetchone()[0]
        return others == 0 and len(hogs) == SLOTS

    try:
        wait_until(every_slot_is_ours, 60, 0.2, "every connection slot of the server to be this test's")
        proc, log = start_worker(tmp_path, url, 0, KDSWEEP_RETRIES="2")
        assert proc.wait(timeout=120) == 1
        status = subprocess.run([sys.executable, "-m", "kdsweep", "status", "tiny", "--storage", url],
                                capture_output=True, text=True, env=worker_env(url), timeout=120, cwd=tmp_path)
    finally:
        for con in hogs:
            con.close()
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "has no free connection slots after every retry" in errors[0], errors[0]
    assert "max_connections" in errors[0] and "PgBouncer" in errors[0], errors[0]
    assert status.returncode == 1 and "has no free connection slots" in status.stderr, status.stderr[-2000:]


# ---------------------------------------------------------------- PgBouncer


@pytest.fixture
def pgbouncer(small_server: Cluster, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """PgBouncer in transaction mode before the cluster, with `POOL` server connections."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.skip("PgBouncer is not installed; `apt-get install pgbouncer` enables this test")
    folder = Path(tempfile.mkdtemp(prefix="kdsweep-pgbouncer-"))  # outside pytest's 0700 folders
    port = free_port()
    (folder / "userlist.txt").write_text(f'"{small_server.user}" "{small_server.password}"\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={small_server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {folder / 'userlist.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {POOL}\nmax_client_conn = 500\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
    )
    cmd = [binary, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # it refuses to run as root
        shutil.chown(folder, "postgres")
        for f in folder.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: small_server.is_up() and _listening(port) or proc.poll() is not None, 30, 0.1,
                   "PgBouncer to listen")
        assert proc.poll() is None, proc.stdout.read()
        yield f"postgresql+psycopg://{small_server.user}:{small_server.password}@127.0.0.1:{port}/", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


POOL = 4  # server connections PgBouncer keeps for the database


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_through_pgbouncer_in_transaction_mode(tmp_path: Path, fmnist_dir: Path, small_server: Cluster,
                                               pgbouncer: tuple[str, int]) -> None:
    """Eight workers through PgBouncer's 4 server connections: the study lock is transaction-scoped,
    no prepared statement crosses clients, and the study ends with exactly N."""
    base, _ = pgbouncer
    direct = fresh_database(small_server, "pooled")
    url = base + "pooled"
    workers, n = 8, 12
    create(url, "quick", n)
    with ConnectionWatch(direct) as watch:
        procs = [start_worker(tmp_path, url, i, KDSWEEP_GRACE="20") for i in range(workers)]
        try:
            finish([p for p, _ in procs], timeout=900)
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
    logs = "".join(log.read_text() for _, log in procs)
    assert all(p.returncode == 0 for p, _ in procs), logs[-4000:]
    assert "Traceback" not in logs and "prepared statement" not in logs, logs[-4000:]
    assert sum(1 for _, log in procs if epochs_logged(log)) >= 2  # several workers really ran trials
    assert_complete(load(url), n)
    print(f"peak server connections {watch.peak} for {workers} workers through PgBouncer (pool {POOL})")
    assert watch.peak <= POOL  # PgBouncer's pool, never one per worker
