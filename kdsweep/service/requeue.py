"""Re-queues: what kdsweep adds to Optuna's trial lifecycle, and why Optuna's own does not serve.

Optuna's answer to dead workers is the RDB heartbeat (`RDBStorage(heartbeat_interval=...,
grace_period=...)`, `record_heartbeat`, staleness judged on the database server's clock),
`optuna.storages.fail_stale_trials` and `RetryHeartbeatStaleTrialCallback` (a FAIL, then a
WAITING copy with the params, user attributes and, optionally, intermediate values). kdsweep
uses the heartbeat as it is (its table, `record_heartbeat`, the server clock; see
`kdsweep.service.storage.dead_trial_ids`) and adds, point by point:

1. **FAIL and copy in one transaction** (`requeue`). `fail_stale_trials` commits the FAIL,
   then the callback's `study.add_trial` commits the copy: a worker killed in between leaves
   the trial failed with no copy, its parameters and finished epochs lost, its slot refilled
   by a fresh sample. Optuna's storage API commits every call on its own (each runs in its own
   `_create_scoped_session`), so no sequence of public calls is atomic;
   `kdsweep.service.storage.transaction` runs Optuna's own calls inside one database
   transaction instead.
2. **Re-queue on interrupts, drains and outages too, and a re-queue is never a failure**
   (`keys.REQUEUED`). The callback acts on stale heartbeats only, and to Optuna a FAIL is a
   failure everywhere; kdsweep re-queues on Ctrl-C, SIGTERM, `kdsweep stop` and a storage
   outage, and leaves those attempts out of its failure limit and every count.
3. **Rungs count once** (`PrunerView`). The callback copies every system attribute, the
   pruner's `completed_rung_*` included, and Optuna's successive halving and Hyperband count
   every trial that holds the key, whatever its state: the failed attempt and its retry would
   both stand in the rung. The pruner here sees the retry alone, under its first attempt's
   number (so Hyperband keeps it in its bracket), and never a re-queued attempt; that also
   mends studies whose earlier re-queues duplicated their rungs.
4. **The first heartbeat when the slot is taken** (`take`). Optuna records a trial's first
   heartbeat once `optimize` runs it; a worker killed between taking a WAITING slot and that
   first beat leaves a RUNNING trial that Optuna's stale check never finds. `take` marks the
   slot RUNNING and records its heartbeat in one transaction.
5. **Bounded retries that resume** (`retry_of`). The copy records its first attempt's number
   (`keys.ORIGIN`, Optuna's own `failed_trial` key), the dead-worker retries so far (given up
   after `MAX_RETRIES`), the values it was enqueued with (`fixed_params`) and the intermediate
   values, so the retry resumes from the trial's checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import keys
from kdsweep.service.storage import complete_count, transaction

MAX_RETRIES = 3  # a trial whose worker died this many times is given up (failed for good)
INTERRUPTED = "interrupted"  # re-queue reasons: a signal (Ctrl-C, SIGTERM, a drain) ...
DIED = "worker died (no heartbeat)"  # ... a dead worker (counts toward MAX_RETRIES) ...
OUTAGE = "storage outage"  # ... or a database that stayed away past the retry budget


def is_requeued(trial: FrozenTrial) -> bool:
    """A FAIL attempt that was put back in the queue: never a failure to kdsweep.

    Studies of kdsweep 0.1 did not mark them: there an interrupted attempt's fail_reason begins
    with "interrupted" and a dead worker's attempt (failed by Optuna's heartbeat) has none.
    """
    if trial.state != TrialState.FAIL:
        return False
    if keys.REQUEUED in trial.user_attrs:
        return True
    return str(trial.user_attrs.get(keys.FAIL_REASON, "interrupted")).startswith("interrupted")


def take(storage: BaseStorage, trial_id: int) -> bool:
    """Mark the WAITING trial RUNNING and record its first heartbeat, as one transaction; False
    when another worker took it first."""
    with transaction(storage) as db:
        try:
            if not db.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        if isinstance(db, RDBStorage) and db.heartbeat_interval:
            db.record_heartbeat(trial_id)
    return True


def retry_of(old: FrozenTrial, reason: str) -> FrozenTrial:
    """The WAITING copy that takes a re-queued attempt's place (see point 5 above)."""
    system = {k: v for k, v in old.system_attrs.items()
              if k == keys.FIXED_PARAMS or k.startswith(keys.RUNG_PREFIX)}
    system[keys.ORIGIN] = old.system_attrs.get(keys.ORIGIN, old.number)
    system[keys.REQUEUED_BECAUSE] = reason
    system[keys.RETRIES] = int(old.system_attrs.get(keys.RETRIES, 0)) + (reason == DIED)
    user = {k: v for k, v in old.user_attrs.items()
            if k not in (keys.FAIL_REASON, keys.REQUEUED, keys.SAMPLER_SEED)}
    return optuna.create_trial(
        state=TrialState.WAITING, params=old.params, distributions=old.distributions,
        user_attrs=user, system_attrs=system, intermediate_values=old.intermediate_values,
    )


def requeue(storage: BaseStorage, study_id: int, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING attempt FAIL (re-queued, `reason`) and add its WAITING copy, in one
    transaction; False when it was no longer running (another worker re-queued it first)."""
    with transaction(storage) as db:
        old = db.get_trial(trial_id)
        if old.state != TrialState.RUNNING:
            return False
        db.set_trial_user_attr(trial_id, keys.REQUEUED, reason)
        db.set_trial_user_attr(trial_id, keys.FAIL_REASON, f"{reason}; re-queued")
        try:
            db.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        db.create_new_trial(study_id, template_trial=retry_of(old, reason))
    return True


def give_up(storage: BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a RUNNING trial for good (its reason first), in one transaction; False when it was
    no longer running (another reaper got there first)."""
    with transaction(storage) as db:
        if db.get_trial(trial_id).state != TrialState.RUNNING:
            return False
        try:
            db.set_trial_user_attr(trial_id, keys.FAIL_REASON, reason[:500])
            db.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    return True


class PrunerView(BaseStorage):
    """The storage as the pruner sees it: re-queued attempts left out, retries under their first
    attempt's number (see point 3 above). Reads pass through; so do the pruner's own writes
    (successive halving records a trial's rung values)."""

    def __init__(self, inner: BaseStorage) -> None:
        self._inner = inner

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        out = []
        for t in self._inner.get_all_trials(study_id, deepcopy=False, states=states):
            if is_requeued(t):
                continue
            first = t.system_attrs.get(keys.ORIGIN)
            if first is not None and int(first) != t.number or deepcopy:
                t = copy.deepcopy(t) if deepcopy else copy.copy(t)
                if first is not None:
                    t.number = int(first)
            out.append(t)
        return out

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._inner.get_trial(trial_id)

    def complete_count(self, study_id: int) -> int | None:
        """The storage's count (`storage.complete_count`): a re-queued attempt is FAIL, never
        COMPLETE, so this view holds the same complete trials."""
        return complete_count(self._inner, study_id)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._inner.get_all_studies()

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._inner.set_trial_system_attr(trial_id, key, value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._inner.set_trial_user_attr(trial_id, key, value)

    # A pruner never creates, deletes or finishes anything: those stay with the real storage.
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def delete_study(self, study_id: int) -> None:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        raise NotImplementedError("the pruner's view of a study is read-only")

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        raise NotImplementedError("the pruner's view of a study is read-only")


class AsOrigin(optuna.pruners.BasePruner):
    """The study's pruner, judging on the `PrunerView`: a retry as its first attempt (same
    trial number, so Hyperband judges it in its first attempt's bracket), and rung populations
    without re-queued attempts."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner
        self._views: dict[tuple[int, str], optuna.Study] = {}

    def view(self, study: optuna.Study) -> optuna.Study:
        key = (id(study._storage), study.study_name)
        if key not in self._views:
            self._views[key] = optuna.Study(study_name=study.study_name, storage=PrunerView(study._storage),
                                            sampler=study.sampler, pruner=self.inner)
        return self._views[key]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        first = trial.system_attrs.get(keys.ORIGIN)
        if first is not None and first != trial.number:
            trial = copy.copy(trial)
            trial.number = int(first)
        return self.inner.prune(self.view(study), trial)
