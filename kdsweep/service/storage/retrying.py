"""Every storage call retried on transient errors: `RetryingStorage`, an explicit wrapper.

Like Optuna's own `_CachedStorage` (which it wraps), it spells out each method of
`BaseStorage` and `BaseHeartbeat` it forwards. Reads are marked, so that on SQLite they begin
a deferred transaction and never take the write lock (see `opening.serialize_sqlite`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service.location import StorageError, StorageLocation
from kdsweep.service.storage import errors
from kdsweep.service.storage.errors import StorageUnavailable
from kdsweep.service.storage.settings import retries

log = logging.getLogger("kdsweep.service.storage")

T = TypeVar("T")


class _Flag(threading.local):
    active = False


READING = _Flag()  # set while a read-only storage call runs: SQLite begins it deferred
IN_LOCK = _Flag()  # set while this thread's storage calls run inside study_lock's transaction


def with_retries(method: Callable[..., T], name: str, where: StorageLocation | None = None) -> Callable[..., T]:
    """`method`, retried with bounded back-off on transient errors (errors.RULES).

    Past the budget: StorageUnavailable. A permanent database error: one StorageError at once
    (when `where` is known to name it). Anything else is raised as it is.
    """

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> T:
        delay = 0.25
        budget = retries()
        for attempt in range(budget + 1):
            try:
                return method(*args, **kwargs)
            except StorageError:
                raise
            except Exception as exc:
                verdict = errors.verdict(exc, where)
                if verdict == errors.PASS:
                    raise
                if verdict == errors.STOP:
                    if where is None:
                        raise
                    raise errors.storage_error(exc, where) from None
                if IN_LOCK.active:
                    raise  # inside the study lock the whole transaction is lost: see study_lock
                if attempt == budget:
                    if verdict == errors.SLOTS and where is not None:
                        raise errors.storage_error(exc, where, retried=True) from exc
                    raise StorageUnavailable(
                        f"the storage did not answer {name} after {budget} retries over about "
                        f"{sum(min(0.25 * 2 ** i, 10.0) for i in range(budget)):.0f} s "
                        f"({errors.cause_name(exc)}); check the database, then run the worker again."
                    ) from exc
                log.warning("storage call %s failed (%s); retry %d/%d in %.1fs", name,
                            errors.cause_name(exc), attempt + 1, budget, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    return call


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Forwards every storage call to `inner` (Optuna's cached RDB storage), retried on
    transient errors.

    Safe to retry: PostgreSQL and SQLite commit atomically, so a call that failed on a lost
    connection either did not happen or (in the rare case the commit landed and only the
    reply was lost) is an idempotent state update. Permanent errors become one StorageError.
    `rdb` is the RDBStorage underneath (study_lock and dead_trial_ids use its engine).
    """

    def __init__(self, inner: BaseStorage, rdb: RDBStorage, where: StorageLocation | None = None) -> None:
        self._inner = inner
        self.rdb = rdb
        self._where = where

    @property
    def location(self) -> StorageLocation | None:
        return self._where

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return with_retries(getattr(self._inner, name), name, self._where)(*args, **kwargs)

    def _read(self, name: str, *args: Any, **kwargs: Any) -> Any:
        outer = READING.active
        READING.active = True
        try:
            return self._write(name, *args, **kwargs)
        finally:
            READING.active = outer

    # ---------------------------------------------------------------- studies

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._write("create_new_study", directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._write("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._read("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._read("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._read("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._read("get_all_studies")

    # ---------------------------------------------------------------- trials

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._write("create_new_trial", study_id, template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: optuna.distributions.BaseDistribution) -> None:
        self._write("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._read("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._read("get_trial_number_from_id", trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._read("get_trial_param", trial_id, param_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._write("set_trial_state_values", trial_id, state=state, values=values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._read("get_trial", trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._read("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._read("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._read("get_best_trial", study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._read("get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("get_trial_system_attrs", trial_id)

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self._inner.check_trial_is_updatable(trial_id, trial_state)

    def remove_session(self) -> None:
        self._inner.remove_session()

    # ---------------------------------------------------------------- heartbeats

    def record_heartbeat(self, trial_id: int) -> None:
        self._write("record_heartbeat", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # Optuna's fail_stale_trials calls it
        return self._read("_get_stale_trial_ids", study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._inner.get_heartbeat_interval()  # type: ignore[attr-defined]

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._inner.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- pickling (spawned processes)

    def __getstate__(self) -> dict[str, Any]:
        return {"_inner": self._inner, "rdb": self.rdb, "_where": self._where}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
