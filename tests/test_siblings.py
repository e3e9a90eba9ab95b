"""Sibling studies (`.verify`, `.baseline`): a failed run never stops them for good, also in
databases written by kdsweep 0.2.0 — ask/tell, no model."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.service import baseline, keys
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep

TINY_KD = Path(__file__).parent / "studies" / "tiny_kd.py"
FIXTURE = Path(__file__).parent / "fixtures" / "kdsweep-0.2.0.db"  # see make_kdsweep_0_2_0.py


@pytest.fixture(scope="module")
def spec() -> studies.StudySpec:
    return studies.load(str(TINY_KD))


@pytest.fixture()
def storage(tmp_path: Path):
    return open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=False)


def run_all(sibling: Sweep, spec: studies.StudySpec, fail: set[tuple] = frozenset()) -> list[tuple]:
    """Run every run the sibling lets a worker take; those whose (source, seed) is in `fail`
    fail. Returns the (source, seed) of each run taken."""
    worker = Sweep.join(sibling._storage, sibling.name, spec)
    taken = []
    while (tid := worker.pop()) is not None or (worker.top_up() and (tid := worker.pop()) is not None):
        trial = worker.start(tid)
        key = (trial.user_attrs.get(keys.VERIFY_SOURCE), trial.user_attrs.get(keys.VERIFY_SEED))
        taken.append(key)
        if key in fail:
            worker.fail(tid, "OutOfMemoryError: CUDA out of memory")
        else:
            worker.tell(trial, 0.5)
    return taken


def with_trials(sweep: Sweep, values: list[float]) -> Sweep:
    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
             "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
    for i, value in enumerate(values):
        sweep.study.add_trial(optuna.create_trial(
            value=value, params={"kd.alpha": 0.1 * (i + 1), "kd.temperature": 2.0 + i},
            distributions=dists, user_attrs={keys.TRAIN_SEED: 0}))
    return sweep


def test_a_failed_verification_run_does_not_stop_the_others_and_is_queued_again(
        spec: studies.StudySpec, storage) -> None:
    sweep = with_trials(Sweep.create(storage, spec, "quick", "kd", 5), [0.7, 0.6])
    sibling, _ = sweep.verify_sibling(2, [1000, 1001])
    taken = run_all(sibling, spec, fail={(0, 1000)})
    assert len(taken) == 4  # the other three ran after the failure
    c = sibling.counts()
    assert (c.complete, c.failed, c.waiting) == (3, 1, 0)  # and no sampled filler took its place
    sibling, _ = sweep.verify_sibling(2, [1000, 1001])  # the next --verify queues it again ...
    assert run_all(sibling, spec) == [(0, 1000)]  # ... and it runs
    done = {(t.user_attrs[keys.VERIFY_SOURCE], t.user_attrs[keys.VERIFY_SEED])
            for t in sibling.trials(TrialState.COMPLETE)}
    assert done == {(s, seed) for s in (0, 1) for seed in (1000, 1001)}


def test_a_failed_reference_run_is_queued_again_by_the_next_launch(spec: studies.StudySpec, storage) -> None:
    sweep = Sweep.create(storage, spec, "quick", "kd", 5)
    ref = baseline.prepare(sweep)
    assert run_all(ref, spec, fail={(None, 0)}) == [(None, 0)]
    baseline.prepare(sweep)  # what the next launch does
    assert run_all(ref, spec) == [(None, 0)]
    assert baseline.result(sweep) is not None


def test_a_database_of_kdsweep_0_2_0_resumes_its_stuck_siblings(spec: studies.StudySpec, tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    storage = open_storage(f"sqlite:///{db}", heartbeat=False)
    sweep = Sweep.join(storage, "tiny_kd", spec)
    # Its verify sibling stored a failure limit of 0 and one failed run: that run is queued
    # again by the next --verify and runs, with the three that were waiting behind it.
    sibling, _ = sweep.verify_sibling(2, [1000, 1001])
    assert len(run_all(sibling, spec)) == 4
    assert len(sibling.trials(TrialState.COMPLETE)) == 4
    # Its reference run failed the same way: the next launch queues it again, and it runs.
    baseline.prepare(sweep)
    assert len(run_all(baseline.find(sweep), spec)) == 1
    assert baseline.result(sweep) is not None
