"""Workers: run a sweep's trials, from any number of processes on any number of hosts.

A worker joins a stored sweep (`Sweep.join`: the study file, preset and version must match),
then loops: re-queue dead workers' trials, take a WAITING slot (making a few when none is
left), run it through the objective, tell the result. The queue itself — exact N, slots,
re-queues, what counts as a failure — is `kdsweep.service.sweep.Sweep`'s.

A running trial records a heartbeat every few seconds (Optuna's RDB heartbeat); the same
thread re-queues other workers' dead trials, so a dead worker's trial comes back within about
a grace period even while every live worker is busy with a long trial. SIGINT/SIGTERM stop
training before its next batch and re-queue the running trial; a storage outage past the
retry budget ends the worker and leaves its trial to the reaper (re-queued, not failed).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsweep.core.progress import trial_tag
from kdsweep.core.train import polling_stop
from kdsweep.service import keys
from kdsweep.service.objective import Objective
from kdsweep.service.storage import StorageError
from kdsweep.service.sweep import INTERRUPTED, Sweep

log = logging.getLogger("kdsweep.service.worker")

POLL_S = 2.0


def _ignore(signum: int, frame: Any) -> None:
    """A second SIGTERM/SIGINT while the first is being handled: nothing more to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so the running trial can be re-queued cleanly."""


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


def run_worker(sweep: Sweep, objective: Objective) -> WorkerSummary:
    """Run the sweep's slots until none are waiting or running anywhere; SIGTERM-safe.

    `sweep` comes from `Sweep.join` (checked against the study file, its pruner set). Stops
    taking trials once more have failed for good than the study allows.
    """
    summary = WorkerSummary()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in handled}
    stop = threading.Event()  # a signal came: finish or re-queue the trial, then leave
    interruptible = threading.Event()  # set while the objective runs (see _run_trial)
    objective = dataclasses.replace(objective, stop=stop)
    sweep.stop_event = stop  # `kdsweep stop`: the heartbeat sets it (see Sweep.heartbeat)

    signalled = threading.Event()  # a signal, not `kdsweep stop`, set `stop`

    def on_term(signum: int, frame: Any) -> None:
        signalled.set()
        # Ctrl-C reaches launch and every worker at once, and launch then sends SIGTERM too:
        # only the first signal counts, so re-queuing the running trial is never cut short.
        # A no-op handler, not SIG_IGN: the second signal may already be pending, and CPython
        # reports "OSError: Signal 15 ignored due to race condition" (from wherever the main
        # thread is, e.g. inside autograd) for a pending signal whose handler became SIG_IGN.
        for s in handled:
            signal.signal(s, _ignore)
        stop.set()
        # An exception raised here lands wherever the main thread happens to be. Inside the
        # objective that is safe (the trial is re-queued) and needed (a teacher may take
        # minutes to build), except in train()'s loop, which checks `stop` before every batch
        # (an exception there could land in a library's cleanup). Everywhere else the worker
        # only does short bookkeeping (taking a slot, telling a result) and checks `stop` next.
        if interruptible.is_set() and not polling_stop():
            raise Interrupted()

    if threading.current_thread() is threading.main_thread():
        for s in handled:
            signal.signal(s, on_term)
    try:
        while True:
            if stop.is_set():
                raise Interrupted()
            if sweep.stop_requested:  # `kdsweep stop`: take no new trial
                log.warning("study %r is stopped (`kdsweep stop`); this worker leaves", sweep.name)
                summary.stopped = True
                break
            sweep.reap()  # a dead worker's trial is re-queued here
            trial_id = sweep.pop()
            if trial_id is None and sweep.top_up():
                trial_id = sweep.pop()
            if trial_id is None:
                c = sweep.counts()
                if c.failed > sweep.max_failures:
                    log.error("%d trials failed for good, more than the study allows (%d): "
                              "no new trial starts; see `kdsweep status %s`",
                              c.failed, sweep.max_failures, sweep.name)
                    break
                if c.running == 0 and c.waiting == 0:
                    break
                # Slots still to make (another worker took the ones just made): try again soon.
                # Otherwise others still run, and their trials may yet be re-queued.
                stop.wait(0.1 if c.waiting else POLL_S)
                continue
            summary.ran += 1
            state = _run_one(sweep, trial_id, objective, interruptible)
            summary.trials.append(sweep.frozen(trial_id).number)
            if state == TrialState.COMPLETE:
                summary.complete += 1
            elif state == TrialState.PRUNED:
                summary.pruned += 1
            elif state == TrialState.WAITING:
                summary.requeued += 1
            else:
                summary.failed += 1
    except KeyboardInterrupt:
        summary.interrupted = signalled.is_set()
        summary.stopped = not summary.interrupted  # drained by `kdsweep stop`
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)
    return summary


def _run_one(sweep: Sweep, trial_id: int, objective: Objective,
             interruptible: threading.Event) -> TrialState:
    """Run one taken slot; its end state (WAITING: re-queued, by this worker or another)."""
    try:
        return _run_trial(sweep, trial_id, objective, interruptible)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Its heartbeat was missed for a whole grace period (e.g. a long database outage), so
        # another worker declared it dead and re-queued it; that retry owns it now.
        log.warning("trial id %d was declared dead while running (heartbeat missed) and "
                    "re-queued; this worker drops its copy", trial_id)
        return TrialState.WAITING


def _run_trial(sweep: Sweep, trial_id: int, objective: Objective,
               interruptible: threading.Event) -> TrialState:
    try:
        with sweep.heartbeat(trial_id):
            frozen = sweep.frozen(trial_id)
            number = frozen.number
            source = frozen.user_attrs.get(keys.VERIFY_SOURCE)  # a seed-verification run
            label = None if source is None else f"verify run {number} (sweep trial {source})"
            with trial_tag(number, label):
                interruptible.set()
                try:
                    if objective.stop is not None and objective.stop.is_set():
                        raise Interrupted()  # the signal came as this trial was being taken
                    trial = sweep.start(trial_id)
                    value = objective(trial)
                finally:
                    interruptible.clear()
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
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()  # let the next trial start from a clean allocator
        reason = f"{type(exc).__name__}: {exc}"
        sweep.fail(trial_id, reason)
        c = sweep.counts()
        if c.failed <= sweep.max_failures:  # counts() leaves N as it is; top_up replaces it
            log.warning("trial %d failed (%s); a fresh slot replaces it", number, reason[:500])
        else:
            log.error("trial %d failed (%s); %d failures exceed the limit of %d: no new trial "
                      "starts", number, reason[:500], c.failed, sweep.max_failures)
        return TrialState.FAIL
    sweep.tell(trial, value)
    return TrialState.COMPLETE


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"
