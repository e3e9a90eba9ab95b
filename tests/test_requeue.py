"""Re-queues (kdsweep/service/requeue.py): one transaction on every backend, rungs counted
once, and reapers racing a teller on one stale trial — ask/tell, no model."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from pgcluster import machine_database

from kdsweep.service import keys
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import INTERRUPTED, MAX_RETRIES, Sweep

TINY_KD = Path(__file__).parent / "studies" / "tiny_kd.py"
FIXTURE = Path(__file__).parent / "fixtures" / "kdsweep-0.2.0.db"


@pytest.fixture(scope="module")
def spec() -> studies.StudySpec:
    return studies.load(str(TINY_KD))


@contextlib.contextmanager
def database(tmp_path: Path, backend: str):
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'r.db'}"
    else:
        with machine_database() as url:
            yield url


# A worker re-queuing a trial, killed (SIGKILL) or failing between the FAIL and the copy.
KILLED_REQUEUE = """
import os, signal, sys
import optuna
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import INTERRUPTED, Sweep

def die(*args, **kwargs):
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("killed between the FAIL and the copy")

sweep = Sweep.join(open_storage(sys.argv[1], heartbeat=False), "kd", studies.load(sys.argv[3]))
trial_id = sweep.trials(optuna.trial.TrialState.RUNNING)[0]._trial_id
optuna.storages.RDBStorage._create_new_trial = die
sweep.requeue(trial_id, INTERRUPTED)
"""


@pytest.mark.parametrize("how", ["kill", "exception"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_requeue_killed_between_its_writes_leaves_neither(
        spec: studies.StudySpec, tmp_path: Path, backend: str, how: str) -> None:
    with database(tmp_path, backend) as url:
        sweep = Sweep.create(open_storage(url, heartbeat=False), spec, "quick", "kd", 2)
        sweep.top_up()
        taken = sweep.pop()
        run = subprocess.run([sys.executable, "-c", KILLED_REQUEUE, url, how, str(TINY_KD)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and ("Traceback" in run.stderr) == (how == "exception"), run.stderr[-2000:]
        after = Sweep.load(open_storage(url, heartbeat=False), "kd")
        states = {t._trial_id: t.state for t in after.trials()}
        assert states[taken] == TrialState.RUNNING and keys.REQUEUED not in after.frozen(taken).user_attrs
        assert len(states) == len(sweep.trials())  # no copy either
        # Both, when nothing interrupts it.
        assert after.requeue(taken, INTERRUPTED)
        again = Sweep.load(open_storage(url, heartbeat=False), "kd")
        assert again.frozen(taken).state == TrialState.FAIL and again.counts().requeued == 1
        (copy,) = [t for t in again.trials() if t.system_attrs.get(keys.ORIGIN) == again.frozen(taken).number]
        assert copy.state == TrialState.WAITING


def take(sweep: Sweep, retry: bool = False) -> int:
    """A new slot's id (or, with `retry`, the waiting retry's), taken as a worker takes it."""
    if not retry:
        sweep.study.enqueue_trial({})
    trial_id = sweep.pop()  # the one waiting trial
    assert trial_id is not None
    return trial_id


def competing(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Every rung population Optuna's successive halving computes, as it computes it."""
    from optuna.pruners import _successive_halving as sh

    seen: list[list[float]] = []
    real = sh._get_competing_values

    def spy(trials, value, rung_key):
        out = real(trials, value, rung_key)
        seen.append(sorted(out))
        return out

    monkeypatch.setattr(sh, "_get_competing_values", spy)
    return seen


PRUNERS = {
    "successive-halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=2),
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_requeue_leaves_the_rung_population_as_it_was(
        spec: studies.StudySpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pruner: str) -> None:
    seen = competing(monkeypatch)
    populations = {}
    for requeued in (False, True):
        storage = open_storage(f"sqlite:///{tmp_path / f'{requeued}.db'}", heartbeat=False)
        # Named so that Hyperband files trials 5, 6 and 7 (the interrupted one, its retry and
        # the probe) in one bracket: a retry counted there as a second trial would show.
        sweep = Sweep.join(storage, Sweep.create(storage, spec, "quick", "rung", 8).name, spec)
        sweep.study.pruner.inner = PRUNERS[pruner]()  # behind kdsweep's view (Sweep.join)
        sweep.study.add_trial(optuna.create_trial(value=0.9, intermediate_values={1: 0.5, 4: 0.9}))
        for value in (0.4, 0.6, 0.7, 0.3, 0.5):
            trial = sweep.start(take(sweep))
            for step in (1, 2):  # files the trial in its bracket's rungs
                trial.report(value + step / 100, step)
                trial.should_prune()
        if requeued:  # the last one is interrupted after its rungs, and its retry comes back
            sweep.requeue(trial._trial_id, INTERRUPTED)
            trial = sweep.start(take(sweep, retry=True))
        else:  # a trial that failed for good in the copy's place keeps the numbers alike
            sweep.study.add_trial(optuna.create_trial(state=TrialState.FAIL))
        trial.report(0.6, 4)
        trial.should_prune()
        seen.clear()
        probe = sweep.start(take(sweep))
        for step in (1, 2, 4):
            probe.report(0.55, step)
            probe.should_prune()
        populations[requeued] = list(seen)
    assert populations[True] == populations[False] and populations[True]


def test_rungs_duplicated_by_kdsweep_0_2_0_count_once(spec: studies.StudySpec, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    sweep = Sweep.join(open_storage(f"sqlite:///{db}", heartbeat=False), "tiny_kd", spec)
    holders = [t for t in sweep.trials() if "completed_rung_0" in t.system_attrs]
    assert len(holders) == 2  # the re-queued attempt and its retry: one trial
    seen = competing(monkeypatch)
    sweep.study.pruner.inner = PRUNERS["successive-halving"]()
    probe = optuna.Trial(sweep.study, sweep.study._storage.create_new_trial(sweep.study._study_id))  # a new trial
    probe.report(0.65, 1)
    probe.should_prune()
    assert seen[0] == [0.6, 0.65]  # the one trial in rung 0, and the probe


@pytest.mark.parametrize("branch", ["requeue", "give-up"])
def test_reapers_and_a_teller_racing_on_one_stale_trial_never_crash_or_change_n(
        spec: studies.StudySpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, branch: str) -> None:
    from kdsweep.service import storage as storage_module

    url = f"sqlite:///{tmp_path / 'race.db'}"
    n = 3
    Sweep.create(open_storage(url, heartbeat=False), spec, "quick", "kd", n, max_failures=100)
    # Every RUNNING trial is stale: what a reaper does next is the race under test.
    monkeypatch.setattr(storage_module, "dead_trial_ids", lambda storage, study_id: [
        t._trial_id for t in storage.get_all_trials(study_id, states=(TrialState.RUNNING,))])
    handles = [Sweep.join(open_storage(url, heartbeat=False), "kd", spec) for _ in range(4)]
    teller, reapers = handles[0], handles[1:]
    errors: list[BaseException] = []
    for _ in range(15):
        teller.top_up()
        tid = teller.pop()
        if tid is None:
            break
        trial = teller.start(tid)
        if branch == "give-up":
            teller._storage.set_trial_system_attr(tid, keys.RETRIES, MAX_RETRIES)
        go = threading.Barrier(len(handles))

        def reap(sweep: Sweep, go: threading.Barrier = go) -> None:
            try:
                go.wait()
                sweep.reap()
            except BaseException as exc:  # noqa: BLE001 - any crash fails the test
                errors.append(exc)

        def tell(go: threading.Barrier = go, trial: optuna.Trial = trial) -> None:
            try:
                go.wait()
                teller.tell(trial, 0.5)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # the worker's answer to "re-queued meanwhile": drop its copy
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reap, args=(s,)) for s in reapers] + [threading.Thread(target=tell)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    c = Sweep.load(open_storage(url, heartbeat=False), "kd").counts()
    assert c.target == n and c.running == 0
    assert c.finished + c.waiting == n if branch == "requeue" else c.finished + c.waiting + c.failed >= n
