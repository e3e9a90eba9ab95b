"""Optuna storage for kdsweep: plain Optuna RDB schema, made robust for long parallel sweeps.

* SQLite (default, one host): WAL journal, a long busy timeout and BEGIN IMMEDIATE
  transactions, so parallel workers wait for the write lock instead of failing with "database
  is locked", and two workers never both take the same waiting trial.
* PostgreSQL (many hosts): `postgresql+psycopg://user:pass@host/db`, with pre-ping so a
  restarted server is reconnected to transparently.
* Heartbeats: a worker killed mid-trial leaves its trial RUNNING; once its heartbeat is older
  than the grace period (`dead_trial_ids`) the next worker to look re-queues it (with its
  intermediate values; `kdsweep.service.sweep.Sweep.reap`). Interval and grace come from
  KDSWEEP_HEARTBEAT / KDSWEEP_GRACE (seconds). Optuna's journal storage has no
  heartbeats, which is why kdsweep uses RDB storage only.
* Every storage call is retried with bounded back-off on connection errors, so a database
  restart or a busy SQLite file pauses workers rather than killing them; when the retries
  run out, a StorageError says so in one sentence.
* `study_lock` serialises what must not run twice at once across workers and hosts (making
  a study's trial slots): an advisory lock on PostgreSQL/MySQL, a file lock beside a SQLite file.
* Passwords: every URL shown anywhere goes through `redact`/`redact_text`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
import sqlalchemy.orm
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

log = logging.getLogger("kdsweep.service.storage")

DEFAULT_URL = "sqlite:///kdsweep.db"
HEARTBEAT_S = 10  # seconds between a running trial's heartbeats (env KDSWEEP_HEARTBEAT)
GRACE_S = 30  # a RUNNING trial silent this long belongs to a dead worker (env KDSWEEP_GRACE)
RETRIES = 12  # connection retries per call; back-off doubles up to 10 s: about 75 s in all


def _seconds(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"{env} must be a whole number of seconds, at least 1; got {raw!r}.")
    return value


def heartbeat_interval() -> int:
    """Seconds between heartbeats: $KDSWEEP_HEARTBEAT, else HEARTBEAT_S (Optuna wants an int)."""
    return _seconds("KDSWEEP_HEARTBEAT", HEARTBEAT_S)


def grace_period() -> int:
    """Seconds of silence after which a RUNNING trial is declared dead: $KDSWEEP_GRACE, else GRACE_S.

    Every worker of a study must use the same value; it must exceed the heartbeat interval by
    enough to ride out a database restart (a worker retries its heartbeat meanwhile).
    """
    grace = _seconds("KDSWEEP_GRACE", GRACE_S)
    if grace <= heartbeat_interval():
        raise StorageError(
            f"KDSWEEP_GRACE ({grace} s) must be longer than KDSWEEP_HEARTBEAT ({heartbeat_interval()} s)."
        )
    return grace


class StorageError(RuntimeError):
    """The storage cannot be used; the message names it (password hidden) and what to do."""


class NoStudies(StorageError):
    """A read-only open found no Optuna tables (or no SQLite file): the storage holds no study."""


# user:password@ in a URL's authority; searched after "://" (or anywhere in a malformed URL
# such as "postgres//user:pw@host", which must not leak its password in the error either).
_USERINFO = re.compile(r"([^:/@\s]*):([^@\s]*)@")


def _split_scheme(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    return (scheme + sep, rest) if sep else ("", url)


def password_of(url: str | None) -> str | None:
    """The password in a storage URL, or None."""
    m = _USERINFO.search(_split_scheme(url or "")[1])
    return m.group(2) if m and m.group(2) else None


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for every message, log and export."""
    head, rest = _split_scheme(url)
    return head + _USERINFO.sub(lambda m: f"{m.group(1)}:***@", rest, count=1)


def redact_text(text: str, url: str | None) -> str:
    """Remove passwords wherever they appear in `text` (e.g. a driver's error message).

    Every URL's user:password@ is masked, and the password of `url` (the storage in use) is
    masked wherever it appears on its own.
    """
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    password = password_of(url)
    if password and len(password) >= 3:  # shorter ones would mask innocent text
        text = text.replace(password, "***")
    return text


# Connection errors no retry can cure: the server answered, and said no.
_PERMANENT = ("authentication failed", "does not exist", "no pg_hba.conf entry", "no password supplied")


def _transient(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a lost connection or a busy database: worth a retry.

    Optuna wraps errors raised during a commit in StorageInternalError, so the cause chain is
    searched too. Integrity errors and the like are not transient and are raised at once.
    """
    if any(phrase in str(exc) for phrase in _PERMANENT):
        return False
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlite3.OperationalError)):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if type(exc).__module__.startswith("psycopg") and type(exc).__name__ in (
                "OperationalError", "InterfaceError"):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _retrying(method: Any, name: str) -> Any:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        delay = 0.25
        for attempt in range(RETRIES + 1):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == RETRIES:
                    raise StorageError(
                        f"the storage did not answer {name} after {RETRIES} retries over about "
                        f"{sum(min(0.25 * 2 ** i, 10.0) for i in range(RETRIES)):.0f} s "
                        f"({_cause_name(exc)}); check the database, then run the worker again."
                    ) from exc
                log.warning("storage call %s failed (%s); retry %d/%d in %.1fs", name,
                            _cause_name(exc), attempt + 1, RETRIES, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    return call


def _cause_name(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return type(getattr(root, "orig", None) or root).__name__


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Delegates to an RDBStorage, retrying every call on connection errors.

    Safe to retry: PostgreSQL and SQLite commit atomically, so a call that failed on a lost
    connection either did not happen or (in the rare case the commit landed and only the
    reply was lost) is an idempotent state update.
    """

    def __init__(self, inner: BaseStorage) -> None:
        self._inner = inner

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") and name not in _DELEGATED_PRIVATE:
            return object.__getattribute__(self, name)
        inner = object.__getattribute__(self, "_inner")
        attr = getattr(inner, name)
        return _retrying(attr, name) if callable(attr) else attr

    def __getstate__(self) -> dict[str, Any]:
        return {"_inner": self._inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._inner = state["_inner"]


# Private RDBStorage methods Optuna itself calls on a storage (heartbeat bookkeeping).
_DELEGATED_PRIVATE = {"_get_stale_trial_ids"}

# Satisfy the abstract base classes: every abstract method is served by __getattribute__.
RetryingStorage.__abstractmethods__ = frozenset()


def _prepare_sqlite(url: str) -> None:
    path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise StorageError(f"the folder of the SQLite file {path} does not exist; create it first.")
    try:
        con = sqlite3.connect(path, timeout=60)
        # WAL lets readers (the dashboard, status) run while a worker writes.
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the SQLite file {path}: {exc} (is the folder writable?).") from None


def open_storage(url: str | None = None, heartbeat: bool = True, wait: bool = False,
                 create: bool = True) -> RetryingStorage:
    """Open (creating the schema if needed) the storage at `url`; StorageError if impossible.

    With `wait`, a database that is down or restarting is retried with the same back-off as
    every later call (about 75 s): a worker started during an outage waits for it, as one
    already running does. Without it (commands a person types), the first failure is reported.

    With `create=False` (read commands: status, best, report, ls, dashboard) nothing is ever
    written: a missing SQLite file or a database without Optuna's tables raises NoStudies
    instead of being given a schema (Optuna's RDBStorage creates 13 tables, and a version row,
    in any database it is pointed at).
    """
    url = url or DEFAULT_URL
    if not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql\+\w+|mysql)://", url):
        raise StorageError(
            f"storage URL {redact(url)!r} is not understood; use sqlite:///FILE.db or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB."
        )
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, not psycopg2
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        if create:
            _prepare_sqlite(url)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": heartbeat_interval(),
            "grace_period": grace_period(),
        }

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental; kdsweep relies on them knowingly (dead workers).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create, **kwargs)

    try:
        if not create:
            _require_tables(url, engine_kwargs)
        rdb = _retrying(connect, "connect")() if wait else connect()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageError(
            f"cannot open storage {redact(url)}: {redact_text(reason, url)}."
        ) from None
    if url.startswith("sqlite"):
        _serialize_sqlite(rdb.engine)
    # get_storage adds Optuna's own cache of finished trials in front of the RDB storage.
    return RetryingStorage(optuna.storages.get_storage(rdb))


def _require_tables(url: str, engine_kwargs: dict[str, Any]) -> None:
    """NoStudies unless the database at `url` already holds Optuna's schema; writes nothing."""
    path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).expanduser().is_file():
        raise NoStudies(f"the SQLite file {path} does not exist")
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        # Optuna's RDBStorage also adds its version row and alembic table when they are
        # missing, so all three must be there before it is constructed.
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "version_info", "alembic_version"} <= tables:
        raise NoStudies(f"{redact(url)} holds no Optuna study (no Optuna tables)")


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 starts a transaction only at its first write, so a read-check-write such
    as Optuna's WAITING -> RUNNING update runs its read outside any lock: two processes can
    both see a slot WAITING and both take it. Measured here: with 8 workers on one file, two
    workers ran the same trial. BEGIN IMMEDIATE serializes those updates; a worker that finds
    the lock taken waits (busy timeout 60 s) instead of failing with "database is locked".
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below emit BEGIN
        # WAL with synchronous=NORMAL cannot corrupt the file; it only skips an fsync per commit.
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna built the schema predate the hooks


def study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def _rdb(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind kdsweep's retrying wrapper and Optuna's cache, if there is one."""
    inner: Any = storage
    for _ in range(4):
        if isinstance(inner, RDBStorage):
            return inner
        inner = getattr(inner, "_inner", None) or getattr(inner, "_backend", None)
    return None


_LOCAL_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_LOCK_CLASS = 0x6B64  # "kd": the first key of kdsweep's PostgreSQL advisory locks


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_id: int) -> Iterator[None]:
    """Hold a lock on `study_id` shared by every process that uses this database.

    PostgreSQL: a session advisory lock (released by the server if the worker dies); MySQL:
    GET_LOCK; SQLite: an OS file lock beside the database file (SQLite is one host anyway);
    anything else (in-memory storage): a lock within this process.
    """
    rdb = _rdb(storage)
    engine = rdb.engine if rdb is not None else None
    dialect = engine.dialect.name if engine is not None else ""
    database = engine.url.database if engine is not None else None
    if dialect == "sqlite" and database and database != ":memory:":
        from filelock import FileLock

        with FileLock(f"{database}.slots-{study_id}.lock", timeout=-1):
            yield
        return
    if dialect in ("postgresql", "mysql"):
        take, give = {
            "postgresql": ("SELECT pg_advisory_lock(:a, :b)", "SELECT pg_advisory_unlock(:a, :b)"),
            "mysql": ("SELECT GET_LOCK(CONCAT('kdsweep-', :a, '-', :b), -1)",
                      "SELECT RELEASE_LOCK(CONCAT('kdsweep-', :a, '-', :b))"),
        }[dialect]
        key = {"a": _LOCK_CLASS, "b": study_id}

        def connect() -> sqlalchemy.engine.Connection:
            conn = engine.connect()
            try:
                conn.execute(sqlalchemy.text(take), key)
            except BaseException:
                conn.close()
                raise
            return conn

        conn = _retrying(connect, "lock")()
        try:
            yield
        finally:
            try:
                conn.execute(sqlalchemy.text(give), key)
                conn.commit()
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # a lost connection has released the lock already
            conn.close()
        return
    with _LOCAL_LOCKS.setdefault((id(storage), study_id), threading.Lock()):
        yield


def dead_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """RUNNING trials of `study_id` whose workers are dead, by the storage's own clock.

    Dead: the heartbeat is older than the grace period, or there is no heartbeat at all and the
    trial started more than a grace period ago (a worker killed between taking its slot and
    its first heartbeat; Optuna's own stale check skips those, so they would run for ever).
    Empty for storages without heartbeats. Retried like every storage call.
    """
    rdb = _rdb(storage)
    if rdb is None or rdb.heartbeat_interval is None:
        return []
    return _retrying(_dead_trial_ids, "reap")(rdb, study_id)


def _dead_trial_ids(rdb: RDBStorage, study_id: int) -> list[int]:
    from datetime import timedelta, timezone

    from optuna.storages._rdb import models

    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    session = rdb.scoped_session()
    try:
        now = session.execute(sqlalchemy.func.now()).scalar()
        # Heartbeats are compared as Optuna compares them (the server's clock, tz dropped);
        # start times were written by Optuna with this host's datetime.now() (local time).
        beat_now = now.replace(tzinfo=None)
        aware = now if now.tzinfo else now.replace(tzinfo=timezone.utc)  # SQLite: UTC
        start_now = aware.astimezone().replace(tzinfo=None)
        running = (session.query(models.TrialModel)
                   .options(sqlalchemy.orm.selectinload(models.TrialModel.heartbeats))
                   .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
                   .filter(models.TrialModel.study_id == study_id).all())
        dead = []
        for t in running:
            if t.heartbeats:
                if beat_now - t.heartbeats[0].heartbeat > grace:
                    dead.append(t.trial_id)
            elif t.datetime_start is not None and start_now - t.datetime_start > grace:
                dead.append(t.trial_id)
        session.commit()
        return dead
    finally:
        session.close()
