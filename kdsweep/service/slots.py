"""Exact N: a sweep's slots, counted, made, taken, told and re-queued (`SlotQueue`).

Workers only run WAITING trials. Taking one is atomic (`requeue.take`), so no two workers run
the same slot, and no worker creates a trial of its own. Empty slots are made a few at a time
(`top_up`) under a lock every worker of the database shares, until the study holds N trials
that are finished, running or waiting. A trial that fails for good or turns out infeasible no
longer counts, so the next top-up replaces it, within the study's limits (`stop_reason`); the
study ends with exactly N COMPLETE + PRUNED trials. `Sweep` (kdsweep/service/sweep.py) is a
SlotQueue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import keys
from kdsweep.service import requeue as rq
from kdsweep.service.requeue import DIED, MAX_RETRIES, is_requeued
from kdsweep.service.spec import StudyError

log = logging.getLogger("kdsweep.service.sweep")

WINDOW = 4  # empty WAITING slots made at a time: enough that workers rarely wait on the lock
DEFAULT_N = 50  # N of a new study when none is given


def origin(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first attempt of this trial (all its retries share it)."""
    if isinstance(trial, optuna.Trial):  # Optuna 5's Trial no longer exposes system_attrs
        trial = trial.study._storage.get_trial(trial._trial_id)
    return int(trial.system_attrs.get(keys.ORIGIN, trial.number))


def failed_for_good(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and not is_requeued(trial)


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward N: COMPLETE, or PRUNED by the pruner (not infeasible)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and keys.INFEASIBLE not in trial.user_attrs


def sampler_seed(study_seed: int | None, number: int) -> int:
    """The sampler seed of trial `number`: distinct per trial, reproducible from --seed."""
    entropy = [0 if study_seed is None else int(study_seed), int(number)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    infeasible: int = 0
    failed: int = 0  # failed for good: re-queued attempts are not failures
    requeued: int = 0  # attempts put back in the queue (interrupts, dead workers)
    running: int = 0
    waiting: int = 0  # trials still to start: WAITING ones, and slots of N not yet made
    unmade: int = 0  # of those, the slots not yet made (see Sweep.top_up)
    target: int = 0  # N, less the failures beyond the study's limit

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    def as_dict(self) -> dict[str, int]:
        return {"complete": self.complete, "pruned": self.pruned, "failed": self.failed,
                "infeasible": self.infeasible, "requeued": self.requeued, "running": self.running,
                "waiting": self.waiting, "n_trials": self.target}


class SlotQueue:
    """The queue half of `Sweep` (it reads the sweep's storage, id, lock and stored attributes)."""

    def counts(self) -> Counts:
        c = Counts()
        for t in self.trials():
            if t.state == TrialState.COMPLETE:
                c.complete += 1
            elif t.state == TrialState.PRUNED:
                if keys.INFEASIBLE in t.user_attrs:
                    c.infeasible += 1
                else:
                    c.pruned += 1
            elif t.state == TrialState.FAIL:
                if is_requeued(t):
                    c.requeued += 1
                else:
                    c.failed += 1
            elif t.state == TrialState.RUNNING:
                c.running += 1
            elif t.state == TrialState.WAITING:
                c.waiting += 1
        if self.is_sibling:
            # Every run was queued by name: no slot is made, a failed one waits for the next
            # request to queue it again (kdsweep.service.siblings).
            c.target = self.n_trials or c.finished + c.running + c.waiting
        elif self.n_trials is not None:
            # Failed trials beyond the study's limit are not replaced: N shrinks by that many.
            c.target = self.n_trials - max(0, c.failed - self.max_failures)
            c.unmade = max(0, c.target - (c.finished + c.running + c.waiting))
            c.waiting += c.unmade
        return c

    def stop_reason(self, c: Counts | None = None) -> str | None:
        """Why no new trial starts (one sentence), or None while trials may start."""
        if self.is_sibling:
            return None
        c = c or self.counts()
        if c.failed > self.max_failures:
            return (f"{c.failed} trials of study {self.name!r} failed for good, more than it allows "
                    f"({self.max_failures}): no new trial starts; see their reasons with "
                    f"`kdsweep status {self.name}`.")
        if c.infeasible > self.infeasible_limit:
            return (f"{c.infeasible} trials of study {self.name!r} were infeasible (their choices "
                    f"cannot meet the budget), more than it replaces ({self.infeasible_limit}): no "
                    "new trial starts; narrow the search space or raise the budget.")
        return None

    def failure_limit_passed(self) -> bool:
        """Whether no new trial may start (see `stop_reason`)."""
        if self.is_sibling:
            return False
        done = self._storage.get_all_trials(self._id, deepcopy=False,
                                            states=(TrialState.FAIL, TrialState.PRUNED))
        failed = sum(map(failed_for_good, done))
        infeasible = sum(t.state == TrialState.PRUNED and keys.INFEASIBLE in t.user_attrs for t in done)
        return failed > self.max_failures or infeasible > self.infeasible_limit

    def _add_slots(self, n: int) -> None:
        """Enqueue `n` empty WAITING trials; user-enqueued points are WAITING too and count alike."""
        for _ in range(n):
            self.study.enqueue_trial({}, skip_if_exists=False)

    def top_up(self) -> int:
        """Make empty WAITING slots for the part of N not yet made, WINDOW at most; how many made.

        Under the study's lock (every worker on every host), so that between them they never
        make more than N: the count and the enqueue happen as one step.
        """
        with self.lock():
            c = self.counts()
            n = min(c.unmade, max(0, WINDOW - (c.waiting - c.unmade)))
            self._add_slots(n)
        return n

    def pop(self, accept: Callable[[FrozenTrial], bool] | None = None) -> int | None:
        """Atomically take one WAITING trial (RUNNING now, its first heartbeat recorded in the
        same transaction): its id, or None. Never creates one. `accept` picks which waiting
        trials may be taken (the fused worker's: those of its group's seed).

        Once more trials failed for good (or turned out infeasible) than the study allows, no
        new trial starts.
        """
        if self.failure_limit_passed():
            return None
        for t in self._storage.get_all_trials(self._id, deepcopy=False, states=(TrialState.WAITING,)):
            if accept is not None and not accept(t):
                continue
            if rq.take(self._storage, t._trial_id):
                self._numbers[t._trial_id] = t.number  # start() needs no extra read
                return t._trial_id
        return None

    def start(self, trial_id: int) -> optuna.Trial:
        """The taken trial as an optuna.Trial, its sampler seeded for this trial (recorded)."""
        number = self._numbers.pop(trial_id, None)
        if number is None:
            number = self._storage.get_trial_number_from_id(trial_id)
        seed = sampler_seed(self.seed, number)
        if self.spec is not None:
            self.study.sampler = self.spec.sampler(seed)
        trial = optuna.trial.Trial(self.study, trial_id)
        trial.set_user_attr(keys.SAMPLER_SEED, seed)
        return trial

    def frozen(self, trial_id: int) -> FrozenTrial:
        return self._storage.get_trial(trial_id)

    def is_running(self, trial_id: int) -> bool:
        return self._storage.get_trial(trial_id).state == TrialState.RUNNING

    def tell(self, trial: optuna.Trial, value: float | None = None,
             state: TrialState = TrialState.COMPLETE) -> None:
        """Finish `trial`; UpdateFinishedTrialError when it was declared dead meanwhile (a
        reaper may re-queue it at any moment, also between a check and the tell)."""
        try:
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=state)
        except ValueError:  # Optuna's "Cannot tell a FAIL trial": re-queued by a reaper
            if self.is_running(trial._trial_id):
                raise
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial {trial.number} is no longer running") from None

    def fail(self, trial_id: int, reason: str) -> None:
        """Fail a running trial for good: it counts as a failure; the next top-up replaces it.
        UpdateFinishedTrialError when it was declared dead (and re-queued) meanwhile."""
        if not rq.give_up(self._storage, trial_id, reason):
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial id {trial_id} is no longer running")

    def requeue(self, trial_id: int, reason: str) -> bool:
        """Mark a RUNNING attempt FAIL (re-queued) and put a WAITING copy in its place.

        The copy keeps the params, the values enqueued for it (`fixed_params`), its user
        attributes (a verification run keeps its seed), the pruner's rungs and the intermediate
        values; it records the first attempt's number. Both writes are one transaction (see
        kdsweep.service.requeue), under the study lock. False when the attempt was no longer
        running (another worker re-queued it first).
        """
        with self.lock():
            return rq.requeue(self._storage, self._id, trial_id, reason)

    def reap(self) -> int:
        """Re-queue the trials of dead workers (RUNNING, heartbeat older than the grace period,
        judged on the database server's clock: `storage.dead_trial_ids`); how many. A trial whose
        workers died MAX_RETRIES times fails for good. Safe against other reapers and the trial's
        own worker racing on the same trial: each step re-checks the trial in its transaction.
        """
        from kdsweep.service.storage import dead_trial_ids

        done = 0
        for trial_id in dead_trial_ids(self._storage, self._id):
            t = self._storage.get_trial(trial_id)
            if int(t.system_attrs.get(keys.RETRIES, 0)) >= MAX_RETRIES:
                if rq.give_up(self._storage, trial_id, f"worker died {MAX_RETRIES + 1} times; given up"):
                    done += 1
            elif self.requeue(trial_id, DIED):
                log.warning("trial %d: its worker died; re-queued", t.number)
                done += 1
        return done

    def _lower_n(self, n: int) -> None:
        """Lower N to `n`: allowed while no more than `n` trials have finished or run; slots
        waiting beyond it are withdrawn (FAIL, marked re-queued, so never a failure)."""
        with self.lock():
            c = self.counts()
            if c.finished + c.running > n:
                raise StudyError(
                    f"cannot lower N of study {self.name!r} to {n}: {c.finished} trials have finished "
                    f"and {c.running} are running; give -n {c.finished + c.running} or more.")
            waiting = self.trials(TrialState.WAITING)
            extra = max(0, c.finished + c.running + len(waiting) - n)
            for t in waiting[len(waiting) - extra:]:  # the last made first
                self._storage.set_trial_user_attr(t._trial_id, keys.REQUEUED, "N lowered")
                self._storage.set_trial_user_attr(t._trial_id, keys.FAIL_REASON, f"withdrawn: N lowered to {n}")
                try:
                    self._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
