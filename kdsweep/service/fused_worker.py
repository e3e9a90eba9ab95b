"""`kdsweep worker --fuse K`: a worker that trains up to K trials at once as one fused model.

The same sweep as `run_worker` (kdsweep/service/worker.py) — the same `Sweep` slots (`pop`,
`top_up`), heartbeats, re-queues, failure limit and `kdsweep stop` — but the trials' students
train together in a `kdsweep.core.fused.FusedGroup`: one data batch, one teacher-logit gather
and one fused forward/backward per step for all K. Each trial keeps its own Optuna trial
(`Sweep.start`: its own per-trial sampler seed), its validation accuracy is reported to it
after each of its epochs, the pruner decides for it alone, and a pruned or finished trial's
slot goes to the next waiting one at once.

Each member goes through the same trial lifecycle as a plain worker's trial
(`kdsweep.service.objective.TrialRun`: the config with a verification run's seed and test
score, the report and pruning rule, the full record, then the tell); only the training call
differs. A group trains members of one seed (its data order is that seed's, as `train()`
draws it), so verification runs of another seed wait for a group of their own.

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
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.core.config import replace
from kdsweep.core.fused import PER_MEMBER, FusedGroup, Member
from kdsweep.service import keys
from kdsweep.service.loop import StopFlag, heartbeat, idle, signals, stopped, take_slot
from kdsweep.service.objective import Objective, TrialRun
from kdsweep.service.spec import StudyError, StudySpec
from kdsweep.service.storage import StorageError
from kdsweep.service.sweep import INTERRUPTED, Sweep
from kdsweep.service.worker import WorkerSummary, _is_oom, fail

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
    run: TrialRun
    beats: contextlib.ExitStack  # the trial's heartbeat, closed when it leaves the group


def run_fused_worker(sweep: Sweep, objective: Objective, fuse: int) -> WorkerSummary:
    """Run the sweep's slots, `fuse` at a time in one fused model, until none are left.

    `sweep` comes from `Sweep.join`. Stops taking trials once more have failed for good than
    the study allows, or once `kdsweep stop` was asked (its running trials are re-queued).
    """
    spec, preset = objective.study, objective.preset
    check_fusable(spec, preset, objective.overrides)
    base_seed = spec.base_config(preset, objective.overrides).seed
    summary = WorkerSummary()
    flag = StopFlag()
    group: FusedGroup | None = None
    seed: list[int | None] = [None]  # the seed a new member must have (its group's), None: any
    running: dict[int, _Running] = {}  # trial id -> its bookkeeping, while it holds a slot

    def accept(t: FrozenTrial) -> bool:
        return seed[0] is None or int(t.user_attrs.get(keys.VERIFY_SEED, base_seed)) == seed[0]

    def take() -> Member | None:
        """The next waiting trial of the group's seed as a member (configured, beating), or None."""
        while True:
            trial_id = take_slot(sweep, flag, accept)
            if trial_id is None:
                return None
            beats = contextlib.ExitStack()
            beats.enter_context(heartbeat(sweep, trial_id, flag))
            run = TrialRun(objective, sweep.start(trial_id), trial_log=False)
            running[trial_id] = _Running(run, beats)
            summary.ran += 1
            try:
                config = run.configure()
            except StorageError:
                raise
            except Exception as exc:  # infeasible, or a config that cannot be built
                _end(trial_id, None, exc)
                continue
            member = Member(config, tag=trial_id)
            member.report = _reporter(run, member)
            log.info("trial %d joins the fused group (alpha %.3g, T %.3g, seed %d)", run.trial.number,
                     config.kd.alpha, config.kd.temperature, config.seed)
            return member

    def _reporter(run: TrialRun, member: Member):
        def report(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1 and group is not None:
                # What reproduces its data order: the group's stream, from this step on.
                run.trial.set_user_attr(keys.FUSED, {"slots": fuse, "data_seed": group.data_seed,
                                                     "joined_step": member.joined_step})
            log.info("trial %d epoch %d %s %.4f", run.trial.number, epoch, spec.metric, metrics[spec.metric])
            run.report(epoch, metrics)

        return report

    def _end(trial_id: int, result: Any, error: BaseException | None) -> None:
        entry = running.pop(trial_id)
        run = entry.run
        number = run.trial.number
        try:
            if isinstance(error, (StorageError, optuna.exceptions.UpdateFinishedTrialError)):
                # An outage past the retry budget: nothing can be written now, the trial stays
                # RUNNING until the reaper re-queues it (never a failure); or it was declared
                # dead and re-queued elsewhere already.
                run.end_tracking("REQUEUED")
                raise error
            run.close(error)
            if error is None:
                sweep.tell(run.trial, run.record(result))
                state = TrialState.COMPLETE
            elif isinstance(error, optuna.TrialPruned):
                sweep.tell(run.trial, state=TrialState.PRUNED)
                state = TrialState.PRUNED
                if keys.INFEASIBLE in sweep.frozen(trial_id).user_attrs:
                    log.warning("trial %d is infeasible (%s); a fresh slot replaces it", number, error)
            else:
                fail(sweep, trial_id, number, error)
                state = TrialState.FAIL
            summary.count(number, state)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was declared dead while running (heartbeat missed) and re-queued; "
                        "this worker drops its copy", number)
            summary.count(number, TrialState.WAITING)
        finally:
            entry.beats.close()

    def requeue_running() -> None:
        for trial_id in list(running):
            entry = running.pop(trial_id)
            entry.run.end_tracking("REQUEUED")
            try:
                if sweep.requeue(trial_id, INTERRUPTED):
                    log.warning("trial %d interrupted and re-queued", entry.run.trial.number)
                summary.requeued += 1
            finally:
                entry.beats.close()

    def leave_running() -> None:
        """A storage outage: tell nothing (the reaper re-queues them), stop their heartbeats."""
        for trial_id in list(running):
            entry = running.pop(trial_id)
            entry.run.end_tracking("REQUEUED")
            entry.beats.close()

    with signals(flag):
        try:
            while not stopped(sweep, flag):
                seed[0] = None
                first = take()
                if first is None:
                    if idle(sweep, flag):
                        break
                    continue
                flag.interruptible = True  # e.g. building the teacher: a signal leaves at once
                try:
                    if group is None or group.data_seed != first.config.seed:
                        # The member's seed orders the data, as train() with that seed would.
                        # The teacher is prepared first (trained once per host, minutes the first
                        # time); alpha does not enter it, and prepare() skips it for alpha = 0,
                        # which the first member may have while later ones distil.
                        teacher = running[first.tag].run.teacher(replace(first.config, **{"kd.alpha": 1.0}))
                        group = FusedGroup(first.config, fuse, data_seed=first.config.seed,
                                           stop=flag, teacher=teacher)
                    seed[0] = group.data_seed
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
                finally:
                    flag.interruptible = False
            else:
                summary.stopped = True
        except KeyboardInterrupt:
            summary.interrupted = flag.signalled
            summary.stopped = not summary.interrupted  # drained by `kdsweep stop`
            requeue_running()
    return summary
