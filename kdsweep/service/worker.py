"""Workers: a study that finishes exactly N trials, run from any number of processes.

Exact trial counts come from Optuna's own queue: workers only ever run WAITING trials —
popping one is atomic in Optuna's RDB storage, so two workers never run the same slot and no
worker creates a trial of its own. The study records N; its empty WAITING slots (empty
params, so the sampler still chooses every value when one runs) are made a few at a time,
under a lock shared by every worker of the database (`top_up`), until the study holds N trials
that are finished, running or waiting. Making all N up front would be simpler, but Optuna's
storage cache re-reads every unfinished trial on each sampler and pruner call, so the cost of
a trial would grow with N. A trial that fails (an exception, NaN loss, out of memory) or turns
out infeasible no longer counts, so the next top-up replaces it and the study still ends with
exactly N COMPLETE + PRUNED trials. A dead worker's trial is failed by the heartbeat mechanism
and re-queued with its parameters and intermediate values; the retry resumes from the trial's
last epoch checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from kdsweep.core.progress import trial_tag
from kdsweep.core.train import polling_stop
from kdsweep.service.objective import INFEASIBLE, UID, Objective
from kdsweep.service.spec import Study, StudyError, diff_definitions

log = logging.getLogger("kdsweep.service.worker")

DEFINITION = "kdsweep.definition"  # study user attr: what defines the study (JSON)
MAX_FAILURES = "kdsweep.max_failures"  # study user attr: failed trials replaced, at most
TARGET = "kdsweep.n_trials"  # study user attr: N, the trials the study is to finish
WINDOW = 4  # empty WAITING slots made at a time: enough that workers rarely wait on the lock
POLL_S = 2.0


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward N: COMPLETE, or PRUNED by the pruner (not infeasible)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and INFEASIBLE not in trial.user_attrs


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    infeasible: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0  # trials still to start: WAITING ones, and slots of N not yet made
    unmade: int = 0  # of those, the slots not yet made (see top_up)
    requeued: int = 0  # of the failed, attempts that were re-queued (interrupt, dead worker)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def failed_for_good(self) -> int:
        """Failed attempts that used up a slot; re-queued ones (interrupts) are not failures."""
        return self.failed - self.requeued


def _genuine_failure(trial: optuna.trial.FrozenTrial) -> bool:
    """A FAIL that used up a slot: not an interruption or a dead worker (those are re-queued)."""
    return not trial.user_attrs.get("fail_reason", "interrupted").startswith("interrupted")


def counts(study: optuna.Study) -> Counts:
    c = Counts()
    failures = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            if INFEASIBLE in t.user_attrs:
                c.infeasible += 1
            else:
                c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
            genuine = _genuine_failure(t)
            failures += genuine
            c.requeued += not genuine
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    attrs = study.user_attrs
    if TARGET in attrs:
        # Failed trials beyond the study's limit are not replaced: N shrinks by that many.
        target = attrs[TARGET] - max(0, failures - attrs.get(MAX_FAILURES, 10))
        c.unmade = max(0, target - (c.finished + c.running + c.waiting))
        c.waiting += c.unmade
    return c


def add_slots(study: optuna.Study, n: int) -> None:
    """Enqueue `n` empty WAITING trials; user-enqueued points are WAITING too and count alike."""
    for _ in range(n):
        study.enqueue_trial({}, skip_if_exists=False)


def top_up(study: optuna.Study) -> int:
    """Make empty WAITING slots for the part of N not yet made, WINDOW at most; how many made.

    Under the study's lock (every worker on every host), so that between them they never make
    more than N: the count and the enqueue happen as one step.
    """
    from kdsweep.service.storage import study_lock

    with study_lock(study._storage, study._study_id):
        c = counts(study)
        n = min(c.unmade, max(0, WINDOW - (c.waiting - c.unmade)))
        add_slots(study, n)
    return n


def create_or_resume(
    study_def: Study, preset: str, storage: BaseStorage, study_name: str, n_trials: int,
    seed: int | None = None, max_failures: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Create the study (or check an existing one matches) and set it to finish `n_trials` trials.

    Running this again with the same N resumes; with a larger N the study runs more. Nothing is
    changed when the stored definition (study file, preset, overrides, kdsweep version)
    disagrees with the local one.
    """
    definition = study_def.definition(preset, overrides)
    existing = _find(storage, study_name)
    if existing is not None:
        check_definition(existing, definition, study_name)
        study = existing
    else:
        study = optuna.create_study(
            study_name=study_name, storage=storage, direction=study_def.direction,
            load_if_exists=True,
        )
        study.set_user_attr(DEFINITION, definition)
        with warnings.catch_warnings():  # experimental in Optuna; names the dashboard's axis
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([study_def.metric])
        study.set_user_attr(UID, uuid.uuid4().hex)  # tells its checkpoints from a namesake's
        study.set_user_attr("kdsweep.seed", seed)
        study.set_user_attr("description", study_def.description)
    study.set_user_attr(MAX_FAILURES, max_failures if max_failures is not None else max(3, n_trials // 5))
    # Slots are made by the workers as they need them (top_up), so points enqueued before the
    # workers start take the places of N's first trials rather than running in addition.
    study.set_user_attr(TARGET, n_trials)
    return study


def _find(storage: BaseStorage, study_name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def check_definition(study: optuna.Study, definition: dict[str, Any], study_name: str) -> None:
    stored = study.user_attrs.get(DEFINITION)
    if stored is None:
        raise StudyError(f"study {study_name!r} exists but was not created by kdsweep; use another --study-name.")
    if study.direction.name.lower() != definition["direction"]:
        raise StudyError(
            f"study {study_name!r} was created to {study.direction.name.lower()}, "
            f"but this study file wants to {definition['direction']}; use another --study-name."
        )
    diff = diff_definitions(stored, definition)
    if diff:
        raise StudyError(
            f"study {study_name!r} was created with a different definition ({diff}); "
            "run with the same study file, preset and kdsweep version, or use another --study-name."
        )


def reap_stale(study: optuna.Study) -> None:
    """Fail the trials of dead workers (heartbeat older than the grace period) and re-queue them."""
    with warnings.catch_warnings():  # experimental in Optuna; relied on knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


@contextmanager
def heartbeat(storage: BaseStorage, trial_id: int, study: optuna.Study | None = None) -> Iterator[None]:
    """Record the trial's heartbeat every few seconds while it runs (Optuna's RDB heartbeat).

    With `study`, each beat also reaps dead workers' trials, so a dead worker's trial is
    re-queued within about one grace period even while every live worker is busy with a long
    trial (otherwise that would wait until some worker finishes its trial).
    """
    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
                if study is not None:
                    reap_stale(study)
            except Exception as exc:  # a database restart; the next beat tries again
                log.warning("heartbeat for trial id %d failed: %s", trial_id, type(exc).__name__)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pop_slot(study: optuna.Study) -> int | None:
    """Atomically take one WAITING trial (RUNNING now) or None; never creates a trial."""
    storage = study._storage
    for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """Put an interrupted trial back in the queue with its parameters and intermediate values."""
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k != "fail_reason"},
        system_attrs={"failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                      "requeued_because": reason},
        intermediate_values=trial.intermediate_values,
    ))


def _ignore(signum: int, frame: Any) -> None:
    """A second SIGTERM/SIGINT while the first is being handled: nothing more to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so the running trial can be re-queued cleanly."""


@dataclass
class WorkerSummary:
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: bool = False
    trials: list[int] = field(default_factory=list)


def run_worker(
    objective: Objective, storage: BaseStorage, study_name: str, seed: int | None = None,
    worker_index: int = 0,
) -> WorkerSummary:
    """Run slots of `study_name` until none are waiting or running anywhere; SIGTERM-safe."""
    study_def, preset = objective.study, objective.preset
    study = optuna.load_study(
        study_name=study_name, storage=storage,
        sampler=study_def.sampler(None if seed is None else seed + 1000 * worker_index),
        pruner=study_def.pruner(study_def.base_config(preset, objective.overrides)),
    )
    check_definition(study, study_def.definition(preset, objective.overrides), study_name)
    summary = WorkerSummary()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in handled}
    stop = threading.Event()  # a signal came: finish or re-queue the trial, then leave
    interruptible = threading.Event()  # set while the objective runs (see _run_trial)
    objective = dataclasses.replace(objective, stop=stop)

    def on_term(signum: int, frame: Any) -> None:
        # Ctrl-C reaches launch and every worker at once, and launch then sends SIGTERM too:
        # only the first signal counts, so re-queuing the running trial is never cut short.
        # A no-op handler, not SIG_IGN: the second signal may already be pending, and CPython
        # raises "OSError: Signal 15 ignored due to race condition" (from wherever the main
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
            reap_stale(study)  # a dead worker's trial is failed and re-queued here
            trial_id = pop_slot(study)
            if trial_id is None and top_up(study):
                trial_id = pop_slot(study)
            if trial_id is None:
                c = counts(study)
                if c.running == 0 and c.waiting == 0:
                    break
                # Slots still to make (another worker took the ones just made): try again soon.
                # Otherwise others still run, and their trials may yet be re-queued.
                stop.wait(0.1 if c.waiting else POLL_S)
                continue
            summary.ran += 1
            state = _run_one(study, trial_id, objective, storage, interruptible)
            summary.trials.append(study._storage.get_trial(trial_id).number)
            if state == TrialState.COMPLETE:
                summary.complete += 1
            elif state == TrialState.PRUNED:
                summary.pruned += 1
            else:
                summary.failed += 1
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)
    return summary


def _run_one(study: optuna.Study, trial_id: int, objective: Objective, storage: BaseStorage,
             interruptible: threading.Event) -> TrialState:
    try:
        return _run_trial(study, trial_id, objective, storage, interruptible)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Its heartbeat was missed for a whole grace period (e.g. a long database outage), so
        # another worker declared it dead and re-queued it; that retry owns it now.
        log.warning("trial id %d was declared dead while running (heartbeat missed) and "
                    "re-queued; this worker drops its copy", trial_id)
        return TrialState.FAIL


def _run_trial(study: optuna.Study, trial_id: int, objective: Objective, storage: BaseStorage,
               interruptible: threading.Event) -> TrialState:
    trial = optuna.trial.Trial(study, trial_id)
    source = study._storage.get_trial(trial_id).user_attrs.get("verify.source_trial")
    label = None if source is None else f"verify run {trial.number} (sweep trial {source})"
    try:
        with heartbeat(storage, trial_id, study), trial_tag(trial.number, label):
            interruptible.set()
            try:
                if objective.stop is not None and objective.stop.is_set():
                    raise Interrupted()  # the signal came as this trial was being taken
                value = objective(trial)
            finally:
                interruptible.clear()
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        if INFEASIBLE in study._storage.get_trial(trial_id).user_attrs:
            # It does not count toward N, so the next top_up makes a fresh slot in its place.
            log.warning("trial %d is infeasible (%s); a fresh slot replaces it", trial.number, exc)
        return TrialState.PRUNED
    except KeyboardInterrupt:
        # Re-queued rather than failed for good: its checkpoint lets the next run resume it.
        trial.set_user_attr("fail_reason", "interrupted (SIGTERM/Ctrl-C); re-queued")
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study._storage.get_trial(trial_id), "interrupted")
        log.warning("trial %d interrupted and re-queued", trial.number)
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()  # let the next trial start from a clean allocator
        reason = f"{type(exc).__name__}: {exc}"[:500]
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        failures = sum(map(_genuine_failure, study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
        limit = study.user_attrs.get(MAX_FAILURES, 10)
        if failures <= limit:  # counts() then leaves N as it is, and top_up replaces the trial
            log.warning("trial %d failed (%s); a fresh slot replaces it", trial.number, reason)
        else:
            log.error("trial %d failed (%s); %d failures exceed the limit of %d, not replaced",
                      trial.number, reason, failures, limit)
        return TrialState.FAIL
    _tell(study, trial, value)
    return TrialState.COMPLETE


def _tell(study: optuna.Study, trial: optuna.Trial, value: float) -> None:
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        # Declared dead while it ran (heartbeat missed for a grace period): its retry owns it.
        raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} is no longer running")
    study.tell(trial, value)


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"
