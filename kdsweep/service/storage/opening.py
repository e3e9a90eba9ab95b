"""`open_storage`: a `StorageLocation` made into a storage, Optuna's schema created once.

* SQLite (default, one host): WAL journal and a long busy timeout. Transactions of calls that
  write begin with BEGIN IMMEDIATE (so two workers never both take the same waiting trial);
  reads begin deferred, so a dashboard or `status` never blocks a worker's write. A new
  database is made by one process at a time (an exclusive lock on the file itself), and a
  failed creation (a full disk) leaves no file behind.
* PostgreSQL (many hosts): `postgresql+psycopg://user:pass@host/db`. One pooled connection per
  process (the heartbeat thread and the study lock borrow it between the main thread's calls),
  no server-side prepared statements, so a transaction-mode PgBouncer can stand in front of
  the server. A new schema is made under an advisory lock, by one process at a time.
* Reads (`create=False`) never write: a missing file, or a database without Optuna's
  tables, is NoStudies.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.event
from optuna.storages import BaseStorage, RDBStorage

from kdsweep.service.location import StorageError, StorageLocation
from kdsweep.service.storage import errors
from kdsweep.service.storage.errors import NoStudies
from kdsweep.service.storage.locks import LOCK_CLASS
from kdsweep.service.storage.retrying import READING, RetryingStorage, with_retries
from kdsweep.service.storage.settings import grace_period, heartbeat_interval

log = logging.getLogger("kdsweep.service.storage")

POOL_TIMEOUT_S = 60  # a thread waits this long for the process's one server connection
_REQUIRED = {"studies", "version_info", "alembic_version"}  # the tables a made schema has
_SQLITE_BESIDE = ("-wal", "-shm", "-journal")  # the files SQLite keeps beside a database


def open_storage(url: str | StorageLocation | None = None, heartbeat: bool = True, wait: bool = False,
                 create: bool = True) -> RetryingStorage:
    """Open the storage at `url` (creating Optuna's schema if `create`); StorageError if impossible.

    With `wait`, a database that is down or restarting is retried with the same back-off as
    every later call: a worker started during an outage waits for it, as one already running
    does. Without it (commands a person types), the first failure is reported. Without
    `create` (read commands), nothing is created: a missing or empty SQLite file, or a
    database without Optuna's tables, is NoStudies.
    """
    where = url if isinstance(url, StorageLocation) else StorageLocation.parse(url)
    url_ = where.sqlalchemy_url()
    if where.is_sqlite:
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        # One connection per process: the heartbeat thread and the study lock borrow it
        # between the main thread's calls (README: the connection budget).
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT_S}
        if url_.get_backend_name() == "postgresql":
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
        if where.is_sqlite:
            _prepare_sqlite(where, url_, engine_kwargs, create)
        else:
            _prepare_server(where, url_, engine_kwargs, create)
        with warnings.catch_warnings():
            # Heartbeats are marked experimental; kdsweep relies on them knowingly (dead workers).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # The schema is made (above): this storage only opens it, on one connection.
            rdb = RDBStorage(url_.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                             skip_table_creation=True, skip_compatibility_check=True, **kwargs)
        try:
            _check_schema_version(rdb, where)
        except BaseException:
            rdb.engine.dispose()
            raise
        return rdb

    try:
        rdb = with_retries(connect, "connect", where)() if wait else connect()
    except StorageError:
        raise
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, sqlite3.Error) as exc:
        if errors.verdict(exc, where) in (errors.STOP, errors.SLOTS):
            raise errors.storage_error(exc, where) from None
        raise StorageError(f"cannot open storage {where.shown}: {where.hide(errors.reason(exc))}.") from None
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage {where.shown}: {where.hide(str(exc))}.") from None
    except OSError as exc:  # making a new SQLite file
        raise errors.storage_error(exc, where) from None
    if where.is_sqlite:
        serialize_sqlite(rdb.engine)
    _close_at_exit(rdb.engine)
    # get_storage adds Optuna's own cache of finished trials in front of the RDB storage.
    return RetryingStorage(optuna.storages.get_storage(rdb), rdb, where)


_OPEN: weakref.WeakSet[sqlalchemy.engine.Engine] = weakref.WeakSet()


def _close_at_exit(engine: sqlalchemy.engine.Engine) -> None:
    """Close `engine`'s connections when the process exits. Commands exit with the garbage
    collector frozen (kdsweep.cli), so an engine held in a reference cycle is never finalised
    there; closing it explicitly lets SQLite's last connection checkpoint its write-ahead log
    and remove the -wal and -shm files, and a server see its clients leave."""
    _OPEN.add(engine)


@atexit.register
def _close_all() -> None:
    for engine in list(_OPEN):
        with contextlib.suppress(Exception):  # a connection a thread still holds stays open
            engine.dispose()
    _OPEN.clear()


def study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


# ---------------------------------------------------------------- PostgreSQL


def _prepare_server(where: StorageLocation, url: sqlalchemy.engine.URL, engine_kwargs: dict[str, Any],
                    create: bool) -> None:
    """Make Optuna's schema where it is missing, one process at a time; NoStudies for a read."""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect() as conn:
            if _REQUIRED <= set(sqlalchemy.inspect(conn).get_table_names()):
                return
            if not create:
                raise NoStudies(f"{where.shown} holds no Optuna study (no Optuna tables)")
            conn.rollback()
            # Optuna's CREATE TABLEs race on an empty database (on pg_type, and its version
            # row); the first to take this lock makes the schema, the others find it made.
            # (second key 0: no study has that id, so no study lock is this one)
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:a, 0)"), {"a": LOCK_CLASS})
            if not _REQUIRED <= set(sqlalchemy.inspect(conn).get_table_names()):
                _make_schema(url, {**engine_kwargs, "max_overflow": 1})
            conn.rollback()  # ends the transaction, and the lock with it
    finally:
        engine.dispose()


def _make_schema(url: sqlalchemy.engine.URL, engine_kwargs: dict[str, Any]) -> None:
    """Optuna's own schema, made by a storage opened for that alone (its making nests one
    connection in another, so it gets a pool that allows it)."""
    maker = RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                       skip_compatibility_check=True)
    maker.engine.dispose()


def _check_schema_version(rdb: RDBStorage, where: StorageLocation) -> None:
    current, head = rdb.get_current_version(), rdb.get_head_version()
    if current != head:
        raise StorageError(
            f"the database's tables at {where.shown} have schema version {current}, and this Optuna "
            f"({optuna.__version__}) needs {head}; run `optuna storage upgrade --storage URL` (back it up "
            "first) or use the Optuna version that made it."
        )


# ---------------------------------------------------------------- SQLite


def _optuna_tables() -> set[str]:
    from optuna.storages._rdb import models

    return set(models.BaseModel.metadata.tables) | {"alembic_version"}


def _tables(path: Path, where: StorageLocation) -> set[str]:
    """The tables of an existing SQLite file, read without writing anything."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise errors.storage_error(exc, where) from None


def _prepare_sqlite(where: StorageLocation, url: sqlalchemy.engine.URL, engine_kwargs: dict[str, Any],
                    create: bool) -> None:
    """Check the SQLite file before Optuna touches it, and make it a database if it is new.

    Refused: a folder that does not exist, another application's database, a disk too full to
    hold SQLite's -wal and -shm files. Without `create` (a read), a missing or empty file, or
    one without Optuna's tables, is NoStudies: nothing is made. An empty (0-byte) file is a new
    database, as SQLite takes it.
    """
    path = where.sqlite_path
    if path is None:
        return
    size = path.stat().st_size if path.exists() else None
    if not create and not size:
        raise NoStudies(f"the SQLite file {path} "
                        f"{'does not exist' if size is None else 'is empty (0 bytes): it holds no Optuna study'}")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise StorageError(f"the folder of the SQLite file {path} does not exist; create it first.")
    free = errors.free_bytes(path)
    if create and free < errors.FREE_BYTES_FULL:
        # Even opening the file would make SQLite's -wal and -shm files, and leave them there.
        raise StorageError(f"{errors.FULL[0]} ({where.shown}: {free} bytes free); {errors.FULL[1]}.")
    tables = _tables(path, where) if size else set()
    if not create and not _REQUIRED <= tables:
        raise NoStudies(f"the SQLite file {path} holds no Optuna study")
    foreign = sorted(t for t in tables - _optuna_tables() if not t.startswith("sqlite_"))
    if foreign:
        raise StorageError(
            f"the SQLite file {path} holds tables of another application ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); kdsweep does not write into it: use another file."
        )
    if not create:
        return  # a read: WAL was set when the file was made, and nothing is written now
    if _REQUIRED <= tables:
        return
    with _making(path) as created:
        empty = path.stat().st_size == 0
        if not _REQUIRED <= (set() if empty else _tables(path, where)):
            try:
                con = sqlite3.connect(path, timeout=60)
                try:
                    # WAL lets readers (the dashboard, status) run while a worker writes.
                    con.execute("PRAGMA journal_mode=WAL")
                finally:
                    con.close()
                _make_schema(url, engine_kwargs)
            except BaseException:
                _undo(path, created, empty)
                raise


@contextlib.contextmanager
def _making(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the database file itself (created empty if missing) while
    its schema is made: concurrent first starts make it one at a time. Yields whether this
    process created the file. (SQLite locks the file with fcntl, which flock does not touch;
    no SQLite connection of this process has the new file open while this lock is held.)"""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            new = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # its maker failed and removed it: make it
                continue
            new = False
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # not a file its maker removed while this process waited for the lock
            break
        os.close(fd)
    try:
        yield new
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _undo(path: Path, created: bool, empty: bool) -> None:
    """A new database's creation failed: remove what it made. SQLite's files beside it go; the
    file goes if this process created it, and is emptied again if it was found empty."""
    if not (created or empty):
        return
    for beside in _SQLITE_BESIDE:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{beside}").unlink()
    if created:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        with contextlib.suppress(OSError):
            os.truncate(path, 0)


def serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make every SQLite transaction that may write take the write lock when it begins.

    Python's sqlite3 starts a transaction only at its first write, so a read-check-write such
    as Optuna's WAITING -> RUNNING update runs its read outside any lock: two processes can
    both see a slot WAITING and both take it. Measured here: with 8 workers on one file, two
    workers ran the same trial. BEGIN IMMEDIATE serializes those updates; a worker that finds
    the lock taken waits (busy timeout 60 s) instead of failing with "database is locked".
    Calls that only read (RetryingStorage marks them) begin deferred: under WAL they never
    take the write lock, so a polling dashboard does not hold up the workers. (SQLAlchemy's
    events on the engine Optuna made: public API, nothing of Optuna's is changed.)
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below emit BEGIN
        # WAL with synchronous=NORMAL cannot corrupt the file; it only skips an fsync per commit.
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN" if READING.active else "BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna opened the schema predate the hooks
