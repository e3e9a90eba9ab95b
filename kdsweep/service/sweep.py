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
  the trial's checkpoint. Both writes are one transaction (`kdsweep.service.requeue`, which
  also says what this adds to Optuna's own lifecycle). **One rule for what failed means**: a
  re-queued attempt is never a failure — not in the failure limit, not in any count; only a
  trial that failed for good is.
* **Limits**: once more trials failed for good than the study allows (`keys.MAX_FAILURES`), or
  more turned out infeasible than `infeasible_limit`, no new trial starts (`stop_reason` says
  why in one sentence). Siblings (`kdsweep.service.siblings`) have no such limit.
* **Sampler seeds per trial** (`start`): trial k draws its values with a sampler seeded from
  (the study's --seed, k). Every worker on every host, every resume and top-up, proposes from
  its own stream, and the seed is recorded in the trial (`keys.SAMPLER_SEED`).
* **Siblings**: `<study>.verify` holds seed-verification runs (its own N: top x seeds) and
  `<study>.baseline` the alpha=0 reference (`kdsweep.service.siblings`).
* **Answers**: counts, top-k, the best export; in words, `kdsweep.service.sweep_text`.

Optuna's private names (`_storage`, `_study_id`, `_trial_id`) are used here, in
`kdsweep.service.requeue` and in `kdsweep.service.storage` only.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

import kdsweep
from kdsweep.core.config import compact
from kdsweep.service import keys, siblings, sweep_text
from kdsweep.service import requeue as rq
from kdsweep.service import space as sp
from kdsweep.service.requeue import DIED, INTERRUPTED, MAX_RETRIES, OUTAGE, is_requeued  # noqa: F401
from kdsweep.service.siblings import BASELINE_SUFFIX, VERIFY_SUFFIX
from kdsweep.service.slots import (  # noqa: F401  (re-exported: the queue's names)
    DEFAULT_N,
    WINDOW,
    Counts,
    SlotQueue,
    counted,
    failed_for_good,
    origin,
    sampler_seed,
)
from kdsweep.service.spec import StudyError, StudySpec, diff_definitions

log = logging.getLogger("kdsweep.service.sweep")



class SweepNotFound(StudyError):
    """No study of that name in the storage."""


class Sweep(SlotQueue):
    """One kdsweep study: `Sweep.create` (or resume), `Sweep.load` (read), then its methods."""

    def __init__(self, study: optuna.Study, spec: StudySpec | None = None) -> None:
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
        if spec.source:  # so `best --verify` finds a study file given by path (service/verify.py)
            sweep.study.set_user_attr(keys.STUDY_FILE, str(Path(spec.source).resolve()))
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
        sweep.study.pruner = rq.AsOrigin(spec.pruner(spec.base_config(sweep.preset, sweep.overrides)))
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
    def study_file(self) -> str | None:
        """The absolute path of the study file it was created from, where that was recorded."""
        return self.attrs.get(keys.STUDY_FILE)

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
    def is_sibling(self) -> bool:
        """A `.verify` or `.baseline` sibling: runs queued by name only, no failure limit."""
        return keys.VERIFY_OF in self.attrs or keys.BASELINE_OF in self.attrs

    @property
    def infeasible_limit(self) -> int:
        """Infeasible trials replaced at most; then no new trial starts (a space mostly outside
        its budget would otherwise sample for ever)."""
        return max(10, 2 * (self.n_trials or DEFAULT_N))

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

    def export_best(self, trial: FrozenTrial | None = None) -> dict[str, Any]:
        """The winning trial (or `trial`) as a runnable document: value, trial number, params
        and full config."""
        best = trial or self.best_trial
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

    # In words (kdsweep.service.sweep_text).
    def best_line(self) -> str:
        return sweep_text.best_line(self)

    def progress_line(self, c: Counts | None = None) -> str:
        return sweep_text.progress_line(self, c)

    def summary_table(self, top: int = 5) -> str:
        return sweep_text.summary_table(self, top)

    def last_activity(self) -> datetime.datetime | None:
        return sweep_text.last_activity(self)

    def summary(self) -> dict[str, Any]:
        return sweep_text.summary(self)

    def status(self) -> dict[str, Any]:
        return sweep_text.status(self)

    def status_text(self) -> str:
        return sweep_text.status_text(self)

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
        return siblings.find(self, suffix)

    def make_sibling(self, suffix: str) -> Sweep:
        return siblings.make(self, suffix)

    def verify_sibling(self, top: int, seeds: Sequence[int]) -> tuple[Sweep, int]:
        """`<sweep>.verify` with one waiting run per (top config, seed): see siblings.verify."""
        return siblings.verify(self, top, seeds)

    def queue_verification(self, runs: Sequence[tuple[Mapping[str, Any], int, int]]) -> int:
        """Queue (params, source trial, seed) runs in `<sweep>.verify`: see siblings.queue."""
        return siblings.queue(self, runs)


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
