"""What every worker does around its trials: the stop flag, signals, heartbeats, taking a slot.

The plain worker (kdsweep/service/worker.py) and the fused one (fused_worker.py) share this
loop head; each trial then goes through the one lifecycle of `kdsweep.service.objective`.

* **Stop flag** (`StopFlag`): set by the first SIGINT/SIGTERM, by `kdsweep stop` (seen by a
  heartbeat) or by the worker itself; training checks it before every batch. It takes no lock:
  a signal handler runs in the main thread between two bytecodes, possibly inside a lock the
  main thread holds (`threading.Event.set` holds its condition's lock), and a handler that
  takes that lock again waits for ever.
* **Signals** (`signals`): the handler only sets plain attributes and may raise `Interrupted`;
  it takes no lock, logs nothing and installs no handler (`signal.signal` first runs pending
  handlers, so it would re-enter). Only the first signal counts: later ones return at once, so
  re-queuing the running trial is never cut short.
* **Heartbeat** (`heartbeat`): a thread records the trial's heartbeat (Optuna's RDB heartbeat)
  every few seconds, re-queues dead workers' trials (`Sweep.reap`) and turns `kdsweep stop`
  into the stop flag. A worker whose main thread has not let go of its trial one grace period
  after a stop signal is stuck: its heartbeat stops and the process exits, so the reaper
  re-queues the trial instead of a live heartbeat holding it for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

from kdsweep.core.train import polling_stop
from kdsweep.service.sweep import Sweep

log = logging.getLogger("kdsweep.service.worker")

POLL_S = 2.0
STUCK_EXIT = 130  # the exit code of a worker that left a stuck main thread behind (a signal's)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so the running trial can be re-queued cleanly."""


class StopFlag:
    """A stop request a signal handler may set: plain attributes, no lock (see above).

    Duck-types the part of `threading.Event` that training uses (`is_set`) and that the
    worker uses (`set`, `wait`).
    """

    def __init__(self) -> None:
        self._set = False
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self.interruptible = False  # the objective runs: a signal may raise Interrupted there

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    @property
    def signalled(self) -> bool:
        return self.signalled_at is not None

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
        return self._set


@contextlib.contextmanager
def signals(flag: StopFlag) -> Iterator[None]:
    """Handle SIGINT/SIGTERM in the main thread while the block runs (see the module docstring).

    The first signal sets `flag` and, while the objective runs (`flag.interruptible`) outside
    train()'s batch loop (which checks the flag itself), raises Interrupted: a teacher may take
    minutes to build. Everywhere else the worker only does short bookkeeping and checks the
    flag next.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        if flag.signalled_at is not None:
            return  # Ctrl-C reaches launch and every worker, and launch then sends SIGTERM too
        flag.signalled_at = time.monotonic()
        flag.set()
        if flag.interruptible and not polling_stop():
            raise Interrupted()

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _grace_s() -> float:
    from kdsweep.service.storage import grace_period

    return float(grace_period())


@contextlib.contextmanager
def heartbeat(sweep: Sweep, trial_id: int, flag: StopFlag | None = None) -> Iterator[None]:
    """Record the trial's heartbeat every few seconds while the block runs (see above).

    Each beat also re-queues dead workers' trials (`Sweep.reap`), so a dead worker's trial
    comes back within about one grace period even while every live worker is busy with a long
    trial.
    """
    storage = sweep._storage
    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
    if not interval:
        yield
        return
    grace = _grace_s()
    done = threading.Event()  # never touched by a signal handler

    def beat() -> None:
        while not done.wait(interval):
            if flag is not None and flag.signalled_at is not None \
                    and time.monotonic() - flag.signalled_at > grace:
                # The main thread has not let go of its trial one grace period after a stop
                # signal: it is stuck. Beating on would keep the trial RUNNING for ever. (No
                # logging: the stuck thread may hold the logging lock.)
                os.write(2, f"kdsweep worker: stuck {grace:.0f} s after a stop signal; its trial "
                            "is left to another worker to re-queue\n".encode())
                os._exit(STUCK_EXIT)
            try:
                storage.record_heartbeat(trial_id)
                sweep.reap()
                if flag is not None and not flag.is_set() and sweep.stop_requested:
                    log.warning("`kdsweep stop %s`: re-queuing this trial and leaving", sweep.name)
                    flag.set()
            except Exception as exc:  # a database restart; the next beat tries again
                log.warning("heartbeat for trial id %d failed: %s", trial_id, type(exc).__name__)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def take_slot(sweep: Sweep, flag: StopFlag, accept: Callable[[FrozenTrial], bool] | None = None) -> int | None:
    """Re-queue dead workers' trials, then take a WAITING slot (making a few when none is left):
    its id, or None (none to take now, or the sweep is stopped)."""
    if flag.is_set() or sweep.stop_requested:
        return None
    sweep.reap()  # a dead worker's trial is re-queued here
    trial_id = sweep.pop(accept)
    if trial_id is None and sweep.top_up():
        trial_id = sweep.pop(accept)
    return trial_id


def stopped(sweep: Sweep, flag: StopFlag) -> bool:
    """Checked before taking a slot: Interrupted after a signal; True after `kdsweep stop`."""
    if flag.is_set():
        raise Interrupted()
    if sweep.stop_requested:  # `kdsweep stop`: take no new trial
        log.warning("study %r is stopped (`kdsweep stop`); this worker leaves", sweep.name)
        return True
    return False


def idle(sweep: Sweep, flag: StopFlag) -> bool:
    """When no slot was taken: True when the worker should leave (the sweep is done, or past a
    limit, which is logged in one sentence), else wait a little and return False."""
    c = sweep.counts()
    reason = sweep.stop_reason(c)
    if reason is not None:
        log.error("%s", reason)
        return True
    if c.running == 0 and c.waiting == 0:
        return True
    # Slots still to make (another worker took the ones just made): try again soon.
    # Otherwise others still run, and their trials may yet be re-queued.
    flag.wait(0.1 if c.waiting else POLL_S)
    return False
