"""`kdsweep worker --fuse K`: a worker that trains up to K trials at once as one fused model.

The same sweep as `run_worker` (kdsweep/service/worker.py) — the same slots (`pop_slot`,
`top_up`), heartbeats, re-queues and failure accounting — but the trials' students train
together in a `kdsweep.core.fused.FusedGroup`: one data batch, one teacher-logit gather and one
fused forward/backward per step for all K. Each trial keeps its own Optuna trial: its params
are sampled by the study's sampler as any trial's, its validation accuracy is reported to it
after each of its epochs, the pruner decides for it alone, and a pruned or finished trial's
slot goes to the next waiting one at once.

Each running member has its own heartbeat, so a killed fused worker's K trials are all failed
and re-queued by the heartbeat reaper, as one trial of a plain worker is; on SIGTERM/Ctrl-C the
worker re-queues all of them itself. Fused trials write no epoch checkpoints: a re-queued one
trains again from its first epoch (its reported values are kept).

Only studies whose trials differ in nothing but `kd.alpha`, `kd.temperature` and the seed can
be fused (Q2); `check_fusable` says so in one sentence for any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

import kdsweep
from kdsweep.core.config import to_dict
from kdsweep.core.devices import resolve_device
from kdsweep.core.fused import PER_MEMBER, FusedGroup, Member
from kdsweep.core.train import polling_stop, resolve
from kdsweep.service import space as sp
from kdsweep.service.objective import Objective, count_params
from kdsweep.service.spec import Study, StudyError
from kdsweep.service.worker import (
    MAX_FAILURES,
    POLL_S,
    Interrupted,
    WorkerSummary,
    _genuine_failure,
    _is_oom,
    _tell,
    check_definition,
    counts,
    heartbeat,
    pop_slot,
    reap_stale,
    requeue,
    top_up,
)

log = logging.getLogger("kdsweep.service.fused_worker")


def check_fusable(study_def: Study, preset: str, overrides: dict[str, Any]) -> None:
    """Raise StudyError unless every trial of the study trains the same student (Q2-like)."""
    base = study_def.base_config(preset, overrides)
    if base.kd is None:
        raise StudyError(f"--fuse trains distillation students together; study {study_def.name!r} "
                         f"(preset {preset}) has no kd settings, so run it without --fuse.")
    others = [p.name for p in study_def.space_for(preset, overrides) if p.path not in PER_MEMBER]
    if others:
        raise StudyError(f"--fuse needs trials that differ only in {', '.join(PER_MEMBER)}; study "
                         f"{study_def.name!r} also samples {', '.join(others)}, so run it without --fuse.")
    if base.model.trainable != "all":
        raise StudyError("--fuse trains whole students; model.trainable must be 'all'.")


@dataclasses.dataclass
class _Running:
    trial: optuna.Trial
    beats: contextlib.ExitStack  # the trial's heartbeat, closed when it leaves the group
    start: float
    writer: Any = None


def run_fused_worker(objective: Objective, storage: BaseStorage, study_name: str, fuse: int,
                     seed: int | None = None, worker_index: int = 0) -> WorkerSummary:
    """Run slots of `study_name`, `fuse` at a time in one fused model, until none are left."""
    study_def, preset = objective.study, objective.preset
    study = optuna.load_study(
        study_name=study_name, storage=storage,
        sampler=study_def.sampler(None if seed is None else seed + 1000 * worker_index),
        pruner=study_def.pruner(study_def.base_config(preset, objective.overrides)),
    )
    check_definition(study, study_def.definition(preset, objective.overrides), study_name)
    check_fusable(study_def, preset, dict(objective.overrides))
    space = study_def.space_for(preset, objective.overrides)
    summary = WorkerSummary()
    stop = threading.Event()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in handled}
    group: FusedGroup | None = None
    running: dict[int, _Running] = {}  # trial id -> its bookkeeping, while it holds a slot

    def on_term(signum: int, frame: Any) -> None:
        for s in handled:  # only the first signal counts (see run_worker)
            signal.signal(s, signal.SIG_IGN)
        stop.set()
        if running and not polling_stop():  # e.g. building the teacher: leave at once
            raise Interrupted()

    def take() -> Member | None:
        """The next waiting trial as a group member (sampled, stored, beating), or None."""
        if stop.is_set():
            return None
        reap_stale(study)
        trial_id = pop_slot(study)
        if trial_id is None and top_up(study):
            trial_id = pop_slot(study)
        if trial_id is None:
            return None
        trial = optuna.trial.Trial(study, trial_id)
        beats = contextlib.ExitStack()
        beats.enter_context(heartbeat(storage, trial_id, study))
        entry = _Running(trial, beats, time.perf_counter())
        running[trial_id] = entry
        summary.ran += 1
        try:
            config = resolve(objective.config(sp.sample(trial, space)))
            trial.set_user_attr("config", to_dict(config))
            trial.set_user_attr("seed", config.seed)
            trial.set_user_attr("dataset", config.data.dataset)
            trial.set_user_attr("device", str(resolve_device(config.device)))
            trial.set_user_attr("params", count_params(config))
            trial.set_user_attr("kdsweep_version", kdsweep.__version__)
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
                trial.set_user_attr("fused", {"slots": fuse, "data_seed": group.data_seed,
                                              "joined_step": member.joined_step})
            value = metrics[study_def.metric]
            trial.report(value, epoch)
            trial.set_user_attr("epochs_run", epoch)
            if entry.writer is not None:
                entry.writer.epoch(epoch, metrics)
            log.info("trial %d epoch %d %s %.4f", trial.number, epoch, study_def.metric, value)
            if epoch < member.config.epochs and trial.should_prune():  # never at the last epoch
                trial.set_user_attr("pruned_reason", f"pruner stopped it after epoch {epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        return report

    def _end(trial_id: int, result: Any, error: BaseException | None) -> None:
        entry = running.pop(trial_id)
        trial = entry.trial
        try:
            trial.set_user_attr("wall_time", round(time.perf_counter() - entry.start, 3))
            if entry.writer is not None:
                entry.writer.close(trial.params, {"trial": trial.number})
            if error is None:
                trial.set_user_attr("param_split", result.param_split)
                trial.set_user_attr("epochs_run", result.epochs_run)
                trial.set_user_attr("images_per_s", round(result.images_per_s, 1))
                trial.set_user_attr("best_val_acc", result.best_val_acc)
                if result.teacher:
                    trial.set_user_attr("teacher_key", result.teacher["key"])
                    trial.set_user_attr("teacher_val_acc", result.teacher["val_acc"])
                if objective.keep_weights > 0:
                    objective._keep_weights(trial, result.model, result.final_val_acc)
                _tell(study, trial, result.final_val_acc)
                summary.complete += 1
            elif isinstance(error, optuna.TrialPruned):
                study.tell(trial, state=TrialState.PRUNED)
                summary.pruned += 1
            else:
                reason = f"{type(error).__name__}: {error}"[:500]
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
                summary.failed += 1
                failures = sum(map(_genuine_failure, study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
                log.warning("trial %d failed (%s); %s", trial.number, reason,
                            "a fresh slot replaces it" if failures <= study.user_attrs.get(MAX_FAILURES, 10)
                            else "failures exceed the study's limit, not replaced")
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was declared dead while running (heartbeat missed) and re-queued; "
                        "this worker drops its copy", trial.number)
        finally:
            summary.trials.append(trial.number)
            entry.beats.close()

    def requeue_running() -> None:
        for trial_id in list(running):
            entry = running.pop(trial_id)
            try:
                entry.trial.set_user_attr("fail_reason", "interrupted (SIGTERM/Ctrl-C); re-queued")
                study.tell(entry.trial, state=TrialState.FAIL)
                requeue(study, study._storage.get_trial(trial_id), "interrupted")
                log.warning("trial %d interrupted and re-queued", entry.trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # already reaped and re-queued elsewhere
            finally:
                entry.beats.close()

    if threading.current_thread() is threading.main_thread():
        for s in handled:
            signal.signal(s, on_term)
    try:
        while True:
            if stop.is_set():
                raise Interrupted()
            first = take()
            if first is None:
                c = counts(study)
                if c.running == 0 and c.waiting == 0:
                    break
                stop.wait(0.1 if c.waiting else POLL_S)
                continue
            try:
                if group is None:
                    # The first member's seed orders the data, as train() with that seed would.
                    group = FusedGroup(first.config, fuse, data_seed=first.config.seed, stop=stop)
                pending = [first]
                group.run(lambda pending=pending: pending.pop() if pending else take(),
                          lambda member, result, error: _end(member.tag, result, error))
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
        summary.interrupted = True
        requeue_running()
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)
    return summary
