"""`complete_count`: how many trials of a study are COMPLETE, counted by the database."""

from __future__ import annotations

import functools

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models

from kdsweep.service.storage.locks import rdb_of
from kdsweep.service.storage.retrying import READING, RetryingStorage, with_retries


def complete_count(storage: BaseStorage, study_id: int) -> int | None:
    """The number of COMPLETE trials of `study_id`: one SQL count, no trial loaded.

    For a pruner that keeps what it derived from a study's complete trials: COMPLETE is final
    and trials are never deleted, so an unchanged count means the same complete trials.
    `study.get_trials` cannot say that cheaply: Optuna's cached RDB storage loads every
    unfinished trial again (its parameters, values and attributes: several queries) and sorts
    all trials on each call. None where the storage is no RDB (in memory: get_trials is cheap
    there). Read-only (SQLite begins it deferred) and retried like every storage call.
    """
    own = getattr(storage, "complete_count", None)
    if callable(own):  # a view of a storage that answers for itself (requeue.PrunerView)
        return own(study_id)
    rdb = rdb_of(storage)
    if rdb is None:  # a plain Optuna study on an RDB URL holds it in its cached storage
        backend = getattr(storage, "_backend", None)
        rdb = backend if isinstance(backend, RDBStorage) else None
    if rdb is None:
        return None
    where = storage.location if isinstance(storage, RetryingStorage) else None
    outer = READING.active
    READING.active = True
    try:
        return with_retries(_complete_count, "count complete trials", where)(rdb, study_id)
    finally:
        READING.active = outer


@functools.cache
def _statement() -> sqlalchemy.Select:
    # Built once: SQLAlchemy then finds it compiled in its cache (a fresh one costs about as
    # much as the query).
    trials = models.TrialModel.__table__
    return (sqlalchemy.select(sqlalchemy.func.count()).select_from(trials)
            .where(trials.c.study_id == sqlalchemy.bindparam("study_id"),
                   trials.c.state == optuna.trial.TrialState.COMPLETE))


def _complete_count(rdb: RDBStorage, study_id: int) -> int:
    with rdb.engine.connect() as connection:  # no ORM session: one pooled connection, one query
        return int(connection.execute(_statement(), {"study_id": study_id}).scalar_one())
