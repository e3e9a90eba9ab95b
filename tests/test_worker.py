"""The worker loop, in process, with objectives that train nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.service import space as sp
from kdsweep.service import spec as studies
from kdsweep.service.objective import Objective
from kdsweep.service.storage import StorageError, open_storage
from kdsweep.service.sweep import Sweep
from kdsweep.service.worker import run_worker

TINY = Path(__file__).parent / "studies" / "tiny.py"


@dataclass
class Scripted(Objective):
    """Samples like the real objective, then does what `behaviour` says instead of training."""

    behaviour: str = "ok"

    def __call__(self, trial: optuna.Trial) -> float:
        params = sp.sample(trial, self.study.space_for(self.preset))
        trial.report(params["optim.lr"], 1)
        if self.behaviour == "boom":
            raise RuntimeError("boom")
        if self.behaviour == "outage":
            raise StorageError("the storage did not answer set_trial_intermediate_value after 12 retries.")
        return params["optim.lr"]


def setup(tmp_path: Path, behaviour: str, n: int, **kwargs) -> tuple[Sweep, Objective]:
    spec = studies.load(str(TINY))
    storage = open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    Sweep.create(storage, spec, "quick", "tiny", n, seed=0, **kwargs)
    objective = Scripted(spec, "quick", {"device": "cpu"}, tmp_path / "artifacts", behaviour=behaviour)
    return Sweep.join(storage, "tiny", spec), objective


def test_a_worker_finishes_exactly_n_with_distinct_points(tmp_path: Path) -> None:
    sweep, objective = setup(tmp_path, "ok", 6)
    summary = run_worker(sweep, objective)
    assert (summary.ran, summary.complete, summary.failed) == (6, 6, 0)
    trials = sweep.trials(TrialState.COMPLETE)
    assert len(trials) == 6 and len({t.params["optim.lr"] for t in trials}) == 6


def test_the_worker_stops_taking_trials_once_the_failure_limit_is_passed(tmp_path: Path) -> None:
    sweep, objective = setup(tmp_path, "boom", 8, max_failures=1)
    summary = run_worker(sweep, objective)
    # One failure is allowed and replaced; the second passes the limit: no new trial starts.
    assert (summary.ran, summary.failed) == (2, 2)
    c = sweep.counts()
    assert c.failed == 2 and c.running == 0 and c.complete == 0


def test_a_storage_outage_mid_trial_is_never_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "2")
    sweep, objective = setup(tmp_path, "outage", 2)
    with pytest.raises(StorageError):
        run_worker(sweep, objective)  # the CLI turns this into one sentence and exit 1
    c = sweep.counts()
    assert (c.failed, c.running) == (0, 1)  # nothing could be written; the trial is left running
    time.sleep(3)  # its heartbeat has stopped: once the grace period is over ...
    assert sweep.reap() == 1  # ... any worker re-queues it, as for a dead worker
    c = sweep.counts()
    assert (c.failed, c.requeued, c.running) == (0, 1, 0)
