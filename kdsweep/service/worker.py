"""Workers: run a sweep's trials, from any number of processes on any number of hosts.

A worker joins a stored sweep (`Sweep.join`: the study file, preset and version must match),
then loops (the loop head is `kdsweep.service.loop`'s, shared with the fused worker): re-queue
dead workers' trials, take a WAITING slot (making a few when none is left), run it through the
objective's one trial lifecycle, tell the result. The queue itself — exact N, slots,
re-queues, what counts as a failure — is `kdsweep.service.slots`'.

A running trial records a heartbeat every few seconds (Optuna's RDB heartbeat); the same
thread re-queues other workers' dead trials, so a dead worker's trial comes back within about
a grace period even while every live worker is busy with a long trial. SIGINT/SIGTERM stop
training before its next batch and re-queue the running trial; a storage outage past the
retry budget ends the worker and leaves its trial to the reaper (re-queued, not failed).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from kdsweep.core.progress import trial_tag
from kdsweep.service import keys
from kdsweep.service.loop import (  # noqa: F401  (Interrupted and POLL_S: re-exported)
    POLL_S,
    Interrupted,
    StopFlag,
    heartbeat,
    idle,
    signals,
    stopped,
    take_slot,
)
from kdsweep.service.objective import Objective
from kdsweep.service.storage import StorageError
from kdsweep.service.sweep import INTERRUPTED, Sweep

log = logging.getLogger("kdsweep.service.worker")


@dataclass
class WorkerSummary:
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # failed for good
    requeued: int = 0  # interrupted or dropped (declared dead meanwhile): re-queued, not failed
    interrupted: bool = False
    stopped: bool = False  # left because of `kdsweep stop`
    trials: list[int] = field(default_factory=list)

    def count(self, number: int, state: TrialState) -> None:
        """One trial this worker ended, in `state` (WAITING: re-queued)."""
        self.trials.append(number)
        if state == TrialState.COMPLETE:
            self.complete += 1
        elif state == TrialState.PRUNED:
            self.pruned += 1
        elif state == TrialState.WAITING:
            self.requeued += 1
        else:
            self.failed += 1


def run_worker(sweep: Sweep, objective: Objective) -> WorkerSummary:
    """Run the sweep's slots until none are waiting or running anywhere; SIGTERM-safe.

    `sweep` comes from `Sweep.join` (checked against the study file, its pruner set). Stops
    taking trials once more have failed for good than the study allows.
    """
    summary = WorkerSummary()
    flag = StopFlag()  # a signal or `kdsweep stop` came: finish or re-queue the trial, then leave
    objective = dataclasses.replace(objective, stop=flag)
    with signals(flag):
        try:
            while not stopped(sweep, flag):
                trial_id = take_slot(sweep, flag)
                if trial_id is None:
                    if idle(sweep, flag):
                        break
                    continue
                summary.ran += 1
                try:
                    state = _run_one(sweep, trial_id, objective, flag)
                except KeyboardInterrupt:  # a signal or a drain: its trial was re-queued
                    summary.requeued += 1
                    raise
                summary.count(sweep.frozen(trial_id).number, state)
            else:
                summary.stopped = True
        except KeyboardInterrupt:
            summary.interrupted = flag.signalled
            summary.stopped = not summary.interrupted  # drained by `kdsweep stop`
    return summary


def _run_one(sweep: Sweep, trial_id: int, objective: Objective, flag: StopFlag) -> TrialState:
    """Run one taken slot; its end state (WAITING: re-queued, by this worker or another)."""
    try:
        return _run_trial(sweep, trial_id, objective, flag)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Its heartbeat was missed for a whole grace period (e.g. a long database outage), so
        # another worker declared it dead and re-queued it; that retry owns it now.
        log.warning("trial id %d was declared dead while running (heartbeat missed) and "
                    "re-queued; this worker drops its copy", trial_id)
        return TrialState.WAITING


def _run_trial(sweep: Sweep, trial_id: int, objective: Objective, flag: StopFlag) -> TrialState:
    try:
        with heartbeat(sweep, trial_id, flag):
            frozen = sweep.frozen(trial_id)
            number = frozen.number
            source = frozen.user_attrs.get(keys.VERIFY_SOURCE)  # a seed-verification run
            label = None if source is None else f"verify run {number} (sweep trial {source})"
            with trial_tag(number, label):
                flag.interruptible = True
                try:
                    if flag.is_set():
                        raise Interrupted()  # the signal came as this trial was being taken
                    trial = sweep.start(trial_id)
                    value = objective(trial)
                finally:
                    flag.interruptible = False
    except optuna.TrialPruned as exc:
        sweep.tell(trial, state=TrialState.PRUNED)
        if keys.INFEASIBLE in sweep.frozen(trial_id).user_attrs:
            # It does not count toward N, so the next top_up makes a fresh slot in its place.
            log.warning("trial %d is infeasible (%s); a fresh slot replaces it", number, exc)
        return TrialState.PRUNED
    except KeyboardInterrupt:
        # Re-queued rather than failed for good: its checkpoint lets the next run resume it.
        if sweep.requeue(trial_id, INTERRUPTED):
            log.warning("trial %d interrupted and re-queued", number)
        raise
    except (optuna.exceptions.UpdateFinishedTrialError, StorageError):
        # A storage outage past the retry budget: nothing can be written now. The trial stays
        # RUNNING until its heartbeat goes stale; then any worker re-queues it (not a failure).
        raise
    except Exception as exc:
        fail(sweep, trial_id, number, exc)
        return TrialState.FAIL
    sweep.tell(trial, value)
    return TrialState.COMPLETE


def fail(sweep: Sweep, trial_id: int, number: int, exc: BaseException) -> None:
    """Fail a trial for good with its reason, and say whether a fresh slot replaces it."""
    if _is_oom(exc):
        import torch

        torch.cuda.empty_cache()  # let the next trial start from a clean allocator
    reason = f"{type(exc).__name__}: {exc}"
    sweep.fail(trial_id, reason)
    stop = sweep.stop_reason()
    if stop is None:  # counts() leaves N as it is; top_up replaces it
        log.warning("trial %d failed (%s); a fresh slot replaces it", number, reason[:500])
    else:
        log.error("trial %d failed (%s); %s", number, reason[:500], stop)


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"
