"""Real PostgreSQL for tests: a fresh database on the machine's server, or a throwaway cluster.

* `machine_database()` makes a uniquely named database on the server at 127.0.0.1:5432 (trust
  authentication, user postgres) and drops it afterwards. For tests that only use PostgreSQL.
* `Cluster` runs `initdb` into a temporary folder and serves it with `pg_ctl` on a spare
  loopback port, with password (scram-sha-256) authentication. For tests that damage a server
  (stop/start it, wrong passwords): nothing else is disturbed. initdb and postgres refuse to
  run as root, so as root they run as the `postgres` OS user.

Both skip (with how to enable them) only where PostgreSQL is not installed at all.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MACHINE = "127.0.0.1:5432"
HOW_TO_ENABLE = (
    "PostgreSQL is not installed; `apt-get install postgresql` (its server on 127.0.0.1:5432 "
    "with trust auth for user postgres, and initdb under /usr/lib/postgresql/*/bin) enables these tests"
)


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def require_postgres() -> None:
    if pg_bin() is None and shutil.which("initdb") is None:
        pytest.skip(HOW_TO_ENABLE)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(url: str):
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True,
                           connect_timeout=5)


@contextlib.contextmanager
def machine_database() -> Iterator[str]:
    """A fresh database on the machine's server; yields its SQLAlchemy URL, drops it afterwards."""
    require_postgres()
    admin = f"postgresql://postgres@{MACHINE}/postgres"
    try:
        con = _connect(admin)
    except Exception as exc:
        pytest.fail(f"PostgreSQL is installed but {MACHINE} does not answer ({exc}); start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`.")
    name = f"kdsweep_test_{os.getpid()}_{secrets.token_hex(3)}"
    with con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{MACHINE}/{name}"
    finally:
        with _connect(admin) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Cluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:`port` with user kdsweep / `password`."""

    user = "kdsweep"
    database = "kdsweep"

    def __init__(self, **settings: str | int) -> None:
        """`settings` are server settings (e.g. max_connections=20), passed as `-c key=value`."""
        require_postgres()
        self.settings = settings
        self.bin = pg_bin() or Path(shutil.which("initdb") or "initdb").parent
        self.port = free_port()
        # Random and URL-safe, but with characters a careless redaction would miss.
        self.password = "pw-" + secrets.token_hex(8) + "~x"
        self.root = Path(tempfile.mkdtemp(prefix="kdsweep-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run(_as_postgres([
            str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile),
            "--auth=scram-sha-256", "--no-sync", "-E", "UTF8",
        ]), check=True, capture_output=True)
        pwfile.unlink()
        self.start()
        with _connect(self.url("postgres")) as con:
            con.execute(f'CREATE DATABASE "{self.database}"')

    def url(self, database: str | None = None, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql+psycopg://{self.user}:{pw}@127.0.0.1:{self.port}/{database or self.database}"

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off"
                   + "".join(f" -c {k}={v}" for k, v in self.settings.items()))
        subprocess.run(_as_postgres([
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start",
        ]), check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` disconnects every client at once, as a restart does."""
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       check=True, capture_output=True)

    def rejected(self) -> int:
        """Connections the server turned away for want of a free slot, from its log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("too many clients already") + text.count("remaining connection slots are reserved")

    def is_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def remove(self) -> None:
        if self.is_up():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway password-protected cluster for the session; removed afterwards."""
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh database on the machine's PostgreSQL (dropped after the test)."""
    with machine_database() as url:
        yield url


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
