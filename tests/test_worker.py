"""The worker loop, in process, with objectives that train nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.service import keys
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
    calls: int = 0

    def __call__(self, trial: optuna.Trial) -> float:
        params = sp.sample(trial, self.study.space_for(self.preset))
        trial.report(params["optim.lr"], 1)
        if self.behaviour == "infeasible":
            self.calls += 1
            if self.calls > 200:
                raise RuntimeError("infeasible trials replaced for ever")
            trial.set_user_attr(keys.INFEASIBLE, "its choices exceed the budget")
            raise optuna.TrialPruned("infeasible")
        if self.behaviour == "boom":
            raise RuntimeError("boom")
        if self.behaviour == "interrupt":
            from kdsweep.service.worker import Interrupted

            raise Interrupted()
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


def test_an_interrupted_trial_is_counted_as_requeued(tmp_path: Path) -> None:
    sweep, objective = setup(tmp_path, "interrupt", 2)
    summary = run_worker(sweep, objective)
    assert (summary.ran, summary.requeued, summary.failed, summary.complete) == (1, 1, 0, 0)
    c = sweep.counts()
    assert (c.requeued, c.failed, c.running) == (1, 0, 0)


# A worker whose trial, while running, gets a first signal, and a second one delivered at the
# K-th profiling event inside the first signal's handler (every call, return and C call there:
# each moment of the handler, the inside of any lock it takes included). Prints one line per K.
SECOND_SIGNAL = """
import signal, sys
from dataclasses import dataclass
import optuna
from optuna.trial import TrialState
from kdsweep.service import space as sp, spec as studies
from kdsweep.service.objective import Objective
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep
from kdsweep.service.worker import run_worker

spec = studies.load(sys.argv[2])
storage = open_storage(sys.argv[1])
Sweep.create(storage, spec, "quick", "tiny", 1, seed=0)
events = {"k": 0, "seen": 0, "handler": None}

def profile(frame, event, arg):
    code, f = events["handler"], frame
    while f is not None and f.f_code is not code:
        f = f.f_back
    if f is None:
        return
    events["seen"] += 1
    if events["seen"] == events["k"]:
        signal.raise_signal(signal.SIGTERM)  # the second signal, right here

@dataclass
class SignalledTwice(Objective):
    def __call__(self, trial):
        sp.sample(trial, self.study.space_for(self.preset))
        events["handler"] = signal.getsignal(signal.SIGINT).__code__
        sys.setprofile(profile)
        try:
            signal.raise_signal(signal.SIGINT)  # the first signal (Ctrl-C)
        finally:
            sys.setprofile(None)
        return 0.5

objective = SignalledTwice(spec, "quick", {"device": "cpu"}, ".")
for k in range(1, 200):
    events.update(k=k, seen=0)
    summary = run_worker(Sweep.join(storage, "tiny", spec), objective)
    c = Sweep.load(storage, "tiny").counts()
    print(k, events["seen"], summary.interrupted, c.requeued, c.running, c.waiting, flush=True)
    if events["seen"] < k:  # every moment of the handler had its second signal
        break
"""


def test_a_second_signal_inside_the_first_handler_never_hangs_the_worker(tmp_path: Path) -> None:
    import subprocess
    import sys

    try:
        run = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, f"sqlite:///{tmp_path / 's.db'}", str(TINY)],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the worker hung after {(exc.stdout or b'').decode().splitlines()[-1:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [[int(x) if x.isdigit() else x for x in line.split()] for line in run.stdout.splitlines()]
    assert len(lines) >= 2 and lines[-1][1] < lines[-1][0]  # every moment was tried
    for k, (_, _, interrupted, requeued, running, waiting) in enumerate(lines, 1):
        # Each run left at once, its trial re-queued: k re-queued attempts, one waiting copy.
        assert (interrupted, requeued, running, waiting) == ("True", k, 0, 1), lines


# A worker whose main thread never lets go of its trial once asked to stop (stuck: here its
# signal handlers run as usual, then swallow the interrupt they raise, inside the handler, so no
# bytecode between two sleeps can let it escape; in life, a deadlock).
STUCK = """
import signal, sys, time
from dataclasses import dataclass
from kdsweep.service import space as sp, spec as studies
from kdsweep.service.objective import Objective
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep
from kdsweep.service.worker import run_worker

@dataclass
class Stuck(Objective):
    def __call__(self, trial):
        sp.sample(trial, self.study.space_for(self.preset))
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, swallowing(signal.getsignal(s)))
        print("running", flush=True)
        while True:
            time.sleep(0.1)

def swallowing(handler):
    def swallow(signum, frame):
        try:
            handler(signum, frame)
        except KeyboardInterrupt:
            pass
    return swallow

spec = studies.load(sys.argv[2])
run_worker(Sweep.join(open_storage(sys.argv[1]), "tiny", spec), Stuck(spec, "quick", {"device": "cpu"}, "."))
"""


def test_a_worker_stuck_after_a_stop_signal_lets_its_trial_go(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "3")
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = studies.load(str(TINY))
    Sweep.create(open_storage(url), spec, "quick", "tiny", 1, seed=0)
    proc = subprocess.Popen([sys.executable, "-c", STUCK, url, str(TINY)], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)  # one grace period after the signal, it gives up
        except subprocess.TimeoutExpired:
            pytest.fail("a worker stuck after SIGTERM kept running (and its trial's heartbeat beating)")
    finally:
        if proc.poll() is None:
            proc.kill()
    from pgcluster import wait_until

    sweep = Sweep.join(open_storage(url), "tiny", spec)
    # Its heartbeat stopped with it: once a grace period has passed (judged on the database's
    # clock, whole seconds on SQLite), any worker re-queues the trial.
    assert wait_until(sweep.reap, 20, 0.5, "the stuck worker's trial to be re-queued") == 1
    c = sweep.counts()
    assert (c.running, c.requeued, c.waiting, c.failed) == (0, 1, 1, 0)


def test_a_space_of_infeasible_points_stops_after_a_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sweep, objective = setup(tmp_path, "infeasible", 3)
    summary = run_worker(sweep, objective)
    assert summary.failed == 0  # it stopped before sampling for ever
    limit = sweep.infeasible_limit
    assert summary.ran == limit + 1 and summary.pruned == limit + 1 and summary.failed == 0
    assert "were infeasible" in caplog.text and "narrow the search space" in caplog.text
    assert sweep.pop() is None
