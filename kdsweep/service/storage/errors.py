"""What a database error means, as one table: retried, passed on, or one sentence at once.

`RULES` is read top to bottom; the first rule that matches any error of the chain (the error,
what it was raised from, the driver's error SQLAlchemy wraps) decides, and nothing below it
changes that. A rule matches on what the drivers give: the exception's class, PostgreSQL's
SQLSTATE (psycopg's `sqlstate`, a code or a two-character class), SQLite's primary result
code (`sqlite_errorcode & 0xFF`), and, for a SQLite file, whether its folder is full or
mounted read-only. A message pattern is used only where the driver gives no code: SQLite's
generic SQLITE_ERROR, and psycopg's connection failures (a server that refuses a connection
answers before any SQLSTATE reaches the client).
"""

from __future__ import annotations

import errno as errnos
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import sqlalchemy.exc

from kdsweep.service.location import StorageError, StorageLocation


class NoStudies(StorageError):
    """A read-only open found no Optuna tables (or no SQLite file): the storage holds no study."""


class StorageUnavailable(StorageError):
    """The storage stayed unreachable (down, restarting, locked, out of connection slots) for
    the whole retry budget. Nothing is wrong with the data: a worker's running trial should
    be re-queued, not failed, and the command run again once the database is back."""


# What a rule decides.
PASS = "pass"  # not the storage's business (an IntegrityError Optuna expects, a bug): raised as it is
RETRY = "retry"  # away, restarting or busy for a while: retried, then StorageUnavailable
SLOTS = "slots"  # the server has no free connection slot: retried, then StorageUnavailable saying so
STOP = "stop"  # it answered and said no: a StorageError naming the cause at once, never retried

NONE = ""  # as a rule's SQLSTATE: the error carries none (psycopg's connection failures)
FREE_BYTES_FULL = 1 << 16  # a SQLite folder with less free space than this counts as full


@dataclass(frozen=True)
class Rule:
    verdict: str
    error: type[BaseException] | tuple[type[BaseException], ...] = BaseException
    sqlstate: tuple[str, ...] = ()  # SQLSTATE codes, two-character classes ("08"), or NONE
    sqlite: tuple[int, ...] = ()  # SQLite primary result codes
    errno: tuple[int, ...] = ()  # an OSError's errno (kdsweep's own file operations)
    message: str = ""  # a regex on the error's text, where the driver gives no code
    disk: str = ""  # "full" or "read-only": the SQLite file's folder is so
    invalidated: bool = False  # SQLAlchemy invalidated the connection (a disconnect)
    what: str = ""  # STOP: the cause, in words
    todo: str = ""  # STOP: what to do

    def matches(self, exc: BaseException, where: StorageLocation | None) -> bool:
        if not isinstance(exc, self.error):
            return False
        if self.sqlstate:
            state = getattr(exc, "sqlstate", None) or ""
            if not any(state == s or (len(s) == 2 and state[:2] == s) for s in self.sqlstate):
                return False
        if self.sqlite and (getattr(exc, "sqlite_errorcode", -1) & 0xFF) not in self.sqlite:
            return False
        if self.errno and getattr(exc, "errno", None) not in self.errno:
            return False
        if self.message and not re.search(self.message, str(exc), re.IGNORECASE):
            return False
        if self.invalidated and not getattr(exc, "connection_invalidated", False):
            return False
        return not self.disk or _disk_is(self.disk, where)


_DRIVER = (sqlite3.Error, psycopg.Error)
_PG_CONNECTION = (psycopg.OperationalError, psycopg.InterfaceError)
_READ_ONLY = ("the database is read-only", "give this user write access to it (for SQLite: to the file and its "
              "folder), then run the command again")
_FULL = ("the disk holding the database is full", "free space there, then run the command again")
_FOREIGN = ("the database's tables do not match this Optuna version",
            "use the kdsweep and Optuna versions that wrote it, or another database")
_PRIVILEGES = ("this user may not use the database's tables or files",
               "grant it access (PostgreSQL: GRANT ALL ON ALL TABLES IN SCHEMA public, and on its sequences; "
               "SQLite: the file and its folder), then run the command again")
_REFUSED = ("the server refused the connection", "check the URL's user, password and database name")
_DAMAGED = ("the database file is damaged or not a SQLite database", "restore it from a backup or use another file")

RULES: tuple[Rule, ...] = (
    # Optuna and kdsweep expect these (a study name taken, a row written twice by a race).
    Rule(PASS, error=(sqlalchemy.exc.IntegrityError, sqlite3.IntegrityError, psycopg.IntegrityError)),
    # The file system under a SQLite file says what its error codes cannot: SQLite reports a
    # shared-memory file that cannot grow as "disk I/O error", and a read-only mount variously.
    Rule(STOP, sqlite3.Error, sqlite=(8, 10, 14), disk="read-only", what=_READ_ONLY[0], todo=_READ_ONLY[1]),
    Rule(STOP, sqlite3.Error, sqlite=(10, 13), disk="full", what=_FULL[0], todo=_FULL[1]),
    Rule(STOP, OSError, errno=(errnos.EROFS,), what=_READ_ONLY[0], todo=_READ_ONLY[1]),
    Rule(STOP, OSError, errno=(errnos.ENOSPC, errnos.EDQUOT), what=_FULL[0], todo=_FULL[1]),
    Rule(STOP, OSError, errno=(errnos.EACCES, errnos.EPERM), what=_PRIVILEGES[0], todo=_PRIVILEGES[1]),
    # Permanent: the server or file answered, and the answer will not change by itself.
    Rule(STOP, sqlite3.Error, sqlite=(1,), message=r"no such table: version_info",
         what="the database holds no Optuna studies", todo="pass the --storage the study was launched with"),
    Rule(STOP, psycopg.Error, sqlstate=("42P01",), message=r'"version_info"',
         what="the database holds no Optuna studies", todo="pass the --storage the study was launched with"),
    Rule(STOP, sqlite3.Error, sqlite=(13,), what=_FULL[0], todo=_FULL[1]),  # SQLITE_FULL
    Rule(STOP, psycopg.Error, sqlstate=("53100",), what=_FULL[0], todo=_FULL[1]),  # disk_full
    Rule(STOP, sqlite3.Error, sqlite=(10,),  # SQLITE_IOERR
         what="the disk holding the database failed a read or write", todo="check that disk (is it full, or failing?)"),
    Rule(STOP, psycopg.Error, sqlstate=("58030",),  # io_error
         what="the disk holding the database failed a read or write", todo="check that disk (is it full, or failing?)"),
    Rule(STOP, sqlite3.Error, sqlite=(8,), what=_READ_ONLY[0], todo=_READ_ONLY[1]),  # SQLITE_READONLY
    Rule(STOP, psycopg.Error, sqlstate=("25006",), what=_READ_ONLY[0], todo=_READ_ONLY[1]),  # read_only_sql_transaction
    Rule(STOP, sqlite3.Error, sqlite=(11, 26), what=_DAMAGED[0], todo=_DAMAGED[1]),  # SQLITE_CORRUPT, _NOTADB
    Rule(STOP, psycopg.Error, sqlstate=("XX001", "XX002"), what="the server's data files are damaged",
         todo="restore the database from a backup"),
    Rule(STOP, sqlite3.Error, sqlite=(3, 14, 23), what=_PRIVILEGES[0], todo=_PRIVILEGES[1]),  # PERM, CANTOPEN, AUTH
    Rule(STOP, psycopg.Error, sqlstate=("42501",), what=_PRIVILEGES[0], todo=_PRIVILEGES[1]),  # insufficient_privilege
    Rule(STOP, sqlite3.Error, sqlite=(1,), message=r"no such (table|column)", what=_FOREIGN[0], todo=_FOREIGN[1]),
    Rule(STOP, psycopg.Error, sqlstate=("42P01", "42703"), what=_FOREIGN[0], todo=_FOREIGN[1]),
    Rule(STOP, psycopg.Error, sqlstate=("28", "3D000"), what=_REFUSED[0], todo=_REFUSED[1]),
    Rule(STOP, _PG_CONNECTION, message=r"password authentication failed|no pg_hba\.conf entry|no password supplied"
         r'|(role|database) "[^"]*" does not exist', what=_REFUSED[0], todo=_REFUSED[1]),
    # Busy for a while: every connection slot taken (too_many_connections).
    Rule(SLOTS, psycopg.Error, sqlstate=("53300",)),
    Rule(SLOTS, _PG_CONNECTION, message=r"too many clients|remaining connection slots are reserved"),
    # Transient: away, restarting, busy or locked.
    Rule(RETRY, sqlite3.Error, sqlite=(5, 6)),  # SQLITE_BUSY, SQLITE_LOCKED
    # connection_exception (PgBouncer's errors too), serialization_failure, deadlock_detected,
    # lock_not_available, admin/crash shutdown, cannot_connect_now (starting up), and a
    # transaction ended by idle_in_transaction_session_timeout (a stopped lock holder).
    Rule(RETRY, psycopg.Error, sqlstate=("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "25P03")),
    Rule(RETRY, _PG_CONNECTION, sqlstate=(NONE,)),  # a lost or refused connection carries no SQLSTATE
    Rule(RETRY, sqlalchemy.exc.DBAPIError, invalidated=True),
    Rule(RETRY, (sqlalchemy.exc.TimeoutError, ConnectionError, TimeoutError)),  # the pool's wait, a socket's
    # Any other database error: named at once, never retried.
    Rule(STOP, (*_DRIVER, sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)),
)


def chain(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what it was raised from (explicitly, or the driver's error SQLAlchemy wraps).

    Not `__context__`: an error raised while another was being handled (a rollback that fails
    because the disk is full) says nothing about whether the first one is worth a retry.
    """
    out: list[BaseException] = []
    while exc is not None and len(out) < 8 and exc not in out:
        out.append(exc)
        orig = getattr(exc, "orig", None)
        exc = orig if isinstance(orig, BaseException) else exc.__cause__
    return out


def rule_for(exc: BaseException, where: StorageLocation | None = None) -> Rule | None:
    """The first rule of RULES that matches an error of `exc`'s chain, or None (not a storage error)."""
    errors = chain(exc)
    return next((r for r in RULES if any(r.matches(e, where) for e in errors)), None)


def verdict(exc: BaseException, where: StorageLocation | None = None) -> str:
    rule = rule_for(exc, where)
    return rule.verdict if rule is not None else PASS


def transient(exc: BaseException, where: StorageLocation | None = None) -> bool:
    """Whether `exc` is worth a retry: a lost connection, a restarting server, a busy database."""
    return verdict(exc, where) in (RETRY, SLOTS)


def cause_name(exc: BaseException) -> str:
    return type(chain(exc)[-1]).__name__


def reason(exc: BaseException) -> str:
    """The driver's first line, as it said it."""
    root = chain(exc)[-1]
    return (str(root).strip().splitlines() or [type(root).__name__])[0]


def storage_error(exc: BaseException, where: StorageLocation, retried: bool = False) -> StorageError:
    """One sentence for a storage failure: its cause in words, the driver's own, what to do."""
    rule = rule_for(exc, where)
    said = where.hide(reason(exc))
    if rule is not None and rule.disk == "read-only":
        said += ", on a file system mounted read-only"
    elif rule is not None and rule.disk == "full":
        said += f", {_free_bytes(where.sqlite_path)} bytes free"
    if rule is not None and rule.verdict == SLOTS:
        return StorageUnavailable(
            f"the PostgreSQL server at {where.shown} has no free connection slots"
            f"{' after every retry' if retried else ''} ({said}); raise its max_connections, run fewer "
            "workers, or put PgBouncer in front of it (README: PostgreSQL and many hosts)."
        )
    if rule is not None and rule.what:
        return StorageError(f"{rule.what} ({where.shown}: {said}); {rule.todo}.")
    return StorageError(f"storage {where.shown} failed: {cause_name(exc)}: {said}.")


def _disk_is(state: str, where: StorageLocation | None) -> bool:
    path = where.sqlite_path if where is not None else None
    if path is None:
        return False
    if state == "full":
        return _free_bytes(path) < FREE_BYTES_FULL
    try:
        return bool(os.statvfs(path.expanduser().resolve().parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _free_bytes(path: Path | None) -> int:
    try:
        st = os.statvfs(Path(path).expanduser().resolve().parent)  # type: ignore[arg-type]
        return st.f_bavail * st.f_frsize
    except (OSError, TypeError):
        return 1 << 62
