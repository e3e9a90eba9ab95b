"""`study_lock`: what must not run twice at once across workers and hosts, stored all at once.

Making a study's trial slots, and re-queuing a dead worker's trial (its FAIL mark and its
WAITING copy), must each be one step: counted and written with no other worker in between,
and stored whole or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy
import sqlalchemy.orm
from optuna.storages import BaseStorage, RDBStorage

from kdsweep.service.storage import errors
from kdsweep.service.storage.errors import StorageUnavailable
from kdsweep.service.storage.retrying import IN_LOCK, RetryingStorage, with_retries

log = logging.getLogger("kdsweep.service.storage")

LOCK_LOG_S = 5.0  # a worker waiting for the study lock says who holds it this often (seconds)
# PostgreSQL ends a study-lock transaction idle this long (its holder stopped: SIGSTOP, a paused
# VM), which rolls its block back and frees the lock for the others (seconds).
LOCK_IDLE_S = 30
_LOCK_CLASS = 0x6B64  # "kd": the first key of kdsweep's PostgreSQL advisory locks
_LOCAL_LOCKS: dict[tuple[int, int], threading.Lock] = {}


def rdb_of(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage under `storage` (kdsweep's wrapper, or one passed as it is), if any."""
    if isinstance(storage, RetryingStorage):
        return storage.rdb
    return storage if isinstance(storage, RDBStorage) else None


def me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_id: int) -> Iterator[None]:
    """Hold a lock on `study_id` shared by every process that uses this database, and make
    every storage call this thread makes inside the block one transaction.

    PostgreSQL: a transaction-scoped advisory lock (`pg_advisory_xact_lock`, so it also works
    through a transaction-mode PgBouncer) taken on the process's one pooled connection.
    SQLite: an OS file lock beside the database file (per study), then a BEGIN IMMEDIATE
    transaction. Either way the block is stored all at once or not at all, and a process that
    dies mid-block stores nothing of it. A connection lost inside the block raises
    StorageUnavailable with nothing of the block stored; the caller may run the block again.
    A worker that waits logs who holds the lock every LOCK_LOG_S seconds; it never takes the
    lock from its holder. On PostgreSQL a holder that stops (SIGSTOP, a paused VM) mid-block
    loses it after LOCK_IDLE_S seconds idle: the server ends its transaction. Other storages
    (in memory): a lock within this process.
    """
    rdb = rdb_of(storage)
    dialect = rdb.engine.dialect.name if rdb is not None else ""
    database = rdb.engine.url.database if rdb is not None else None
    where = storage.location if isinstance(storage, RetryingStorage) else None
    if dialect == "sqlite" and database and database != ":memory:":
        with _file_lock(str(lock_files(storage, study_id)[0])):
            conn = with_retries(_begin, "lock", where)(rdb)
            with _one_transaction(rdb, conn, where):
                yield
    elif dialect == "postgresql":
        conn = _pg_lock(rdb, study_id, where)
        with _one_transaction(rdb, conn, where):
            yield
    else:
        with _LOCAL_LOCKS.setdefault((id(storage), study_id), threading.Lock()):
            yield


def lock_files(storage: BaseStorage, study_id: int) -> list[Path]:
    """The files `study_lock` keeps beside a SQLite database for a study (the lock and its
    owner note); none for other storages. `kdsweep rm` deletes them with the study."""
    rdb = rdb_of(storage)
    database = rdb.engine.url.database if rdb is not None and rdb.engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return []
    lock = f"{database}.slots-{study_id}.lock"
    return [Path(lock), Path(lock + ".owner")]


@contextlib.contextmanager
def transaction(storage: BaseStorage) -> Iterator[BaseStorage]:
    """Run the block's storage calls, made on the yielded storage, as one database transaction.

    The same transaction as `study_lock`'s, without the study lock: for steps that must be
    stored whole but need no count under the lock (taking a slot with its first heartbeat, a
    re-queue). On SQLite it begins IMMEDIATE, so it also excludes other writers. Inside
    `study_lock` the block joins the lock's own transaction. The yielded storage is the
    RDBStorage itself: a cache in front of it would keep a trial that a rollback removed.
    Storages without a database (in memory) yield themselves.
    """
    rdb = rdb_of(storage)
    if rdb is None:
        yield storage
        return
    if IN_LOCK.active:
        yield rdb
        return
    where = storage.location if isinstance(storage, RetryingStorage) else None
    conn = with_retries(_begin, "transaction", where)(rdb)
    with _one_transaction(rdb, conn, where):
        yield rdb


def _begin(rdb: RDBStorage) -> sqlalchemy.engine.Connection:
    conn = rdb.engine.connect()
    try:
        conn.begin()  # BEGIN IMMEDIATE (opening.serialize_sqlite): the write lock, now
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _one_transaction(rdb: RDBStorage, conn: sqlalchemy.engine.Connection, where: Any) -> Iterator[None]:
    """Run this thread's storage calls inside `conn`'s open transaction; commit it at the end.

    Optuna has no API for several storage calls in one transaction: each call opens a session
    from `rdb.scoped_session` and commits it. So for this thread only, that registry holds a
    session bound to `conn`, each call becoming a SAVEPOINT (one that fails, as Optuna's
    expected IntegrityErrors do, undoes itself, not the block). This is the one place kdsweep
    sets Optuna's private state; test_storage's test_the_study_lock_block_is_one_transaction
    shows why (a block is stored whole or not at all, on every backend).
    """
    session = sqlalchemy.orm.Session(bind=conn, join_transaction_mode="create_savepoint")
    registry = rdb.scoped_session.registry
    before = registry() if registry.has() else None
    registry.set(session)
    IN_LOCK.active = True
    try:
        yield
        conn.commit()  # the block's writes (and, on PostgreSQL, the end of the lock) at once
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.rollback()
        if isinstance(exc, Exception) and errors.transient(exc):
            raise StorageUnavailable(
                f"the connection to {where.shown if where else 'the storage'} was lost inside the "
                f"study lock ({errors.cause_name(exc)}); nothing of that step was stored: run it again."
            ) from exc
        raise
    finally:
        IN_LOCK.active = False
        session.close()
        if before is not None:
            registry.set(before)
        else:
            registry.clear()
        conn.close()


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    from filelock import FileLock, Timeout

    owner = Path(path + ".owner")
    lock = FileLock(path)
    waited = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=LOCK_LOG_S)
            break
        except Timeout:
            try:
                held_by = owner.read_text().strip() or "unknown"
            except OSError:
                held_by = "unknown"
            log.warning("waiting %.0f s for the study lock %s, held by %s", time.monotonic() - waited,
                        path, held_by)
    try:
        with contextlib.suppress(OSError):
            owner.write_text(f"{me()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.write_text("")
        lock.release()


_PG_HOLDER = sqlalchemy.text(
    "SELECT a.application_name, a.client_addr, a.pid, a.xact_start FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.classid = :a AND l.objid = :b AND l.database = (SELECT oid FROM pg_database "
    "WHERE datname = current_database())"
)


def _pg_lock(rdb: RDBStorage, study_id: int, where: Any) -> sqlalchemy.engine.Connection:
    """A connection in a transaction that holds the study's advisory lock."""
    key = {"a": _LOCK_CLASS, "b": study_id}
    waited = time.monotonic()
    last_log = waited
    nap = 0.05

    def take() -> tuple[sqlalchemy.engine.Connection | None, Any]:
        conn = rdb.engine.connect()
        try:
            conn.begin()
            if conn.execute(sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:a, :b)"), key).scalar():
                conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {int(LOCK_IDLE_S * 1000)}")
                return conn, None
            holder = conn.execute(_PG_HOLDER, key).first()
        except BaseException:
            conn.close()
            raise
        conn.close()  # rolls back: nothing was done
        return None, holder

    while True:
        # Tries, not a blocking wait: the connection goes back to the pool between tries, so
        # this process's heartbeat can still use it, and a waiter never holds a second one.
        conn, holder = with_retries(take, "lock", where)()
        if conn is not None:
            return conn
        now = time.monotonic()
        if now - last_log >= LOCK_LOG_S:
            last_log = now
            if holder is None:
                who = "a process that just let it go"
            else:
                name, addr, pid, since = holder
                who = (f"{name or 'a client'} (server pid {pid}, from {addr or 'local socket'}) "
                       f"since {since:%H:%M:%S %Z}".strip())
            log.warning("waiting %.0f s for the study lock, held by %s", now - waited, who)
        time.sleep(nap)
        nap = min(nap * 2, 1.0)
