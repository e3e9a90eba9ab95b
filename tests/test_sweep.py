"""The Sweep object: exact N, slots, re-queues, siblings and answers — ask/tell, no model."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from pgcluster import machine_database

from kdsweep import cli
from kdsweep.service import keys
from kdsweep.service import space as sp
from kdsweep.service import spec as studies
from kdsweep.service.spec import StudyError
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import (
    DIED,
    INTERRUPTED,
    OUTAGE,
    WINDOW,
    Sweep,
    counted,
    sampler_seed,
)

FIXTURE = Path(__file__).parent / "fixtures" / "kdsweep-0.1.0.db"
TINY = Path(__file__).parent / "studies" / "tiny.py"


@pytest.fixture(scope="module")
def q1() -> studies.StudySpec:
    return studies.load("q1")


@pytest.fixture(scope="module")
def q2() -> studies.StudySpec:
    return studies.load("q2")


@pytest.fixture()
def storage(tmp_path: Path):
    return open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=False)


def drain(sweep: Sweep, value: float = 0.5) -> list[int]:
    """Run every slot as a worker would (pop, top up, tell), each trial worth `value`."""
    numbers = []
    while (tid := sweep.pop()) is not None or (sweep.top_up() and (tid := sweep.pop()) is not None):
        trial = sweep.start(tid)
        numbers.append(trial.number)
        sweep.tell(trial, value)
    return numbers


def complete(sweep: Sweep, params: dict, value: float, config: dict | None = None) -> None:
    """Add a COMPLETE trial with float `params` of the sweep's space and a stored config."""
    space = {p.name: p for p in sweep.spec.space_for(sweep.preset, sweep.overrides)}
    dists = {k: optuna.distributions.FloatDistribution(space[k].low, space[k].high, log=space[k].log)
             for k in params}
    sweep.study.add_trial(optuna.create_trial(value=value, params=params, distributions=dists,
                                              user_attrs={keys.CONFIG: config or {}, keys.TRAIN_SEED: 0}))


# ---------------------------------------------------------------- exact N


def test_create_sets_n_and_makes_slots_a_few_at_a_time(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, q2, "smoke", "kd", 6, seed=1, overrides={"epochs": 2})
    assert sweep.definition == q2.definition("smoke", {"epochs": 2})
    assert sweep.schema == keys.SCHEMA_VERSION
    c = sweep.counts()
    assert (c.waiting, c.unmade, len(sweep.trials())) == (6, 6, 0)  # workers make the slots
    assert sweep.top_up() == WINDOW and sweep.top_up() == 0  # a few at a time
    c = sweep.counts()
    assert (c.waiting, c.unmade, len(sweep.trials())) == (6, 6 - WINDOW, WINDOW)
    Sweep.create(storage, q2, "smoke", "kd", 6, overrides={"epochs": 2})
    assert len(sweep.trials()) == WINDOW and sweep.counts().waiting == 6  # resumed, nothing added
    Sweep.create(storage, q2, "smoke", "kd", 9, overrides={"epochs": 2})
    assert sweep.counts().waiting == 9  # a larger N: the study runs more


def test_slots_are_made_as_trials_start_and_a_failure_is_replaced(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.join(storage, Sweep.create(storage, q2, "smoke", "kd", 6, max_failures=1).name, q2)
    numbers = []
    while (tid := sweep.pop()) is not None or (sweep.top_up() and (tid := sweep.pop()) is not None):
        trial = sweep.start(tid)
        numbers.append(trial.number)
        if trial.number in (1, 6):  # trial 1 fails, and so does its replacement
            sweep.fail(tid, "RuntimeError: boom")
        else:
            sweep.tell(trial, 0.5)
        assert len(sweep.trials(TrialState.WAITING)) <= WINDOW
    c = sweep.counts()
    # 6 slots, 2 failed: the first is replaced, the second is over the limit and is not.
    assert (c.complete, c.failed, c.waiting, c.running) == (5, 2, 0, 0)
    assert numbers == list(range(7))


def test_once_the_failure_limit_is_passed_no_new_trial_starts(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, q2, "smoke", "kd", 6, max_failures=0)
    sweep.top_up()
    sweep.fail(sweep.pop(), "RuntimeError: boom")  # one failure: beyond a limit of 0
    assert sweep.counts().waiting > 0  # slots are still waiting ...
    assert sweep.pop() is None  # ... but none starts


TOP_UP_WORKER = """
import sys
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep
sweep = Sweep.load(open_storage(sys.argv[1], heartbeat=False), "race")
while (tid := sweep.pop()) is not None or (sweep.top_up() and (tid := sweep.pop()) is not None):
    sweep.tell(sweep.start(tid), 1.0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_on_one_database_never_make_more_than_n(q2: studies.StudySpec, tmp_path: Path, backend: str) -> None:
    # Four processes race to make and take slots; the study lock keeps them to exactly N.
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite"
               else stack.enter_context(machine_database()))
        Sweep.create(open_storage(url, heartbeat=False), q2, "smoke", "race", 40)
        procs = [subprocess.Popen([sys.executable, "-c", TOP_UP_WORKER, url]) for _ in range(4)]
        assert [p.wait(timeout=300) for p in procs] == [0] * 4
        sweep = Sweep.load(open_storage(url, heartbeat=False), "race")
        assert len(sweep.trials()) == 40
        assert all(t.state == TrialState.COMPLETE for t in sweep.trials())


def test_a_different_definition_is_refused_and_nothing_changes(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, q2, "smoke", "kd", 3)
    before = (sweep.attrs, len(sweep.trials()))
    for preset, overrides in (("paper", None), ("smoke", {"epochs": 1})):
        with pytest.raises(StudyError, match="different definition"):
            Sweep.create(storage, q2, preset, "kd", 9, overrides=overrides)
    other = dataclasses.replace(q2, space=[dataclasses.replace(q2.space[0], high=0.5), q2.space[1]])
    with pytest.raises(StudyError, match=r"different definition \(space.kd.alpha.high"):
        sweep.check(other)
    assert (Sweep.load(storage, "kd").attrs, len(sweep.trials())) == before
    optuna.create_study(study_name="foreign", storage=storage)
    with pytest.raises(StudyError, match="not created by kdsweep"):
        Sweep.create(storage, q2, "smoke", "foreign", 3)


def test_infeasible_requeued_and_failed_trials_do_not_count(storage) -> None:
    study = optuna.create_study(study_name="c", storage=storage, direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(value=0.5, params={"x": 0.1}, distributions=dist))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"x": 0.2}, distributions=dist,
                                        intermediate_values={1: 0.1}))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"x": 0.3}, distributions=dist,
                                        user_attrs={keys.INFEASIBLE: "too big"}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.4}, distributions=dist,
                                        user_attrs={keys.FAIL_REASON: "RuntimeError: boom"}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist,
                                        user_attrs={keys.REQUEUED: INTERRUPTED,
                                                    keys.FAIL_REASON: "interrupted; re-queued"}))
    c = Sweep(study).counts()
    assert (c.complete, c.pruned, c.infeasible, c.failed, c.requeued, c.finished) == (1, 1, 1, 1, 1, 2)
    assert [counted(t) for t in study.get_trials()] == [True, True, False, False, False]


def test_a_requeued_attempt_is_never_a_failure(q2: studies.StudySpec, storage) -> None:
    # One rule: interrupts and dead workers re-queue; a study with a failure limit of 0 goes on.
    sweep = Sweep.join(storage, Sweep.create(storage, q2, "smoke", "kd", 3, max_failures=0).name, q2)
    for reason in (INTERRUPTED, DIED, OUTAGE, DIED, INTERRUPTED):
        sweep.top_up()
        assert sweep.requeue(sweep.pop(), reason)
    assert all(t.user_attrs[keys.REQUEUED] for t in sweep.trials(TrialState.FAIL))
    c = sweep.counts()
    assert (c.failed, c.requeued, c.target) == (0, 5, 3)
    assert drain(sweep) and sweep.counts().complete == 3


# ---------------------------------------------------------------- siblings, resumes, re-queues


def test_a_verify_sibling_runs_top_times_seeds_not_the_sweeps_n(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, q2, "smoke", "kd", 50)
    for i, value in enumerate((0.7, 0.6, 0.5)):
        complete(sweep, {"kd.alpha": 0.1 * (i + 1), "kd.temperature": 2.0 + i}, value)
    sibling, n = sweep.verify_sibling(2, [1000, 1001, 1002])
    assert n == 6 and sibling.n_trials == 6 and sibling.verifies == "kd"
    ran = drain(Sweep.join(storage, sibling.name, q2))
    assert len(ran) == 6  # exactly the runs asked for: no sampled filler up to the sweep's 50
    assert {(t.user_attrs[keys.VERIFY_SOURCE], t.user_attrs[keys.VERIFY_SEED]) for t in sibling.trials()} == {
        (s, seed) for s in (0, 1) for seed in (1000, 1001, 1002)}
    sibling, n = sweep.verify_sibling(3, [1000, 1001, 1002])  # asking for more adds only the new ones
    assert sibling.n_trials == 9 and len(drain(Sweep.join(storage, sibling.name, q2))) == 3


def test_resuming_without_n_keeps_the_stored_n(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    runner = CliRunner()
    made = runner.invoke(cli.main, ["create", "q2", "--preset", "smoke", "-n", "200", "--storage", url])
    assert made.exit_code == 0, made.output
    again = runner.invoke(cli.main, ["create", "q2", "--preset", "smoke", "--storage", url])
    assert again.exit_code == 0, again.output
    assert Sweep.load(open_storage(url, heartbeat=False), "q2").n_trials == 200
    fresh = runner.invoke(cli.main, ["create", "q2", "--preset", "smoke", "--storage", url,
                                     "--study-name", "other"])
    assert fresh.exit_code == 0 and Sweep.load(open_storage(url, heartbeat=False), "other").n_trials == 50


def test_a_requeued_trial_keeps_its_enqueued_values_rungs_and_bracket(
        q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.join(storage, Sweep.create(storage, q2, "smoke", "kd", 4).name, q2)
    point = {"kd.alpha": 0.25, "kd.temperature": 4.0}
    sweep.study.enqueue_trial(point, user_attrs={keys.VERIFY_SEED: 1001})
    first = sweep.pop()
    storage.set_trial_system_attr(first, "completed_rung_0", 0.42)  # as successive halving records
    # Interrupted after taking the slot, before sampling: nothing but the enqueued values.
    assert sweep.requeue(first, INTERRUPTED)
    retry_id = sweep.pop()
    retry = sweep.frozen(retry_id)
    assert retry.system_attrs[keys.FIXED_PARAMS] == point
    assert retry.system_attrs["completed_rung_0"] == 0.42
    assert retry.user_attrs[keys.VERIFY_SEED] == 1001
    assert sp.sample(sweep.start(retry_id), q2.space_for("smoke")) == point
    # The pruner judges the retry as its first attempt (Hyperband's bracket is by number).
    seen = []

    class Spy(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            seen.append(trial.number)
            return False

    sweep.study.pruner.inner = Spy()
    trial = optuna.Trial(sweep.study, retry_id)
    trial.report(0.5, 2)
    trial.should_prune()
    assert retry.number != 0 and seen == [0]


def _heartbeat_of(storage, trial_id: int):
    from optuna.storages._rdb import models

    from kdsweep.service.storage.locks import rdb_of

    rdb = rdb_of(storage)
    session = rdb.scoped_session()
    try:
        beat = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        return None if beat is None else beat.heartbeat
    finally:
        session.close()


def test_a_taken_slot_has_its_first_heartbeat_and_a_dead_workers_trial_is_requeued(
        q2: studies.StudySpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "2")
    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}")
    sweep = Sweep.create(storage, q2, "smoke", "kd", 1)
    sweep.top_up()
    lost = sweep.pop()  # taken, then its worker died before the heartbeat thread started
    assert _heartbeat_of(storage, lost) is not None  # beating from the moment it was taken
    assert sweep.reap() == 0  # younger than the grace period
    time.sleep(3)
    assert sweep.reap() == 1
    c = sweep.counts()
    assert (c.running, c.waiting, c.failed, c.requeued) == (0, 1, 0, 1)
    assert sweep.frozen(lost).user_attrs[keys.REQUEUED].startswith("worker died")


def test_taking_a_slot_and_its_first_heartbeat_are_one_transaction(
        q2: studies.StudySpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.storages import RDBStorage

    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "2")
    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}")
    sweep = Sweep.create(storage, q2, "smoke", "kd", 1)
    sweep.top_up()

    def killed(self, trial_id):
        raise RuntimeError("killed between taking the slot and its first heartbeat")

    monkeypatch.setattr(RDBStorage, "record_heartbeat", killed)
    with pytest.raises(RuntimeError, match="killed"):
        sweep.pop()
    monkeypatch.undo()
    fresh = Sweep.load(open_storage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat=False), "kd")
    assert [t.state for t in fresh.trials()] == [TrialState.WAITING]  # neither happened


def test_every_trial_draws_from_its_own_sampler_seed(q2: studies.StudySpec, storage) -> None:
    Sweep.create(storage, q2, "smoke", "kd", 8, seed=0)
    # Two workers that would both have been "worker 0" (two hosts, two launches, a resume):
    a, b = Sweep.join(storage, "kd", q2), Sweep.join(storage, "kd", q2)
    a.top_up()
    space = q2.space_for("smoke")
    ta, tb = a.start(a.pop()), b.start(b.pop())
    pa, pb = sp.sample(ta, space), sp.sample(tb, space)
    assert pa != pb
    assert ta.study.trials[ta.number].user_attrs[keys.SAMPLER_SEED] == sampler_seed(0, ta.number)
    # Reproducible: the same trial number draws the same values from a fresh process's sampler.
    again = optuna.create_study(sampler=q2.sampler(sampler_seed(0, ta.number)))
    assert sp.sample(again.ask(), space) == pa


def test_enqueue_checks_points_against_the_recorded_overrides(q1: studies.StudySpec, storage) -> None:
    widths = {p.name: p for p in q1.space_for("smoke")}["cnn.width"].choices
    for budget in (20_000, 15_000, 10_000):  # a smaller budget keeps fewer widths
        narrowed = {p.name: p for p in q1.space_for("smoke", {"model.budget": budget})}["cnn.width"].choices
        if set(narrowed) < set(widths):
            break
    else:
        pytest.skip("no budget narrows the q1 smoke widths")
    outside = sorted(set(widths) - set(narrowed))[-1]
    sweep = Sweep.create(storage, q1, "smoke", "q1", 4, overrides={"model.budget": budget})
    sweep.spec = q1
    point = {"model.family": "cnn", "optim.lr": 0.01, "cnn.width": outside, "cnn.factorized": False,
             "reg.kind": "none"}
    with pytest.raises(sp.SpaceError):
        sweep.enqueue([point])
    assert sweep.trials() == []  # nothing stored


# ---------------------------------------------------------------- answers


def test_best_export_and_summary(q2: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, q2, "smoke", "kd", 3)
    assert sweep.best_trial is None
    with pytest.raises(StudyError, match="no complete trial"):
        sweep.export_best()
    complete(sweep, {"kd.alpha": 0.5, "kd.temperature": 3.0}, 0.61, {"epochs": 2})
    complete(sweep, {"kd.alpha": 0.9, "kd.temperature": 10.0}, 0.64, {"epochs": 3})
    doc = sweep.export_best()
    assert (doc["trial"], doc["value"], doc["config"], doc["metric"]) == (1, 0.64, {"epochs": 3}, "val_acc")
    assert [t.number for t in sweep.top(5)] == [1, 0]
    assert sweep.summary_table().splitlines()[1].startswith("1 ")
    assert "best 0.6400 (trial 1" in sweep.best_line()


# ---------------------------------------------------------------- studies of kdsweep 0.1


def test_a_study_written_by_kdsweep_0_1_is_read_but_not_resumed(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    url = f"sqlite:///{db}"
    tiny = studies.load(str(TINY))
    sweep = Sweep.load(open_storage(url, heartbeat=False), "tiny")
    assert sweep.schema is None and sweep.counts().complete == 3  # readable
    before = (sweep.attrs, [(t.number, t.state) for t in sweep.trials()])
    with pytest.raises(StudyError, match=r"written by kdsweep 0\.1\.0.*finish it with kdsweep 0\.1\.0"):
        Sweep.join(open_storage(url, heartbeat=False), "tiny", tiny)
    runner = CliRunner()
    status = runner.invoke(cli.main, ["status", "tiny", "--storage", url])
    assert status.exit_code == 0 and "3 complete" in status.output
    best = runner.invoke(cli.main, ["best", "tiny", "--storage", url, "--format", "json"])
    assert best.exit_code == 0 and '"trial": 1' in best.output
    worker = runner.invoke(cli.main, ["worker", str(TINY), "--study-name", "tiny", "--storage", url,
                                      "--device", "cpu"])
    assert worker.exit_code == 2 and "finish it with kdsweep 0.1.0" in worker.output
    assert "Traceback" not in worker.output
    launch = runner.invoke(cli.main, ["launch", str(TINY), "--preset", "quick", "--study-name", "tiny",
                                      "--storage", url, "--device", "cpu"])
    assert launch.exit_code == 2 and "finish it with kdsweep 0.1.0" in launch.output
    after = Sweep.load(open_storage(url, heartbeat=False), "tiny")
    assert (after.attrs, [(t.number, t.state) for t in after.trials()]) == before  # nothing changed


def test_a_create_racing_another_waits_for_its_definition(q2: studies.StudySpec, storage) -> None:
    # Process A has just created the study and is about to record its definition when process B
    # (another `launch`/`create` of the same sweep) loads it: B must not call it foreign.
    import threading

    bare = optuna.create_study(study_name="kd", storage=storage, direction="maximize")
    definition = q2.definition("smoke")

    def record() -> None:
        time.sleep(0.5)
        bare.set_user_attr(keys.DEFINITION, definition)
        bare.set_user_attr(keys.SCHEMA, keys.SCHEMA_VERSION)

    creator = threading.Thread(target=record)
    creator.start()
    sweep = Sweep.create(storage, q2, "smoke", "kd", 4)
    creator.join()
    assert sweep.definition == definition and sweep.n_trials == 4
