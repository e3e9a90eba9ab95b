"""Optuna storage for kdsweep: plain Optuna RDB schema, made robust for long parallel sweeps.

In layers, each a module, each using only the ones above it:

* `kdsweep.service.location`: the storage URL, parsed in one place (the password hidden in
  everything shown, the SQLite file and the folders beside it, safe study names).
* `settings`: heartbeat interval, grace period and retry budget (KDSWEEP_HEARTBEAT,
  KDSWEEP_GRACE, KDSWEEP_RETRIES).
* `errors`: what a database error means, as one table (`errors.RULES`, keyed by exception
  class, PostgreSQL SQLSTATE and SQLite result code): a lost connection, a restarting server,
  a busy or locked database or a server out of connection slots is retried; a full disk, a
  read-only or damaged database, missing privileges or tables of another schema end at once
  in a `StorageError` that names the cause and what to do.
* `retrying`: `RetryingStorage`, Optuna's storage with every call retried with bounded
  back-off (about 75 s by default), then `StorageUnavailable`.
* `locks`: `study_lock`, a lock per study shared by every process of the database, whose block
  is one transaction; `transaction`, the same transaction without the lock.
* `counts`: `complete_count`, a study's COMPLETE trials counted by the database (what a
  pruner's cache of complete trials checks before it reads them again).
* `heartbeats`: `dead_trial_ids`, the RUNNING trials of dead workers, on the database's clock.
  (Optuna's journal storage has no heartbeats, which is why kdsweep uses RDB storage only.)
* `opening`: `open_storage`, which makes Optuna's schema once (one process at a time) and
  opens it: SQLite in WAL mode with writes serialised, PostgreSQL on one connection per process.
"""

from kdsweep.service.location import (
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
from kdsweep.service.storage.counts import complete_count
from kdsweep.service.storage.errors import NoStudies, StorageUnavailable, storage_error
from kdsweep.service.storage.heartbeats import dead_trial_ids
from kdsweep.service.storage.locks import lock_files, study_lock, transaction
from kdsweep.service.storage.opening import open_storage, study_names
from kdsweep.service.storage.retrying import RetryingStorage
from kdsweep.service.storage.settings import (
    GRACE_S,
    HEARTBEAT_S,
    RETRIES,
    grace_period,
    heartbeat_interval,
    retries,
)

__all__ = [
    "ARTIFACTS_DIR", "DEFAULT_URL", "GRACE_S", "HEARTBEAT_S", "RETRIES", "RUNS_DIR", "SCHEME", "URL_HELP",
    "NoStudies", "RetryingStorage", "StorageError", "StorageLocation", "StorageURLError", "StorageUnavailable",
    "check_study_name", "complete_count", "dead_trial_ids", "lock_files", "grace_period", "heartbeat_interval", "location", "open_storage",
    "password_of", "redact", "redact_text", "retries", "storage_error", "study_lock", "study_names",
    "transaction",
]
