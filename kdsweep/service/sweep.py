"""A sweep: one Optuna study and everything kdsweep stores about it.

A kdsweep sweep is a plain Optuna study (optuna-dashboard, `optuna.load_study` and the
`optuna` CLI read it) plus what kdsweep records in it, under the keys of
`kdsweep.service.keys`. `Sweep` is the one place that reads and writes those records:

* **Create or resume** (`Sweep.create`): the study's definition (study file, preset, `--set`
  overrides, kdsweep version) is stored once; a later create or worker with another definition
  is refused. N (`keys.N_TRIALS`) is kept on resume unless a new N is given.
* **Exact N**: workers only run WAITING trials. Popping one is atomic in Optuna's RDB storage,
  so no two workers run the same slot, and no worker creates a trial of its own. Empty slots
  are made a few at a time (`top_up`) under a lock every worker of the database shares, until
  the study holds N trials that are finished, running or waiting. A trial that fails for good
  or turns out infeasible no longer counts, so the next top-up replaces it; the study ends with
  exactly N COMPLETE + PRUNED trials.
* **Re-queue** (`requeue`): an interrupted attempt, or one whose worker died (`reap`), is
  marked FAIL with `keys.REQUEUED` and a WAITING copy takes its place, with the same params,
  enqueued values, user attributes, pruner rungs and intermediate values; the retry resumes from
  the trial's checkpoint. Both steps happen under the study lock, so a top-up in between cannot
  count the slot twice. **One rule for what failed means**: a re-queued attempt is never a
  failure — not in the failure limit, not in any count; only a trial that failed for good is.
* **Sampler seeds per trial** (`start`): trial k draws its values with a sampler seeded from
  (the study's --seed, k). Every worker on every host, every resume and top-up, proposes from
  its own stream, and the seed is recorded in the trial (`keys.SAMPLER_SEED`).
* **Siblings**: `<study>.verify` holds seed-verification runs (its own N: top x seeds).
* **Answers**: counts, top-k, the best export, the summary table.

Optuna's private names (`_storage`, `_study_id`, `_trial_id`) are used here and in
`kdsweep.service.storage` only.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

import kdsweep
from kdsweep.core.config import compact
from kdsweep.service import keys
from kdsweep.service import space as sp
from kdsweep.service.spec import StudyError, StudySpec, diff_definitions

log = logging.getLogger("kdsweep.service.sweep")

WINDOW = 4  # empty WAITING slots made at a time: enough that workers rarely wait on the lock
MAX_RETRIES = 3  # a trial whose worker died this many times is given up (failed for good)
DEFAULT_N = 50  # N of a new study when none is given
VERIFY_SUFFIX = ".verify"
BASELINE_SUFFIX = ".baseline"  # kdsweep/service/baseline.py
INTERRUPTED = "interrupted"  # re-queue reasons: a signal (Ctrl-C, SIGTERM, a drain) ...
DIED = "worker died (no heartbeat)"  # ... a dead worker (counts toward MAX_RETRIES) ...
OUTAGE = "storage outage"  # ... or a database that stayed away past the retry budget


class SweepNotFound(StudyError):
    """No study of that name in the storage."""


def origin(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first attempt of this trial (all its retries share it)."""
    if isinstance(trial, optuna.Trial):  # Optuna 5's Trial no longer exposes system_attrs
        trial = trial.study._storage.get_trial(trial._trial_id)
    return int(trial.system_attrs.get(keys.ORIGIN, trial.number))


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


class _AsOrigin(optuna.pruners.BasePruner):
    """Presents a retry to the study's pruner as its first attempt (same trial number).

    Hyperband files a trial in a bracket by its number; a retry has a new number, and without
    this it would be judged in another bracket than the one its first attempt ran in.
    """

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        first = trial.system_attrs.get(keys.ORIGIN)
        if first is not None and first != trial.number:
            trial = copy.copy(trial)
            trial.number = int(first)
        return self.inner.prune(study, trial)


class Sweep:
    """One kdsweep study: `Sweep.create` (or resume), `Sweep.load` (read), then its methods."""

    def __init__(self, study: optuna.Study, spec: StudySpec | None = None) -> None:
        # Set by run_worker: each heartbeat that finds `kdsweep stop`'s flag sets it, and the
        # training loop (which checks it before every batch) stops: no database read per batch.
        self.stop_event: threading.Event | None = None
        self.study = study
        self.spec = spec
        self._numbers: dict[int, int] = {}  # trial id -> number of the trials pop() took

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls, storage: BaseStorage, spec: StudySpec, preset: str, name: str | None = None,
        n_trials: int | None = None, seed: int | None = None,
        overrides: Mapping[str, Any] | None = None, max_failures: int | None = None,
    ) -> Sweep:
        """Create the study, or resume it (checking it matches), set to finish N trials.

        On resume N stays as stored unless `n_trials` is given (then it becomes the new N).
        Nothing is changed when the stored definition disagrees with the local one.
        """
        name = name or spec.name
        definition = spec.definition(preset, overrides)
        try:
            sweep = cls.load(storage, name, spec)
        except SweepNotFound:
            sweep = None
        if sweep is None:
            try:
                study = optuna.create_study(study_name=name, storage=storage, direction=spec.direction)
            except optuna.exceptions.DuplicatedStudyError:  # another create won the race
                sweep = cls.load(storage, name, spec)
        if sweep is not None:
            sweep._await_definition()
            sweep.check(spec, preset, overrides or {})
        else:
            sweep = cls(study, spec)
            study.set_user_attr(keys.DEFINITION, definition)
            study.set_user_attr(keys.SCHEMA, keys.SCHEMA_VERSION)
            study.set_user_attr(keys.UID, uuid.uuid4().hex)  # tells its checkpoints from a namesake's
            study.set_user_attr(keys.SEED, seed)
            study.set_user_attr(keys.DESCRIPTION, spec.description)
            with warnings.catch_warnings():  # experimental in Optuna; names the dashboard's axis
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([spec.metric])
        n = n_trials if n_trials is not None else sweep.n_trials or DEFAULT_N
        if sweep.n_trials is not None and n < sweep.n_trials:
            sweep._lower_n(n)
        if sweep.stop_requested:  # launch / create resume a drained sweep
            sweep.study.set_user_attr(keys.STOP, False)
        if max_failures is None:
            max_failures = sweep.study.user_attrs.get(keys.MAX_FAILURES) if n_trials is None else None
        sweep.study.set_user_attr(keys.MAX_FAILURES,
                                  max_failures if max_failures is not None else max(3, n // 5))
        # Slots are made by the workers as they need them (top_up), so points enqueued before
        # the workers start take the places of N's first trials rather than running in addition.
        sweep.study.set_user_attr(keys.N_TRIALS, n)
        return sweep

    def _await_definition(self, seconds: float = 5.0) -> None:
        """Wait (briefly) for a study another process has just created to get its definition:
        its creator records it right after creating the study, and a concurrent `create` or
        `launch` must not take the study for a foreign one in between."""
        if self.attrs or self.trials():  # made and recorded (a foreign study too): no wait
            return
        deadline = time.monotonic() + seconds
        while not self.attrs and time.monotonic() < deadline:
            time.sleep(0.2)
            self.study = optuna.load_study(study_name=self.name, storage=self._storage)

    @classmethod
    def load(cls, storage: BaseStorage, name: str, spec: StudySpec | None = None) -> Sweep:
        """The stored study `name`, to read (nothing is written); SweepNotFound without it."""
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise SweepNotFound(f"no study named {name!r} in this storage.") from None
        return cls(study, spec)

    @classmethod
    def open(cls, url: str, name: str, write: bool = False) -> Sweep:
        """The sweep `name` in the storage at `url`, for a command: opened read-only first, so
        asking for a study that is not there never creates a file or a schema; StudyError
        (naming the studies there) when it is missing. `write` reopens it to change it."""
        from kdsweep.service.storage import open_storage, redact, study_names

        storage = read_storage(url)
        try:
            sweep = cls.load(storage, name)
        except SweepNotFound:
            raise StudyError(f"no study named {name!r} in {redact(url)}; studies there: "
                             f"{', '.join(study_names(storage)) or 'none'}.") from None
        return cls.load(open_storage(url), name) if write else sweep

    @classmethod
    def join(cls, storage: BaseStorage, name: str, spec: StudySpec) -> Sweep:
        """The stored study `name`, checked against `spec` and ready to run its trials."""
        sweep = cls.load(storage, name, spec)
        sweep.check(spec)
        sweep.study.pruner = _AsOrigin(spec.pruner(spec.base_config(sweep.preset, sweep.overrides)))
        return sweep

    def check(self, spec: StudySpec, preset: str | None = None,
              overrides: Mapping[str, Any] | None = None) -> None:
        """Refuse (StudyError) a study file, preset, overrides or version other than the stored
        ones (by default the stored preset and overrides are checked against `spec`)."""
        stored, name = self.definition, self.name
        if not stored:
            raise StudyError(f"study {name!r} exists but was not created by kdsweep; use another --study-name.")
        if self.schema is None:
            written = stored.get("kdsweep_version", "0.1")
            raise StudyError(
                f"study {name!r} was written by kdsweep {written}, whose stored state kdsweep "
                f"{kdsweep.__version__} does not resume; finish it with kdsweep {written} "
                f"(pip install 'kdsweep=={written}'), or start a new study with another --study-name."
            )
        local = spec.definition(preset or self.preset, self.overrides if overrides is None else overrides)
        if self.study.direction.name.lower() != local["direction"]:
            raise StudyError(
                f"study {name!r} was created to {self.study.direction.name.lower()}, "
                f"but this study file wants to {local['direction']}; use another --study-name."
            )
        diff = diff_definitions(stored, local)
        if diff:
            raise StudyError(
                f"study {name!r} was created with a different definition ({diff}); "
                "run with the same study file, preset and kdsweep version, or use another --study-name."
            )

    # ------------------------------------------------------------------ what is stored

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def attrs(self) -> dict[str, Any]:
        return self.study.user_attrs

    @property
    def definition(self) -> dict[str, Any]:
        return self.attrs.get(keys.DEFINITION) or {}

    @property
    def preset(self) -> str:
        return self.definition.get("preset", "paper")

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.definition.get("overrides") or {})

    @property
    def spec_name(self) -> str:
        """The study file the sweep was created from (its name, found along the search path)."""
        return self.definition.get("study", self.name)

    @property
    def metric(self) -> str:
        return self.definition.get("metric", "val_acc")

    @property
    def n_trials(self) -> int | None:
        return self.attrs.get(keys.N_TRIALS)

    @property
    def seed(self) -> int | None:
        return self.attrs.get(keys.SEED)

    @property
    def uid(self) -> str:
        return str(self.attrs.get(keys.UID, ""))

    @property
    def schema(self) -> int | None:
        return self.attrs.get(keys.SCHEMA)

    @property
    def max_failures(self) -> int:
        return int(self.attrs.get(keys.MAX_FAILURES, 10))

    @property
    def verifies(self) -> str | None:
        """For a `<study>.verify` sibling: the sweep it verifies."""
        return self.attrs.get(keys.VERIFY_OF)

    @property
    def maximize(self) -> bool:
        return self.study.direction == optuna.study.StudyDirection.MAXIMIZE

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def trial(self, number: int) -> FrozenTrial:
        """Trial `number` (StudyError when there is none)."""
        found = [t for t in self.trials() if t.number == number]
        if not found:
            raise StudyError(f"study {self.name!r} has no trial {number}.")
        return found[0]

    @property
    def _storage(self) -> BaseStorage:
        return self.study._storage

    @property
    def _id(self) -> int:
        return self.study._study_id

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The study's lock, shared by every process of the database (see storage.study_lock)."""
        from kdsweep.service.storage import study_lock

        return study_lock(self._storage, self._id)

    # ------------------------------------------------------------------ counts and slots

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
        if self.n_trials is not None:
            # Failed trials beyond the study's limit are not replaced: N shrinks by that many.
            c.target = self.n_trials - max(0, c.failed - self.max_failures)
            c.unmade = max(0, c.target - (c.finished + c.running + c.waiting))
            c.waiting += c.unmade
        return c

    def failure_limit_passed(self) -> bool:
        failed = self._storage.get_all_trials(self._id, deepcopy=False, states=(TrialState.FAIL,))
        return sum(map(failed_for_good, failed)) > self.max_failures

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

    def pop(self) -> int | None:
        """Atomically take one WAITING trial (RUNNING now): its id, or None. Never creates one.

        Once more trials failed for good than the study allows, no new trial starts.
        """
        if self.failure_limit_passed():
            return None
        storage = self._storage
        for t in storage.get_all_trials(self._id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    self._numbers[t._trial_id] = t.number  # start() needs no extra read
                    return t._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
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
        """Finish `trial`; UpdateFinishedTrialError when it was declared dead meanwhile."""
        if not self.is_running(trial._trial_id):
            # Its heartbeat was missed for a grace period, so another worker re-queued it.
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} is no longer running")
        if state == TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)

    def fail(self, trial_id: int, reason: str) -> None:
        """Fail a running trial for good: it counts as a failure; the next top-up replaces it."""
        self._storage.set_trial_user_attr(trial_id, keys.FAIL_REASON, reason[:500])
        self._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)

    def requeue(self, trial_id: int, reason: str) -> bool:
        """Mark a RUNNING attempt FAIL (re-queued) and put a WAITING copy in its place.

        The copy keeps the params, the values enqueued for it (`fixed_params`), its user
        attributes (a verification run keeps its seed), the pruner's rungs and the intermediate
        values; it records the first attempt's number. Under the study lock, so a top-up cannot
        see the slot missing in between. False when the attempt was no longer running (another
        worker re-queued it first).
        """
        with self.lock():
            old = self._storage.get_trial(trial_id)
            if old.state != TrialState.RUNNING:
                return False
            self._storage.set_trial_user_attr(trial_id, keys.REQUEUED, reason)
            self._storage.set_trial_user_attr(trial_id, keys.FAIL_REASON, f"{reason}; re-queued")
            try:
                self._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
            self.study.add_trial(self._retry_of(old, reason))
        return True

    @staticmethod
    def _retry_of(old: FrozenTrial, reason: str) -> FrozenTrial:
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

    @contextlib.contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Record the trial's heartbeat every few seconds while it runs (Optuna's RDB heartbeat).

        Each beat also re-queues dead workers' trials (`reap`), so a dead worker's trial comes
        back within about one grace period even while every live worker is busy with a long
        trial (otherwise that would wait until some worker finishes its trial).
        """
        storage = self._storage
        interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
        if not interval:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    storage.record_heartbeat(trial_id)
                    self.reap()
                    if self.stop_event is not None and not self.stop_event.is_set() and self.stop_requested:
                        log.warning("`kdsweep stop %s`: re-queuing this trial and leaving", self.name)
                        self.stop_event.set()
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

    def reap(self) -> int:
        """Re-queue the trials of dead workers; how many.

        Dead: a RUNNING trial whose heartbeat is older than the grace period, or that has no
        heartbeat at all and started more than a grace period ago (a worker killed between
        taking the slot and its first heartbeat; Optuna never marks those stale). A trial whose
        workers died MAX_RETRIES times fails for good.
        """
        from kdsweep.service.storage import dead_trial_ids

        done = 0
        for trial_id in dead_trial_ids(self._storage, self._id):  # each re-checked under the lock
            t = self._storage.get_trial(trial_id)
            if int(t.system_attrs.get(keys.RETRIES, 0)) >= MAX_RETRIES:
                self._storage.set_trial_user_attr(
                    trial_id, keys.FAIL_REASON, f"worker died {MAX_RETRIES + 1} times; given up")
                try:
                    self._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
            elif self.requeue(trial_id, DIED):
                log.warning("trial %d: its worker died; re-queued", t.number)
            done += 1
        return done

    # ------------------------------------------------------------------ known points

    def enqueue(self, points: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Queue known points, each checked against the study's space (with its preset and
        recorded `--set` overrides) before any is stored; returns them as stored."""
        if self.spec is None:
            raise StudyError("enqueue needs the study file (pass it with --study).")
        space = self.spec.space_for(self.preset, self.overrides)
        checked = [sp.validate_point(space, p) for p in points]
        with self.lock():  # not counted twice by a worker's top-up
            for p in checked:
                self.study.enqueue_trial(p, skip_if_exists=True)
        return checked

    # ------------------------------------------------------------------ answers

    def top(self, k: int) -> list[FrozenTrial]:
        """The best `k` complete trials, best first."""
        done = [t for t in self.trials(TrialState.COMPLETE) if t.value is not None]
        return sorted(done, key=lambda t: t.value, reverse=self.maximize)[:k]

    @property
    def best_trial(self) -> FrozenTrial | None:
        """The best COMPLETE trial (a failed or pruned one never wins), or None."""
        best = self.top(1)
        return best[0] if best else None

    def export_best(self) -> dict[str, Any]:
        """The winning trial as a runnable document: value, trial number, params and full config."""
        best = self.best_trial
        if best is None:
            raise StudyError(f"study {self.name!r} has no complete trial yet; run `kdsweep launch` first.")
        return {
            "study": self.name,
            "trial": best.number,
            "value": best.value,
            "metric": self.metric,
            "params": best.params,
            "kdsweep_version": best.user_attrs.get(keys.VERSION, kdsweep.__version__),
            # Without the model fields its architecture never reads (from_dict defaults them).
            "config": compact(best.user_attrs[keys.CONFIG]),
        }

    def best_line(self) -> str:
        best = self.best_trial
        if best is None:
            return "no finished trial yet"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        return f"best {best.value:.4f} (trial {best.number}: {params})"

    def progress_line(self, c: Counts | None = None) -> str:
        c = c or self.counts()
        requeued = f", re-queued {c.requeued}" if c.requeued else ""
        return (f"[{c.finished}/{c.target}] complete {c.complete}, pruned {c.pruned}, "
                f"failed {c.failed}{requeued}, running {c.running} | {self.best_line()}")

    def summary_table(self, top: int = 5) -> str:
        """The best `top` trials as a fixed-width table."""
        done = self.top(top)
        if not done:
            return "no complete trials."
        names = sorted({k for t in done for k in t.params})
        header = ["trial", "value", "epochs"] + names
        rows = [[str(t.number), f"{t.value:.4f}", str(t.user_attrs.get(keys.EPOCHS_RUN, ""))]
                + [_fmt(t.params.get(k, "-")) for k in names] for t in done]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                         for r in [header] + rows)

    def last_activity(self) -> datetime.datetime | None:
        stamps = [s for t in self.trials() for s in (t.datetime_complete, t.datetime_start) if s]
        return max(stamps) if stamps else None

    # ------------------------------------------------------------------ managing a sweep

    @property
    def stop_requested(self) -> bool:
        """Whether `kdsweep stop` asked the workers to leave (read fresh from the storage)."""
        return bool(self._storage.get_study_user_attrs(self._id).get(keys.STOP))

    def request_stop(self) -> int:
        """Drain: every worker, on every host, re-queues its running trial (at its next
        heartbeat) and leaves; none takes a new one until launch or create resumes the sweep.
        Returns the number of trials running now."""
        self.study.set_user_attr(keys.STOP, True)
        return len(self.trials(TrialState.RUNNING))

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

    def summary(self) -> dict[str, Any]:
        """What `kdsweep ls` and `status --json` show: counts, N, best value, last activity."""
        best, last = self.best_trial, self.last_activity()
        return {"study": self.name, "spec": self.spec_name, "preset": self.preset,
                "n_trials": self.n_trials, **self.counts().as_dict(),
                "best": None if best is None else {"trial": best.number, "value": best.value,
                                                   "params": best.params},
                "last_activity": None if last is None else last.isoformat(timespec="seconds"),
                "stopped": self.stop_requested, "verifies": self.verifies}

    def status(self) -> dict[str, Any]:
        """`kdsweep status --json`: the summary, the running trials, the last failures."""
        running = [{"trial": t.number, "epoch": max(t.intermediate_values, default=0), "params": t.params}
                   for t in self.trials(TrialState.RUNNING)]
        failed = [{"trial": t.number, "reason": t.user_attrs.get(keys.FAIL_REASON, "?")}
                  for t in self.trials(TrialState.FAIL) if failed_for_good(t)][-5:]
        return {**self.summary(), "running_trials": running, "last_failures": failed}

    def status_text(self) -> str:
        s, c = self.status(), self.counts()
        requeued = f", {c.requeued} re-queued" if c.requeued else ""
        lines = [f"study {self.name!r}: {c.complete} complete, {c.pruned} pruned, {c.failed} failed{requeued}, "
                 f"{c.infeasible} infeasible, {c.running} running, {c.waiting} waiting (N={self.n_trials})"
                 + (" - stopped (`kdsweep stop`)" if s["stopped"] else ""),
                 self.best_line()]
        lines += [f"  running trial {r['trial']}: epoch {r['epoch']}, {json.dumps(r['params'])}"
                  for r in s["running_trials"]]
        lines += [f"  failed trial {f['trial']}: {f['reason']}" for f in s["last_failures"]]
        return "\n".join(lines)

    def delete(self) -> list[str]:
        """Delete this study and its verify and baseline siblings from the storage, with the
        lock files a SQLite storage kept for them; their names."""
        from kdsweep.service.storage import lock_files

        doomed = self.family()
        for s in doomed:
            optuna.delete_study(study_name=s.name, storage=self._storage)
            for f in lock_files(self._storage, s._id):
                f.unlink(missing_ok=True)
        return [s.name for s in doomed]

    def family(self) -> list[Sweep]:
        """This study and those of its siblings that exist (verify, baseline), in that order."""
        return [s for s in (self, self.sibling(VERIFY_SUFFIX), self.sibling(BASELINE_SUFFIX)) if s is not None]

    # ------------------------------------------------------------------ siblings

    def sibling(self, suffix: str) -> Sweep | None:
        try:
            return Sweep.load(self._storage, self.name + suffix, self.spec)
        except SweepNotFound:
            return None

    def make_sibling(self, suffix: str) -> Sweep:
        """The study `<name><suffix>` in the same storage (created if missing), as a Sweep."""
        study = optuna.create_study(study_name=self.name + suffix, storage=self._storage,
                                    direction=self.study.direction, load_if_exists=True)
        return Sweep(study, self.spec)

    def verify_sibling(self, top: int, seeds: Sequence[int]) -> tuple[Sweep, int]:
        """Create (or top up) `<sweep>.verify` with one waiting run per (top config, seed).

        Runs already complete, running or waiting are not added again; failed ones are. The
        sibling's N is the number of runs asked for, so its workers run exactly those (never
        sampled points). Returns the sibling and the number of runs of this request.
        """
        if self.verifies is not None:
            raise StudyError(f"study {self.name!r} is itself a verification; verify {self.verifies!r}.")
        if not self.definition:
            raise StudyError(f"study {self.name!r} was not created by kdsweep, so its workers cannot re-train it.")
        best = self.top(top)
        if not best:
            raise StudyError(f"study {self.name!r} has no complete trial to verify yet.")
        sibling = self.make_sibling(VERIFY_SUFFIX)
        study = sibling.study
        if sibling.verifies not in (None, self.name):
            raise StudyError(f"study {sibling.name!r} exists and verifies another study; delete it first.")
        with sibling.lock():
            for key in (keys.DEFINITION, keys.SCHEMA, keys.UID, keys.SEED):  # workers must agree
                if key in self.attrs:
                    study.set_user_attr(key, self.attrs[key])
            study.set_user_attr(keys.VERIFY_OF, self.name)
            study.set_user_attr(keys.DESCRIPTION, f"seed verification of {self.name!r}")
            # A failed run is queued again by the next --verify, never replaced by a sampled one.
            study.set_user_attr(keys.MAX_FAILURES, 0)
            present = {(t.user_attrs.get(keys.VERIFY_SOURCE), t.user_attrs.get(keys.VERIFY_SEED))
                       for t in sibling.trials() if t.state != TrialState.FAIL}
            for rank, t in enumerate(best, 1):
                for seed in seeds:
                    if (t.number, seed) not in present:
                        study.enqueue_trial(t.params, skip_if_exists=False, user_attrs={
                            keys.VERIFY_SOURCE: t.number, keys.VERIFY_SEED: seed, keys.VERIFY_RANK: rank})
                        present.add((t.number, seed))
            # Its own N: every run asked for so far that has not failed for good.
            study.set_user_attr(keys.N_TRIALS, len(present))
        return sibling, len(best) * len(seeds)


def optuna_verbosity(verbose: int) -> None:
    """Optuna's own log lines: warnings only, unless -vv."""
    optuna.logging.set_verbosity(logging.INFO if verbose > 1 else logging.WARNING)


def read_storage(url: str) -> BaseStorage:
    """The storage at `url`, to read: never creates a file, a schema or a row; StudyError (a
    usage error: the wrong --storage) when it holds no Optuna study."""
    from kdsweep.service.storage import NoStudies, open_storage

    try:
        return open_storage(url, heartbeat=False, create=False)
    except NoStudies as exc:
        raise StudyError(f"{exc}; pass the --storage the study was launched with.") from None


def all_sweeps(storage: BaseStorage) -> list[Sweep]:
    """Every study in `storage`, as sweeps (read only)."""
    return [Sweep.load(storage, s.study_name)
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
