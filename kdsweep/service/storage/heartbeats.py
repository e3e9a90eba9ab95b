"""`dead_trial_ids`: the RUNNING trials whose workers are dead, judged on the database's clock."""

from __future__ import annotations

from datetime import timedelta

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models

from kdsweep.service.storage.locks import rdb_of
from kdsweep.service.storage.retrying import RetryingStorage, with_retries


def dead_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """RUNNING trials of `study_id` whose workers are dead, by the database's own clock.

    Dead: its heartbeat is older than the grace period. Every time here is the database's
    (`CURRENT_TIMESTAMP`: the PostgreSQL server's clock, or SQLite's), never a worker's:
    a trial's start is stamped by the worker that takes it, with its own clock and time zone,
    so it is never compared. A RUNNING trial with no heartbeat row yet (a worker killed
    between taking its slot and its first heartbeat, or a trial of a plain Optuna client;
    Optuna's own stale check skips those, so they would run for ever) is given one here,
    stamped now by the database: it is dead once a grace period passes with no beat of its
    own. So this writes (only those stamps); workers call it, read commands never do.
    Empty for storages without heartbeats. Retried like every storage call.
    """
    rdb = rdb_of(storage)
    if rdb is None or rdb.heartbeat_interval is None:
        return []
    where = storage.location if isinstance(storage, RetryingStorage) else None
    return with_retries(_dead_trial_ids, "reap", where)(rdb, study_id)


def _dead_trial_ids(rdb: RDBStorage, study_id: int) -> list[int]:
    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    running = sqlalchemy.and_(trials.c.study_id == study_id,
                              trials.c.state == optuna.trial.TrialState.RUNNING)
    session = rdb.scoped_session()
    try:
        silent = (sqlalchemy.select(trials.c.trial_id, sqlalchemy.func.current_timestamp())
                  .where(running)
                  .where(~sqlalchemy.exists().where(beats.c.trial_id == trials.c.trial_id)))
        insert = _insert(session, beats).from_select(["trial_id", "heartbeat"], silent)
        session.execute(insert.on_conflict_do_nothing())
        now = session.execute(sqlalchemy.select(sqlalchemy.func.current_timestamp())).scalar_one()
        rows = session.execute(sqlalchemy.select(trials.c.trial_id, beats.c.heartbeat)
                               .join(beats, beats.c.trial_id == trials.c.trial_id)
                               .where(running).order_by(trials.c.trial_id)).all()
        session.commit()
    finally:
        session.close()
    # As Optuna compares them: PostgreSQL answers in its session's time zone and stores the
    # beats as that zone's wall time, without one.
    now = now.replace(tzinfo=None)
    return [trial_id for trial_id, beat in rows if now - beat > grace]


def _insert(session: sqlalchemy.orm.Session, table: sqlalchemy.Table) -> sqlalchemy.sql.Insert:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)
