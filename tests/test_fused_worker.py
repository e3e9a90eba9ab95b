"""`kdsweep worker --fuse K` (kdsweep/service/fused_worker.py): K trials per fused group, each
reported to its own Optuna trial; SIGTERM and SIGKILL re-queue all K, and another worker
finishes them. Study: tests/studies/tiny_kd.py (KD between small MLPs, real Fashion-MNIST)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from pgcluster import wait_until

from kdsweep.service import keys
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep

TINY_KD = Path(__file__).resolve().parent / "studies" / "tiny_kd.py"
TINY = Path(__file__).resolve().parent / "studies" / "tiny.py"
HEARTBEAT, GRACE = 1, 3


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", str(HEARTBEAT))
    monkeypatch.setenv("KDSWEEP_GRACE", str(GRACE))


def create(url: str, preset: str, n: int) -> Sweep:
    return Sweep.create(open_storage(url), studies.load(str(TINY_KD)), preset, "tiny_kd", n, seed=0)


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny_kd", storage=open_storage(url, heartbeat=False))


def start_worker(tmp: Path, url: str, index: int, fuse: int) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"worker-{index}.log"
    env = {**os.environ, "KDSWEEP_STORAGE": url, "KDSWEEP_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "KDSWEEP_HEARTBEAT": str(HEARTBEAT), "KDSWEEP_GRACE": str(GRACE)}
    cmd = [sys.executable, "-m", "kdsweep", "worker", str(TINY_KD), "--device", "cpu", "--no-tensorboard",
           "--artifacts", str(tmp / "artifacts"), "--worker-index", str(index), "--fuse", str(fuse)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, log


def all_running_and_reporting(url: str, k: int):
    trials = load(url).get_trials(states=(TrialState.RUNNING,))
    return len(trials) == k and all(t.intermediate_values for t in trials) and trials


def test_fused_worker_reports_each_trial_to_its_own(tmp_path: Path, fmnist_dir: Path) -> None:
    from kdsweep.service.fused_worker import run_fused_worker
    from kdsweep.service.objective import Objective

    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    create(url, "quick", 5)
    spec = studies.load(str(TINY_KD))
    objective = Objective(spec, "quick", {"device": "cpu", "threads": 1}, tmp_path / "artifacts")
    summary = run_fused_worker(Sweep.join(open_storage(url), "tiny_kd", spec), objective, 3)
    study = load(url)
    assert summary.complete == 5 and Sweep(study).counts().finished == 5
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len({(t.params["kd.alpha"], t.params["kd.temperature"]) for t in trials}) == 5
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2] and t.value == t.intermediate_values[2]
        assert t.user_attrs[keys.FUSED]["slots"] == 3 and t.user_attrs[keys.CONFIG]["kd"]["alpha"] == t.params["kd.alpha"]
        assert keys.SAMPLER_SEED in t.user_attrs  # each member's Trial came from Sweep.start
    joined = sorted(t.user_attrs[keys.FUSED]["joined_step"] for t in trials)
    assert joined[:3] == [0, 0, 0] and joined[3] > 0  # three together, then the freed slots refilled


def test_a_verification_run_has_the_same_record_from_a_plain_and_a_fused_worker(
        tmp_path: Path, fmnist_dir: Path) -> None:
    # One trial lifecycle: the fused worker trains each member with the run's own seed, scores
    # the test set, never prunes it and stores every attribute the plain worker stores.
    from kdsweep.service.fused_worker import run_fused_worker
    from kdsweep.service.objective import Objective
    from kdsweep.service.requeue import AsOrigin
    from kdsweep.service.worker import run_worker

    spec = studies.load(str(TINY_KD))
    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
             "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
    records = {}
    for how in ("plain", "fused"):
        storage = open_storage(f"sqlite:///{tmp_path / how}.db")
        sweep = Sweep.create(storage, spec, "quick", "tiny_kd", 3, seed=0)
        sweep.study.add_trial(optuna.create_trial(value=0.7, params={"kd.alpha": 0.5, "kd.temperature": 4.0},
                                                  distributions=dists, user_attrs={keys.TRAIN_SEED: 0}))
        sibling, _ = sweep.verify_sibling(1, [1000, 1001])
        worker = Sweep.join(storage, sibling.name, spec)
        worker.study.pruner = AsOrigin(optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all it is asked
        objective = Objective(spec, "quick", {"device": "cpu", "threads": 1}, tmp_path / how, keep_weights=0)
        summary = run_worker(worker, objective) if how == "plain" else run_fused_worker(worker, objective, 2)
        assert summary.complete == 2, summary
        records[how] = sibling.trials(TrialState.COMPLETE)
    stored = {}
    for how, runs in records.items():
        assert len(runs) == 2
        for t in runs:
            asked = t.user_attrs[keys.VERIFY_SEED]
            assert t.user_attrs[keys.CONFIG]["seed"] == t.user_attrs[keys.TRAIN_SEED] == asked, how
            assert t.user_attrs[keys.CONFIG]["evaluate_test"] and t.user_attrs[keys.TEST_ACC] is not None
            assert t.user_attrs[keys.VAL_N] == 500 and t.user_attrs[keys.FLOPS] > 0
            assert sorted(t.intermediate_values) == [1, 2]  # never pruned
        stored[how] = {frozenset(t.user_attrs) - {keys.FUSED} for t in runs}
    assert stored["plain"] == stored["fused"] and len(stored["plain"]) == 1
    assert {t.user_attrs[keys.VERIFY_SEED] for t in records["fused"]} == {1000, 1001}


def test_fuse_refuses_a_study_with_other_parameters(tmp_path: Path) -> None:
    from kdsweep.cli import main

    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    result = CliRunner().invoke(main, ["launch", str(TINY), "--preset", "quick", "--storage", url,
                                       "--fuse", "2", "--device", "cpu"])
    assert result.exit_code == 2 and "has no kd settings" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "sweep.db").exists()  # nothing stored


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_fused_worker_requeues_all_its_trials(tmp_path: Path, fmnist_dir: Path, how: str) -> None:
    k = 3
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    create(url, "slow", k)
    victim, log_v = start_worker(tmp_path, url, 0, fuse=k)
    try:
        before = wait_until(lambda: all_running_and_reporting(url, k), 120, 0.1, "3 fused trials to report")
        victim.send_signal(getattr(signal, how))
        victim.wait(timeout=60)
        if how == "SIGTERM":
            assert victim.returncode == 130, log_v.read_text()[-3000:]
            assert Sweep(load(url)).counts().waiting == k  # re-queued by the worker itself
        rescuer, log_r = start_worker(tmp_path, url, 1, fuse=2)
        rescuer.wait(timeout=240)
    finally:
        for p in [victim] + ([rescuer] if "rescuer" in locals() else []):
            if p.poll() is None:
                p.kill()
    assert rescuer.returncode == 0, log_r.read_text()[-3000:]
    study = load(url)
    c = Sweep(study).counts()
    assert (c.complete, c.running, c.waiting, c.failed) == (k, 0, 0, 0), c  # re-queues are no failures
    for old in before:
        attempt = study.trials[old.number]
        assert attempt.state == TrialState.FAIL and keys.REQUEUED in attempt.user_attrs
        retries = [t for t in study.trials if t.system_attrs.get(keys.ORIGIN) == old.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == old.params
        assert sorted(retries[0].intermediate_values) == list(range(1, 7))


def test_launch_gives_its_workers_fuse_and_threads(tmp_path: Path, fmnist_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.cli import main
    from kdsweep.service import launch

    seen: dict = {}

    def fake_run(sweep, args, plans, echo, timeout=None, **kwargs):
        seen.update(args=args, plans=plans)
        raise RuntimeError("workers not started in this test")

    monkeypatch.setattr(launch, "run", fake_run)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    CliRunner().invoke(main, ["launch", str(TINY_KD), "--preset", "quick", "--storage", url, "--device", "cpu",
                              "--n-trials", "2", "--workers", "2", "--threads", "3", "--fuse", "4"])
    args = seen["args"]
    assert args[args.index("--fuse") + 1] == "4"
    assert [(p.env["KDSWEEP_THREADS"], p.env["OMP_NUM_THREADS"]) for p in seen["plans"]] == [("3", "3")] * 2
