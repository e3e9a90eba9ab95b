"""Optuna storage for kdsweep: plain Optuna RDB schema, made robust for long parallel sweeps.

* `StorageLocation` is the one place a storage URL is parsed: it checks the scheme, hides the
  password in everything shown (userinfo is parsed from the right, so a raw `@` or `/` in a
  password is neither shown nor looked up as a host), knows the SQLite file and the folders
  beside it (`kdsweep-artifacts/<study>`, `runs/`), and opens the storage.
* SQLite (default, one host): WAL journal and a long busy timeout. Transactions of calls that
  write begin with BEGIN IMMEDIATE (so two workers never both take the same waiting trial);
  reads begin deferred, so a dashboard or `status` never blocks a worker's write.
* PostgreSQL (many hosts): `postgresql+psycopg://user:pass@host/db`. One pooled connection per
  process (the heartbeat thread borrows it between the main thread's calls), no server-side
  prepared statements, so a transaction-mode PgBouncer can stand in front of the server.
* Heartbeats: a worker killed mid-trial leaves its trial RUNNING; once its heartbeat is older
  than the grace period (`dead_trial_ids`) the next worker to look re-queues it (with its
  intermediate values; `kdsweep.service.sweep.Sweep.reap`). Interval and grace come from
  KDSWEEP_HEARTBEAT / KDSWEEP_GRACE (seconds). Optuna's journal storage has no
  heartbeats, which is why kdsweep uses RDB storage only.
* Errors are sorted: a lost connection, a restarting server, a busy or locked database or a
  server out of connection slots is retried with bounded back-off (KDSWEEP_RETRIES times,
  about 75 s by default) and then ends in `StorageUnavailable`; a full disk, a read-only or
  damaged database, missing privileges or tables of another schema end at once in a
  `StorageError` that names the cause and what to do.
* `study_lock` serialises what must not run twice at once across workers and hosts (making
  a study's trial slots): on PostgreSQL a transaction-scoped advisory lock taken on the
  process's one connection, with the work done inside that same transaction; a file lock
  beside a SQLite file. A waiting worker logs who holds it every few seconds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
import sqlalchemy.orm
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

from kdsweep.service.location import (  # noqa: F401  (re-exported: the storage's names)
    ARTIFACTS_DIR,
    DEFAULT_URL,
    RUNS_DIR,
    SCHEME,
    URL_HELP,
    StorageError,
    StorageLocation,
    StorageURLError,
    check_study_name,
    location,
    password_of,
    redact,
    redact_text,
)

log = logging.getLogger("kdsweep.service.storage")

HEARTBEAT_S = 10  # seconds between a running trial's heartbeats (env KDSWEEP_HEARTBEAT)
GRACE_S = 30  # a RUNNING trial silent this long belongs to a dead worker (env KDSWEEP_GRACE)
RETRIES = 12  # retries per call (env KDSWEEP_RETRIES); back-off doubles up to 10 s: about 75 s
LOCK_LOG_S = 5.0  # a worker waiting for the study lock says who holds it this often (seconds)
# PostgreSQL ends a study-lock transaction idle this long (its holder stopped: SIGSTOP, a paused
# VM), which rolls its block back and frees the lock for the others (seconds).
LOCK_IDLE_S = 30
POOL_TIMEOUT_S = 60  # a thread waits this long for the process's one server connection


def _seconds(env: str, default: int, least: int = 1, unit: str = "seconds") -> int:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise StorageError(f"{env} must be a whole number of {unit}, at least {least}; got {raw!r}.")
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


def retries() -> int:
    """Retries of a storage call on a transient error: $KDSWEEP_RETRIES, else RETRIES."""
    return _seconds("KDSWEEP_RETRIES", RETRIES, least=0, unit="retries")


class NoStudies(StorageError):
    """A read-only open found no Optuna tables (or no SQLite file): the storage holds no study."""


class StorageUnavailable(StorageError):
    """The storage stayed unreachable (down, restarting, locked, out of connection slots) for
    the whole retry budget. Nothing is wrong with the data: a worker's running trial should
    be re-queued, not failed, and the command run again once the database is back."""


# ---------------------------------------------------------------- errors: transient or not


@dataclass(frozen=True)
class _Cause:
    phrases: tuple[str, ...]  # lower-case fragments of the driver's message
    what: str  # the sentence's cause
    todo: str  # what to do


# A server or file that answered and said no: never retried, named at once.
_PERMANENT = (
    _Cause(('relation "version_info" does not exist', "no such table: version_info"),
           "the database holds no Optuna studies", "pass the --storage the study was launched with"),
    _Cause(("database or disk is full", "no space left on device", "could not extend file",
            "disk full", "diskfull"),
           "the disk holding the database is full", "free space there, then run the command again"),
    _Cause(("disk i/o error",),
           "the disk holding the database failed a read or write", "check that disk (is it full, or failing?)"),
    _Cause(("attempt to write a readonly database", "read-only transaction", "read-only file system",
            "readonly database"),
           "the database is read-only", "give this user write access to it (for SQLite: to the file "
           "and its folder), then run the command again"),
    _Cause(("database disk image is malformed", "file is not a database", "file is encrypted"),
           "the database file is damaged or not a SQLite database",
           "restore it from a backup or use another file"),
    _Cause(("permission denied", "must be owner of", "insufficientprivilege", "unable to open database file"),
           "this user may not use the database's tables or files",
           "grant it access (PostgreSQL: GRANT ALL ON ALL TABLES IN SCHEMA public, and on its sequences; "
           "SQLite: the file and its folder), then run the command again"),
    _Cause(("no such column", "no such table", "undefinedcolumn", "undefinedtable",
            "column", "relation"),  # "column ... does not exist" and the like: narrowed below
           "the database's tables do not match this Optuna version",
           "use the kdsweep and Optuna versions that wrote it, or another database"),
    _Cause(("authentication failed", "no pg_hba.conf entry", "no password supplied",
            "does not exist", "role"),
           "the server refused the connection", "check the URL's user, password and database name"),
)
# Worth a retry: the server is away, restarting, busy or full of clients for a while.
_SLOTS = ("too many clients", "remaining connection slots are reserved", "too many connections")
_TRANSIENT = (
    "database is locked", "database table is locked", "database is busy", "lock timeout",
    "deadlock detected", "could not serialize access", "connection refused", "connection reset",
    "server closed the connection", "terminating connection", "the database system is",
    "could not connect", "connection timeout", "timeout expired", "connection is closed",
    "connection to server", "no connection to the server", "broken pipe", "ssl syscall",
    "could not receive data", "could not send data", "consuming input failed",
    "server conn crashed", "query_wait_timeout", "pgbouncer cannot connect", "no more connections allowed",
    "queuepool limit", "lost connection", "gone away",
) + _SLOTS


def _chain(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what it was raised from (explicitly, or the driver's error it wraps).

    Not `__context__`: an error raised while another was being handled (a rollback that fails
    because the disk is full) says nothing about whether the first one is worth a retry.
    """
    out: list[BaseException] = []
    while exc is not None and len(out) < 8 and exc not in out:
        out.append(exc)
        orig = getattr(exc, "orig", None)
        exc = orig if isinstance(orig, BaseException) else exc.__cause__
    return out


def _message(exc: BaseException) -> str:
    return " ".join(f"{type(e).__name__} {e}" for e in _chain(exc)).lower()


def _permanent(exc: BaseException) -> _Cause | None:
    text = _message(exc)
    for cause in _PERMANENT:
        if cause.what.startswith("the database's tables"):
            if not ("no such column" in text or "no such table" in text or "undefined" in text
                    or re.search(r"(column|relation) \S+ does not exist", text)):
                continue
        elif cause.what.startswith("the server refused"):
            if not any(p in text for p in ("authentication failed", "no pg_hba.conf entry",
                                           "no password supplied")) \
                    and not re.search(r"(database|role) \S+ does not exist", text):
                continue
        elif not any(p in text for p in cause.phrases):
            continue
        return cause
    return None


def _transient(exc: BaseException | None) -> bool:
    """Whether `exc` is a lost connection, a restarting server or a busy database: worth a retry.

    Optuna wraps errors raised during a commit in StorageInternalError, so the cause chain is
    searched. A permanent cause (see _PERMANENT) is never transient, whatever its type.
    """
    if exc is None or _permanent(exc) is not None:
        return False
    text = _message(exc)
    if any(p in text for p in _TRANSIENT):
        return True
    for e in _chain(exc):
        if isinstance(e, (sqlalchemy.exc.TimeoutError, ConnectionError, TimeoutError)):
            return True  # a socket that failed, or a wait for the pool's one connection
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        # psycopg's OperationalError is a connection failure unless its message says otherwise
        # (sqlite3's is not: it is raised for a full disk and a missing column alike).
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in ("OperationalError", "InterfaceError"):
            return True
    return False


def _reason(exc: BaseException) -> str:
    """The driver's first line, as it said it."""
    root = _chain(exc)[-1]
    return (str(root).strip().splitlines() or [type(root).__name__])[0]


def _read_only_folder(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.expanduser().resolve().parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path.expanduser().resolve().parent)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 62


def storage_error(exc: BaseException, where: StorageLocation, retried: bool = False) -> StorageError:
    """One sentence for a storage failure: its cause in words, the driver's own, what to do."""
    reason = where.hide(_reason(exc))
    cause = _permanent(exc)
    if cause is not None and where.sqlite_path is not None and _read_only_folder(where.sqlite_path):
        cause = next(c for c in _PERMANENT if c.what == "the database is read-only")
        reason += ", on a file system mounted read-only"
    elif cause is not None and cause.what.startswith("the disk holding") and where.sqlite_path is not None \
            and _free_bytes(where.sqlite_path) < 1 << 16:
        cause = _PERMANENT[1]  # SQLite says "disk I/O error" where a write found no space
        reason += f", {_free_bytes(where.sqlite_path)} bytes free"
    if cause is not None:
        return StorageError(f"{cause.what} ({where.shown}: {reason}); {cause.todo}.")
    if any(p in _message(exc) for p in _SLOTS):
        return StorageUnavailable(
            f"the PostgreSQL server at {where.shown} has no free connection slots"
            f"{' after every retry' if retried else ''} ({reason}); raise its max_connections, run fewer "
            "workers, or put PgBouncer in front of it (README: PostgreSQL and many hosts)."
        )
    return StorageError(f"storage {where.shown} failed: {type(_chain(exc)[-1]).__name__}: {reason}.")


def _retrying(method: Any, name: str, where: StorageLocation | None = None) -> Any:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        delay = 0.25
        budget = retries()
        for attempt in range(budget + 1):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, StorageError):
                    raise
                if not _transient(exc):
                    if where is not None and (_permanent(exc) is not None or _is_storage_failure(exc)):
                        raise storage_error(exc, where) from None
                    raise
                if _IN_LOCK.active:
                    raise  # inside the study lock the whole transaction is lost: see study_lock
                if attempt == budget:
                    if any(p in _message(exc) for p in _SLOTS) and where is not None:
                        raise storage_error(exc, where, retried=True) from exc
                    raise StorageUnavailable(
                        f"the storage did not answer {name} after {budget} retries over about "
                        f"{sum(min(0.25 * 2 ** i, 10.0) for i in range(budget)):.0f} s "
                        f"({_cause_name(exc)}); check the database, then run the worker again."
                    ) from exc
                log.warning("storage call %s failed (%s); retry %d/%d in %.1fs", name,
                            _cause_name(exc), attempt + 1, budget, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    return call


def _is_storage_failure(exc: BaseException) -> bool:
    """A database error that is neither a retry's business nor Optuna's own logic (whose
    IntegrityError and the like callers handle): a StorageInternalError or a driver error
    other than an integrity one."""
    for e in _chain(exc):
        if isinstance(e, sqlalchemy.exc.IntegrityError):
            return False
    return isinstance(exc, optuna.exceptions.StorageInternalError) or any(
        isinstance(e, (sqlalchemy.exc.DBAPIError, sqlite3.Error)) for e in _chain(exc))


def _cause_name(exc: BaseException) -> str:
    return type(_chain(exc)[-1]).__name__


class _Flag(threading.local):
    active = False


_READING = _Flag()  # set while a read-only storage call runs: SQLite begins it deferred
_IN_LOCK = _Flag()  # set while this thread's storage calls run inside study_lock's transaction


def _is_read(name: str) -> bool:
    return name.startswith(("get_", "_get_", "is_", "check_"))


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Delegates to an RDBStorage, retrying every call on transient errors.

    Safe to retry: PostgreSQL and SQLite commit atomically, so a call that failed on a lost
    connection either did not happen or (in the rare case the commit landed and only the
    reply was lost) is an idempotent state update. Permanent errors become one StorageError.
    """

    def __init__(self, inner: BaseStorage, where: StorageLocation | None = None) -> None:
        self._inner = inner
        self._where = where

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") and name not in _DELEGATED_PRIVATE:
            return object.__getattribute__(self, name)
        inner = object.__getattribute__(self, "_inner")
        attr = getattr(inner, name)
        if not callable(attr):
            return attr
        where = object.__getattribute__(self, "_where")
        retried = _retrying(attr, name, where)
        if not _is_read(name):
            return retried

        @functools.wraps(attr)
        def read(*args: Any, **kwargs: Any) -> Any:
            outer = _READING.active
            _READING.active = True
            try:
                return retried(*args, **kwargs)
            finally:
                _READING.active = outer

        return read

    @property
    def location(self) -> StorageLocation | None:
        return self._where

    def __getstate__(self) -> dict[str, Any]:
        return {"_inner": self._inner, "_where": self._where}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._inner = state["_inner"]
        self._where = state.get("_where")


# Private RDBStorage methods Optuna itself calls on a storage (heartbeat bookkeeping).
_DELEGATED_PRIVATE = {"_get_stale_trial_ids"}

# Satisfy the abstract base classes: every abstract method is served by __getattribute__.
RetryingStorage.__abstractmethods__ = frozenset()


# ---------------------------------------------------------------- opening


def _optuna_tables() -> set[str]:
    from optuna.storages._rdb import models

    return set(models.BaseModel.metadata.tables) | {"alembic_version"}


def _prepare_sqlite(where: StorageLocation, create: bool) -> None:
    """Check the SQLite file before Optuna touches it: its folder, that it is not another
    application's database, and WAL mode. Without `create` (a read), a missing file, or one
    without Optuna's tables, is NoStudies: nothing is made."""
    path = where.sqlite_path
    if path is None:
        return
    if not create and not path.exists():
        raise NoStudies(f"the SQLite file {path} does not exist")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise StorageError(f"the folder of the SQLite file {path} does not exist; create it first.")
    if path.exists():
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise storage_error(exc, where) from None
        if not create and not {"studies", "version_info", "alembic_version"} <= tables:
            raise NoStudies(f"the SQLite file {path} holds no Optuna study")
        foreign = sorted(t for t in tables - _optuna_tables() if not t.startswith("sqlite_"))
        if foreign:
            raise StorageError(
                f"the SQLite file {path} holds tables of another application ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); kdsweep does not write into it: use another file."
            )
        if not create:
            return  # a read: WAL was set when the file was made, and nothing is written now
    try:
        con = sqlite3.connect(path, timeout=60)
        try:
            # WAL lets readers (the dashboard, status) run while a worker writes.
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.Error as exc:
        if _permanent(exc) is not None:
            raise storage_error(exc, where) from None
        raise StorageError(f"cannot open the SQLite file {path}: {exc} (is the folder writable?).") from None


# Optuna's schema creation is not safe against a second process doing the same on an empty
# PostgreSQL database (CREATE TABLE races on pg_type, and the version row is inserted twice):
# the loser of that race just tries again and finds the schema made.
_SCHEMA_RACE = ("already exists", "pg_type_typname_nsp_index", "duplicate key value", "unique constraint")


def _open(where: StorageLocation, heartbeat: bool, wait: bool, create: bool) -> RetryingStorage:
    url = where.sqlalchemy_url()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if where.is_sqlite:
        _prepare_sqlite(where, create)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # One connection per process: the heartbeat thread and the study lock borrow it
        # between the main thread's calls (README: the connection budget).
        # (Optuna's first start on an empty database nests a second connection: it gets one
        # while the schema is made, see _one_connection.)
        engine_kwargs.update(pool_size=1, max_overflow=1, pool_timeout=POOL_TIMEOUT_S)
        if url.get_backend_name() == "postgresql":
            engine_kwargs["connect_args"] = {
                "connect_timeout": 10,
                # Who holds the study lock, as other workers see it in pg_stat_activity.
                "application_name": f"kdsweep {socket.gethostname()} pid {os.getpid()}"[:63],
                # No server-side prepared statements: a transaction-mode pooler would hand
                # them to another client's connection.
                "prepare_threshold": None,
            }
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": heartbeat_interval(), "grace_period": grace_period()}

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental; kdsweep relies on them knowingly (dead workers).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for attempt in range(5):
                try:
                    rdb = RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                                     skip_table_creation=not create, skip_compatibility_check=True, **kwargs)
                    _check_schema_version(rdb, where)
                    if not where.is_sqlite:
                        _one_connection(rdb, {**engine_kwargs, "max_overflow": 0})
                    return rdb
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                        optuna.exceptions.StorageInternalError) as exc:
                    if attempt == 4 or not any(p in _message(exc) for p in _SCHEMA_RACE):
                        raise
                    log.info("another process created the schema at the same time; trying again")
                    time.sleep(0.2 * (attempt + 1))
            raise AssertionError("unreachable")

    try:
        if not create and not where.is_sqlite:
            _require_tables(url, engine_kwargs, where)
        rdb = _retrying(connect, "connect", where)() if wait else connect()
    except StorageError:
        raise
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, sqlite3.Error) as exc:
        if _permanent(exc) is not None or any(p in _message(exc) for p in _SLOTS):
            raise storage_error(exc, where) from None
        raise StorageError(f"cannot open storage {where.shown}: {where.hide(_reason(exc))}.") from None
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage {where.shown}: {where.hide(str(exc))}.") from None
    if where.is_sqlite:
        _serialize_sqlite(rdb.engine)
    rdb._kdsweep_where = where  # type: ignore[attr-defined]  # for study_lock's messages
    # get_storage adds Optuna's own cache of finished trials in front of the RDB storage.
    return RetryingStorage(optuna.storages.get_storage(rdb), where)


def _require_tables(url: sqlalchemy.engine.URL, engine_kwargs: dict[str, Any], where: StorageLocation) -> None:
    """NoStudies unless the server database already holds Optuna's schema; writes nothing.

    (Optuna's RDBStorage adds its version row and alembic table where they are missing, so a
    read command checks all three before it constructs one.)"""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "version_info", "alembic_version"} <= tables:
        raise NoStudies(f"{where.shown} holds no Optuna study (no Optuna tables)")


def _one_connection(rdb: RDBStorage, engine_kwargs: dict[str, Any]) -> None:
    """Give `rdb` a new engine with `engine_kwargs` (a pool of one connection, no overflow).

    Optuna makes its schema with one connection nested in another; once that is done, every
    storage call uses one connection at a time. A pickled copy (a spawned process) opens its
    engine with these kwargs too.
    """
    old = rdb.engine
    rdb.engine_kwargs = engine_kwargs
    rdb.engine = sqlalchemy.create_engine(rdb.url, **engine_kwargs)
    rdb.scoped_session = sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker(bind=rdb.engine))
    rdb._version_manager.engine = rdb.engine
    rdb._version_manager.scoped_session = rdb.scoped_session
    old.dispose()


def _check_schema_version(rdb: RDBStorage, where: StorageLocation) -> None:
    """Optuna's own check, on one connection (Optuna's nests a second one inside a session,
    which a one-connection pool cannot give)."""
    manager = rdb._version_manager
    with rdb.engine.connect() as conn:
        from alembic import migration

        current = migration.MigrationContext.configure(conn).get_current_revision()
    head = manager.get_head_version()
    if current != head:
        raise StorageError(
            f"the database's tables at {where.shown} have schema version {current}, and this Optuna "
            f"({optuna.__version__}) needs {head}; run `optuna storage upgrade --storage URL` (back it up "
            "first) or use the Optuna version that made it."
        )


def open_storage(url: str | StorageLocation | None = None, heartbeat: bool = True, wait: bool = False,
                 create: bool = True) -> RetryingStorage:
    """Open the storage at `url` (creating Optuna's schema if `create`); StorageError if impossible.

    With `wait`, a database that is down or restarting is retried with the same back-off as
    every later call: a worker started during an outage waits for it, as one already running
    does. Without it (commands a person types), the first failure is reported. Without
    `create` (read commands), nothing is created: a missing SQLite file or one without
    Optuna's tables is NoStudies.
    """
    where = url if isinstance(url, StorageLocation) else StorageLocation.parse(url)
    return _open(where, heartbeat=heartbeat, wait=wait, create=create)


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make every SQLite transaction that may write take the write lock when it begins.

    Python's sqlite3 starts a transaction only at its first write, so a read-check-write such
    as Optuna's WAITING -> RUNNING update runs its read outside any lock: two processes can
    both see a slot WAITING and both take it. Measured here: with 8 workers on one file, two
    workers ran the same trial. BEGIN IMMEDIATE serializes those updates; a worker that finds
    the lock taken waits (busy timeout 60 s) instead of failing with "database is locked".
    Calls that only read (RetryingStorage marks them) begin deferred: under WAL they never
    take the write lock, so a polling dashboard does not hold up the workers.
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below emit BEGIN
        # WAL with synchronous=NORMAL cannot corrupt the file; it only skips an fsync per commit.
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN" if _READING.active else "BEGIN IMMEDIATE")

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


def _me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_id: int) -> Iterator[None]:
    """Hold a lock on `study_id` shared by every process that uses this database.

    PostgreSQL: a transaction-scoped advisory lock (`pg_advisory_xact_lock`, so it also works
    through a transaction-mode PgBouncer) taken on the process's one pooled connection; every
    storage call this thread makes inside the block runs in that same transaction, so the
    block is stored all at once or not at all, and the lock ends with it (also when the
    process dies). A connection lost inside the block raises StorageUnavailable with nothing
    of the block stored; the caller may run the block again. MySQL: GET_LOCK; SQLite: an OS
    file lock beside the database file (SQLite is one host anyway); anything else (in-memory
    storage): a lock within this process. A worker that waits logs who holds the lock (host,
    pid, since when) every LOCK_LOG_S seconds; it never takes the lock from its holder. On
    PostgreSQL a holder that stops (SIGSTOP, a paused VM) mid-block loses it after LOCK_IDLE_S
    seconds idle: the server ends its transaction, so nothing of its block is stored.
    """
    rdb = _rdb(storage)
    engine = rdb.engine if rdb is not None else None
    dialect = engine.dialect.name if engine is not None else ""
    database = engine.url.database if engine is not None else None
    if dialect == "sqlite" and database and database != ":memory:":
        with _file_lock(str(lock_files(storage, study_id)[0])):
            yield
        return
    if dialect == "postgresql":
        with _pg_lock(rdb, study_id):
            yield
        return
    if dialect == "mysql":
        key = {"a": _LOCK_CLASS, "b": study_id}

        def connect() -> sqlalchemy.engine.Connection:
            conn = engine.connect()
            try:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(CONCAT('kdsweep-', :a, '-', :b), -1)"), key)
            except BaseException:
                conn.close()
                raise
            return conn

        conn = _retrying(connect, "lock")()
        try:
            yield
        finally:
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # a lost connection released it
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(CONCAT('kdsweep-', :a, '-', :b))"), key)
                conn.commit()
            conn.close()
        return
    with _LOCAL_LOCKS.setdefault((id(storage), study_id), threading.Lock()):
        yield


def lock_files(storage: BaseStorage, study_id: int) -> list[Path]:
    """The files `study_lock` keeps beside a SQLite database for a study (the lock and its
    owner note); none for other storages. `kdsweep rm` deletes them with the study."""
    rdb = _rdb(storage)
    engine = rdb.engine if rdb is not None else None
    database = engine.url.database if engine is not None and engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return []
    lock = f"{database}.slots-{study_id}.lock"
    return [Path(lock), Path(lock + ".owner")]


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
            owner.write_text(f"{_me()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
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


@contextlib.contextmanager
def _pg_lock(rdb: RDBStorage, study_id: int) -> Iterator[None]:
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
        conn, holder = _retrying(take, "lock")()
        if conn is not None:
            break
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
    # Each storage call of the block becomes a SAVEPOINT of the lock's transaction: one that
    # fails (Optuna rolls back an IntegrityError it expects) undoes itself, not the lock.
    session = sqlalchemy.orm.Session(bind=conn, join_transaction_mode="create_savepoint")
    registry = rdb.scoped_session.registry
    before = registry() if registry.has() else None
    registry.set(session)
    _IN_LOCK.active = True
    try:
        yield
        conn.commit()  # the block's writes and the end of the lock, at once
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.rollback()
        if isinstance(exc, Exception) and _transient(exc):
            where = getattr(rdb, "_kdsweep_where", None)
            raise StorageUnavailable(
                f"the connection to {where.shown if where else 'the storage'} was lost inside the "
                f"study lock ({_cause_name(exc)}); nothing of that step was stored: run it again."
            ) from exc
        raise
    finally:
        _IN_LOCK.active = False
        session.close()
        if before is not None:
            registry.set(before)
        else:
            registry.clear()
        conn.close()
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
