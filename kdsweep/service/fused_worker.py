"""`kdsweep worker --fuse K`: a worker that trains up to K trials at once as one fused model.

The same sweep as `run_worker` (kdsweep/service/worker.py) — the same `Sweep` slots (`pop`,
`top_up`), heartbeats, re-queues, failure limit and `kdsweep stop` — but the trials' students
train together in a `kdsweep.core.fused.FusedGroup`: one data batch, one teacher-logit gather
and one fused forward/backward per step for all K. Each trial keeps its own Optuna trial
(`Sweep.start`: its own per-trial sampler seed), its validation accuracy is reported to it
after each of its epochs, the pruner decides for it alone, and a pruned or finished trial's
slot goes to the next waiting one at once.

Each running member has its own heartbeat, so a killed fused worker's K trials are all
re-queued by the heartbeat reaper, as one trial of a plain worker is; on SIGTERM/Ctrl-C (or
`kdsweep stop`) the worker re-queues all of them itself. A storage outage past the retry
budget ends the worker without telling anything: the reaper re-queues its trials later (never
a failure). Fused trials write no epoch checkpoints: a re-queued one trains again from its
first epoch (its reported values are kept).

Only studies whose trials differ in nothing but `kd.alpha`, `kd.temperature` and the seed can
be fused (Q2); `check_fusable` says so in one sentence for any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

import kdsweep
from kdsweep.core.config import replace, to_dict
from kdsweep.core.devices import resolve_device
from kdsweep.core.fused import PER_MEMBER, FusedGroup, Member
from kdsweep.core.teacher import prepare as prepare_teacher
from kdsweep.core.train import polling_stop, resolve
from kdsweep.service import keys
from kdsweep.service import space as sp
from kdsweep.service.objective import Objective, count_params
from kdsweep.service.spec import StudyError, StudySpec
from kdsweep.service.storage import StorageError
from kdsweep.service.sweep import INTERRUPTED, Sweep
from kdsweep.service.worker import POLL_S, Interrupted, WorkerSummary, _ignore, _is_oom

log = logging.getLogger("kdsweep.service.fused_worker")


def check_fusable(spec: StudySpec, preset: str, overrides: Mapping[str, Any]) -> None:
    """Raise StudyError unless every trial of the study trains the same student (Q2-like)."""
    base = spec.base_config(preset, overrides)
    if base.kd is None:
        raise StudyError(f"--fuse trains distillation students together; study {spec.name!r} "
                         f"(preset {preset}) has no kd settings, so run it without --fuse.")
    others = [p.name for p in spec.space_for(preset, overrides) if p.path not in PER_MEMBER]
    if others:
        raise StudyError(f"--fuse needs trials that differ only in {', '.join(PER_MEMBER)}; study "
                         f"{spec.name!r} also samples {', '.join(others)}, so run it without --fuse.")
    if base.model.trainable != "all":
        raise StudyError("--fuse trains whole students; model.trainable must be 'all'.")


@dataclasses.dataclass
class _Running:
    trial: optuna.Trial
    beats: contextlib.ExitStack  # the trial's heartbeat, closed when it leaves the group
    start: float
    writer: Any = None


def run_fused_worker(sweep: Sweep, objective: Objective, fuse: int) -> WorkerSummary:
    """Run the sweep's slots, `fuse` at a time in one fused model, until none are left.

    `sweep` comes from `Sweep.join`. Stops taking trials once more have failed for good than
    the study allows, or once `kdsweep stop` was asked (its running trials are re-queued).
    """
    spec, preset = objective.study, objective.preset
    check_fusable(spec, preset, objective.overrides)
    space = spec.space_for(preset, objective.overrides)
    summary = WorkerSummary()
    stop = threading.Event()
    sweep.stop_event = stop  # `kdsweep stop`: a heartbeat sets it, training stops
    signalled = threading.Event()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in handled}
    group: FusedGroup | None = None
    running: dict[int, _Running] = {}  # trial id -> its bookkeeping, while it holds a slot

    def on_term(signum: int, frame: Any) -> None:
        signalled.set()
        for s in handled:  # only the first signal counts (see run_worker)
            signal.signal(s, _ignore)
        stop.set()
        if running and not polling_stop():  # e.g. building the teacher: leave at once
            raise Interrupted()

    def take() -> Member | None:
        """The next waiting trial as a group member (sampled, stored, beating), or None."""
        if stop.is_set() or sweep.stop_requested:
            return None
        sweep.reap()
        trial_id = sweep.pop()
        if trial_id is None and sweep.top_up():
            trial_id = sweep.pop()
        if trial_id is None:
            return None
        beats = contextlib.ExitStack()
        beats.enter_context(sweep.heartbeat(trial_id))
        trial = sweep.start(trial_id)
        entry = _Running(trial, beats, time.perf_counter())
        running[trial_id] = entry
        summary.ran += 1
        try:
            config = resolve(objective.config(sp.sample(trial, space)))
            trial.set_user_attr(keys.CONFIG, to_dict(config))
            trial.set_user_attr(keys.TRAIN_SEED, config.seed)
            trial.set_user_attr(keys.DATASET, config.data.dataset)
            trial.set_user_attr(keys.DEVICE, str(resolve_device(config.device)))
            trial.set_user_attr(keys.PARAMS_COUNT, count_params(config))
            trial.set_user_attr(keys.VERSION, kdsweep.__version__)
            trial.set_user_attr(keys.HOST, socket.gethostname())
        except StorageError:
            raise
        except Exception as exc:
            _end(trial_id, None, exc)
            return take()
        if objective.tensorboard is not None:
            from kdsweep.service.tensorboard import TrialWriter

            entry.writer = TrialWriter(objective.tensorboard / f"trial-{trial.number:04d}")
        member = Member(config, tag=trial_id)
        member.report = _reporter(trial, member, entry)
        log.info("trial %d joins the fused group (alpha %.3g, T %.3g)", trial.number,
                 config.kd.alpha, config.kd.temperature)
        return member

    def _reporter(trial: optuna.Trial, member: Member, entry: _Running):
        def report(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1 and group is not None:
                # What reproduces its data order: the group's stream, from this step on.
                trial.set_user_attr(keys.FUSED, {"slots": fuse, "data_seed": group.data_seed,
                                                 "joined_step": member.joined_step})
            value = metrics[spec.metric]
            trial.report(value, epoch)
            trial.set_user_attr(keys.EPOCHS_RUN, epoch)
            if entry.writer is not None:
                entry.writer.epoch(epoch, metrics)
            log.info("trial %d epoch %d %s %.4f", trial.number, epoch, spec.metric, value)
            if epoch < member.config.epochs and trial.should_prune():  # never at the last epoch
                trial.set_user_attr(keys.PRUNED_REASON, f"pruner stopped it after epoch {epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        return report

    def _end(trial_id: int, result: Any, error: BaseException | None) -> None:
        entry = running.pop(trial_id)
        trial = entry.trial
        try:
            if isinstance(error, StorageError):
                # A storage outage past the retry budget: nothing can be written now. The trial
                # stays RUNNING until its heartbeat goes stale, then any worker re-queues it
                # (never a failure); this worker ends (see run_worker).
                raise error
            if isinstance(error, optuna.exceptions.UpdateFinishedTrialError):
                raise error  # declared dead and re-queued elsewhere: handled below
            trial.set_user_attr(keys.WALL_TIME, round(time.perf_counter() - entry.start, 3))
            if entry.writer is not None:
                entry.writer.close(trial.params, {"trial": trial.number})
            if error is None:
                trial.set_user_attr(keys.PARAM_SPLIT, result.param_split)
                trial.set_user_attr(keys.EPOCHS_RUN, result.epochs_run)
                trial.set_user_attr(keys.IMAGES_PER_S, round(result.images_per_s, 1))
                trial.set_user_attr(keys.BEST_VAL_ACC, result.best_val_acc)
                if result.teacher:
                    trial.set_user_attr(keys.TEACHER_KEY, result.teacher["key"])
                    trial.set_user_attr(keys.TEACHER_VAL_ACC, result.teacher["val_acc"])
                if objective.keep_weights > 0:
                    objective._keep_weights(trial, result.model, result.final_val_acc)
                sweep.tell(trial, result.final_val_acc)
                summary.complete += 1
            elif isinstance(error, optuna.TrialPruned):
                sweep.tell(trial, state=TrialState.PRUNED)
                summary.pruned += 1
            else:
                reason = f"{type(error).__name__}: {error}"
                sweep.fail(trial_id, reason)
                summary.failed += 1
                c = sweep.counts()
                log.warning("trial %d failed (%s); %s", trial.number, reason[:500],
                            "a fresh slot replaces it" if c.failed <= sweep.max_failures
                            else "failures exceed the study's limit: no new trial starts")
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was declared dead while running (heartbeat missed) and re-queued; "
                        "this worker drops its copy", trial.number)
            summary.requeued += 1
        finally:
            summary.trials.append(trial.number)
            entry.beats.close()

    def requeue_running() -> None:
        for trial_id in list(running):
            entry = running.pop(trial_id)
            try:
                if sweep.requeue(trial_id, INTERRUPTED):
                    log.warning("trial %d interrupted and re-queued", entry.trial.number)
                summary.requeued += 1
            finally:
                entry.beats.close()

    def leave_running() -> None:
        """A storage outage: tell nothing (the reaper re-queues them), stop their heartbeats."""
        for trial_id in list(running):
            running.pop(trial_id).beats.close()

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
            first = take()
            if first is None:
                c = sweep.counts()
                if c.failed > sweep.max_failures:
                    log.error("%d trials failed for good, more than the study allows (%d): "
                              "no new trial starts; see `kdsweep status %s`",
                              c.failed, sweep.max_failures, sweep.name)
                    break
                if c.running == 0 and c.waiting == 0:
                    break
                stop.wait(0.1 if c.waiting else POLL_S)
                continue
            try:
                if group is None:
                    # The first member's seed orders the data, as train() with that seed would.
                    # The teacher is prepared first (trained once per host, minutes the first
                    # time); alpha does not enter it, and prepare() skips it for alpha = 0, which
                    # the first member may have while later ones distil.
                    teacher = prepare_teacher(replace(first.config, **{"kd.alpha": 1.0}))
                    group = FusedGroup(first.config, fuse, data_seed=first.config.seed, stop=stop,
                                       teacher=teacher)
                pending = [first]
                group.run(lambda pending=pending: pending.pop() if pending else take(),
                          lambda member, result, error: _end(member.tag, result, error))
            except (StorageError, optuna.exceptions.UpdateFinishedTrialError):
                leave_running()
                raise
            except Exception as exc:  # the whole group broke (out of memory, data): fail them all
                for trial_id in list(running):
                    _end(trial_id, None, exc)
                if group is not None:
                    group.members = [None] * group.k
                if _is_oom(exc):
                    import torch

                    torch.cuda.empty_cache()
                    continue  # its trials are replaced; the next group may fit
                raise
    except KeyboardInterrupt:
        summary.interrupted = signalled.is_set()
        summary.stopped = not summary.interrupted  # drained by `kdsweep stop`
        requeue_running()
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)
    return summary
