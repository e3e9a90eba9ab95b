"""Faults done for real: killed workers, a restarted database, Ctrl-C, a crowded SQLite file,
trials that break, and workers from elsewhere.

Workers are real `kdsweep worker` processes (the code a remote host runs) on the tests' own
tiny study (tests/studies/tiny.py: an MLP on 2k real Fashion-MNIST images), with a 1 s
heartbeat so a dead worker is noticed in seconds rather than the default half minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from pgcluster import Cluster, machine_database, pg_cluster, wait_until  # noqa: F401

from kdsweep.service import keys
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
TINY = TESTS / "studies" / "tiny.py"
HEARTBEAT, GRACE = 1, 3
SLOW_EPOCHS = studies.load(str(TINY)).presets["slow"].config.epochs


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", str(HEARTBEAT))
    monkeypatch.setenv("KDSWEEP_GRACE", str(GRACE))


def create(url: str, preset: str, n: int, **kwargs) -> optuna.Study:
    return Sweep.create(open_storage(url), studies.load(str(TINY)), preset, "tiny", n, seed=0, **kwargs).study


def counts(study: optuna.Study):
    return Sweep(study).counts()


def join(url: str, objective) -> Sweep:  # noqa: ANN001
    return Sweep.join(open_storage(url), "tiny", objective.study)


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat=False))


def worker_env(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(KDSWEEP_STORAGE=url, KDSWEEP_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               KDSWEEP_HEARTBEAT=str(HEARTBEAT), KDSWEEP_GRACE=str(GRACE))
    env.update(extra)
    return env


def start_worker(tmp: Path, url: str, index: int, **extra: str) -> tuple[subprocess.Popen, Path]:
    """A `kdsweep worker` process; its log (stdout and stderr) goes to tmp/worker-INDEX.log."""
    log = tmp / f"worker-{index}.log"
    cmd = [sys.executable, "-m", "kdsweep", "worker", str(TINY), "--device", "cpu", "--no-tensorboard",
           "--artifacts", str(tmp / "artifacts"), "--worker-index", str(index)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=worker_env(url, **extra), stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, log


def epochs_logged(log: Path) -> list[tuple[int, int]]:
    """(trial number, epoch) pairs a worker has reported, from its log."""
    # A worker's epoch line: "12:03:41 [w1 t12] epoch 3/6 val_acc 0.8120 ..." (worker, trial).
    return [(int(t), int(e)) for t, e in re.findall(r"\[w\d+ t(\d+)\] epoch (\d+)/\d+ val_acc", log.read_text())]


def finish(procs: list[subprocess.Popen], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("workers did not finish the study in time")


def assert_complete(study: optuna.Study, n: int) -> None:
    """Exactly n finished trials, nothing RUNNING or WAITING, and no origin counted twice."""
    c = counts(study)
    assert (c.finished, c.running, c.waiting) == (n, 0, 0), c
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    origins = [t.system_attrs.get("failed_trial", t.number) for t in finished]
    assert len(set(origins)) == len(origins), f"a trial was counted twice: {origins}"
    for t in finished:  # a retry finished only because its original did not
        if "failed_trial" in t.system_attrs:
            assert study.trials[t.system_attrs["failed_trial"]].state == TrialState.FAIL


# ---------------------------------------------------------------- 1. dead worker


def dead_worker(tmp: Path, url: str) -> None:
    create(url, "slow", 3)
    a, log_a = start_worker(tmp, url, 0)
    b, log_b = start_worker(tmp, url, 1)
    try:
        # Kill worker 0 once it has reported two epochs of a trial that is still running.
        def victim() -> tuple[int, int] | None:
            done = {t.number for t in load(url).get_trials(states=(TrialState.COMPLETE,))}
            live = [(t, e) for t, e in epochs_logged(log_a) if t not in done]
            return live[-1] if live and live[-1][1] >= 2 else None

        number, epoch = wait_until(victim, 90, 0.05, "worker 0 to run two epochs of a trial")
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed_at = time.monotonic()
        before = load(url).trials[number]
        assert before.state == TrialState.RUNNING
        checkpoint = tmp / "artifacts" / "tiny" / "checkpoints" / f"trial-{number}.pt"
        assert checkpoint.exists()
        # The epoch it holds: `epoch`, or the one before when the kill fell between epoch
        # `epoch`'s report (logged) and its checkpoint (written just after, by design).
        import torch

        saved = int(torch.load(checkpoint, weights_only=False)["epoch"])
        assert saved in (epoch - 1, epoch)

        wait_until(lambda: load(url).trials[number].state == TrialState.FAIL, GRACE + 20, 0.1,
                   f"trial {number} of the killed worker to leave RUNNING")
        reaped_after = time.monotonic() - killed_at
        finish([b])
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert b.returncode == 0, log_b.read_text()[-3000:]
    # Noticed within the grace period plus one check (a beat, or a 2 s idle poll), with slack
    # for a loaded CI machine.
    assert reaped_after < GRACE + 8, f"dead trial left RUNNING only after {reaped_after:.1f}s"

    study = load(url)
    assert_complete(study, 3)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    retry = retries[0]
    assert retry.params == before.params
    # Intermediate values of the dead attempt are kept, and the retry adds the rest.
    for e, v in before.intermediate_values.items():
        assert retry.intermediate_values[e] == v
    assert sorted(retry.intermediate_values) == list(range(1, SLOW_EPOCHS + 1))
    # Resumed from the checkpoint, not from scratch: worker 1 ran only the epochs after it.
    text = log_b.read_text()
    resumed = re.search(rf"resumed from \S*trial-{number}\.pt after epoch (\d+)", text)
    assert resumed and int(resumed.group(1)) == saved >= 1, text[-3000:]
    ran = sorted(e for t, e in epochs_logged(log_b) if t == retry.number)
    assert ran == list(range(int(resumed.group(1)) + 1, SLOW_EPOCHS + 1))
    assert not checkpoint.exists()  # a finished trial's checkpoint is removed


def test_dead_worker_sqlite(tmp_path: Path, fmnist_dir: Path) -> None:
    dead_worker(tmp_path, f"sqlite:///{tmp_path / 'sweep.db'}")


def test_dead_worker_postgres(tmp_path: Path, fmnist_dir: Path) -> None:
    with machine_database() as url:
        dead_worker(tmp_path, url)


# ---------------------------------------------------------------- 2. database restart


def test_database_restart(tmp_path: Path, fmnist_dir: Path, pg_cluster: Cluster,  # noqa: F811
                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The grace period must outlast the outage plus the retries' back-off, or live trials
    # would be declared dead (they would be retried, not lost, but this test wants none).
    monkeypatch.setenv("KDSWEEP_GRACE", "20")
    url = pg_cluster.url()
    create(url, "slow", 4)
    procs = [start_worker(tmp_path, url, i, KDSWEEP_GRACE="20") for i in range(2)]
    try:
        wait_until(lambda: any(e >= 2 for _, log in procs for _, e in epochs_logged(log)), 90, 0.1,
                   "a worker to be mid-trial")
        pg_cluster.stop("fast")  # every connection is cut, as in a real restart
        time.sleep(3)
        pg_cluster.start()
        finish([p for p, _ in procs])
    finally:
        if not pg_cluster.is_up():
            pg_cluster.start()
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    logs = "".join(log.read_text() for _, log in procs)
    assert all(p.returncode == 0 for p, _ in procs), logs[-4000:]
    assert re.search(r"(storage call \w+ failed|heartbeat for trial id \d+ failed)", logs), \
        "no worker noticed the outage; the test did not test anything"
    assert "Traceback" not in logs
    study = load(url)
    assert_complete(study, 4)
    assert counts(study).failed == 0  # no trial lost to the outage
    optuna.delete_study(study_name="tiny", storage=open_storage(url, heartbeat=False))


def test_worker_started_during_outage_waits(tmp_path: Path, fmnist_dir: Path, pg_cluster: Cluster) -> None:  # noqa: F811
    # A worker (re)started by a supervisor while the database restarts must wait for it, not exit:
    # the previous test's workers only met the outage mid-run, or at start-up by chance.
    url = pg_cluster.url()
    create(url, "quick", 2)
    pg_cluster.stop("fast")
    try:
        proc, log = start_worker(tmp_path, url, 0)
        wait_until(lambda: "storage call connect failed" in log.read_text(), 60, 0.1,
                   "the worker to meet the outage")
        assert proc.poll() is None, log.read_text()[-3000:]  # still waiting, not gone
        pg_cluster.start()
        finish([proc])
    finally:
        if not pg_cluster.is_up():
            pg_cluster.start()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert_complete(load(url), 2)
    optuna.delete_study(study_name="tiny", storage=open_storage(url, heartbeat=False))


def test_worker_fails_fast_on_a_missing_database(tmp_path: Path, fmnist_dir: Path) -> None:
    # "does not exist" is the server's answer, not an outage: one sentence at once, no retries.
    with machine_database() as url:
        missing = url.rsplit("/", 1)[0] + "/kdsweep_no_such_db"
        proc, log = start_worker(tmp_path, missing, 0)
        assert proc.wait(timeout=60) != 0
    text = log.read_text()
    assert 'database "kdsweep_no_such_db" does not exist' in text and "retry" not in text, text
    assert "Traceback" not in text


# ---------------------------------------------------------------- 3. interrupt


def launch(tmp: Path, url: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdsweep", "launch", str(TINY), "--preset", "slow", "--n-trials", "3",
           "--workers", "2", "--device", "cpu", "--no-tensorboard", "--artifacts", str(tmp / "artifacts")]
    return subprocess.Popen(cmd, env=worker_env(url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp, start_new_session=True)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_requeues_and_next_launch_finishes(tmp_path: Path, fmnist_dir: Path, how: str) -> None:
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    proc = launch(tmp_path, url)
    try:
        def reported() -> bool:
            try:
                return any(1 <= len(t.intermediate_values) <= SLOW_EPOCHS // 2  # well before its end
                           for t in load(url).get_trials(states=(TrialState.RUNNING,)))
            except KeyError:  # launch has not created the study yet
                return False

        wait_until(reported, 90, 0.1, "a trial to report an epoch")
        running = [t.number for t in load(url).get_trials(states=(TrialState.RUNNING,))]
        sent = time.monotonic()
        if how == "ctrl-c":  # a terminal's Ctrl-C signals the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert stopped_in < 20, f"launch took {stopped_in:.1f}s to stop"
    assert "Traceback" not in out, out[max(0, out.find("Traceback") - 2000):][:6000]
    study = load(url)
    c = counts(study)
    assert c.running == 0
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert interrupted and {t.number for t in interrupted} & set(running)
    for t in interrupted:
        assert t.user_attrs["fail_reason"].startswith("interrupted")
        requeued = [r for r in study.trials if r.system_attrs.get("failed_trial") == t.number]
        assert len(requeued) == 1 and requeued[0].state == TrialState.WAITING
        assert requeued[0].params == t.params
        assert requeued[0].intermediate_values == t.intermediate_values

    if how == "sigterm":
        return  # finishing the study with a second launch is checked once, after Ctrl-C
    again = launch(tmp_path, url)
    out2, _ = again.communicate(timeout=150)
    assert again.returncode == 0, out2[-3000:]
    assert_complete(load(url), 3)
    assert "resumed from" in out2  # interrupted trials continue from their checkpoints


# ---------------------------------------------------------------- 4. crowded SQLite


def trivial_objective(artifacts: Path):
    """The tiny study's Objective with its training replaced by a formula: ~no compute per trial."""
    from kdsweep.service.objective import Objective

    class Trivial(Objective):
        def __call__(self, trial: optuna.Trial) -> float:
            from kdsweep.service import space as sp

            params = sp.sample(trial, self.study.space_for(self.preset))
            trial.report(params["optim.lr"], 1)
            trial.set_user_attr("note", "trivial")
            return -abs(params["optim.lr"] - 0.1)

    return Trivial(study=studies.load(str(TINY)), preset="quick", runtime={"device": "cpu"}, artifacts=artifacts)


def crowd_worker(url: str, index: int) -> None:
    """Entry point of one crowded-SQLite worker process (see the test below)."""
    import logging

    from kdsweep.service.worker import run_worker

    logging.basicConfig(level=logging.WARNING)
    objective = trivial_objective(Path.cwd())
    summary = run_worker(join(url, objective), objective)
    print(json.dumps({"ran": summary.ran, "failed": summary.failed}))


def test_crowded_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crowd.db'}"
    create(url, "quick", 200)
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_faults as t; t.crowd_worker(sys.argv[1], int(sys.argv[2]))"
    # A long grace period: this test is about the write lock, and 8 processes on 2 busy cores
    # can starve a 1 s heartbeat thread for seconds.
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(i)], env=worker_env(url, KDSWEEP_GRACE="60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for i in range(8)]
    outs = [p.communicate(timeout=240) for p in procs]
    errors = "".join(err for _, err in outs)
    assert all(p.returncode == 0 for p in procs), errors[-3000:]
    assert "database is locked" not in errors
    ran = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(r["ran"] for r in ran) == 200 and sum(r["failed"] for r in ran) == 0
    assert sum(r["ran"] > 0 for r in ran) >= 3  # they really did run side by side
    study = load(url)
    assert_complete(study, 200)
    assert counts(study).failed == 0


# ---------------------------------------------------------------- 5. a trial that breaks


def test_broken_trials_fail_with_reason_and_never_win(tmp_path: Path, fmnist_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torch

    from kdsweep.core import train as train_mod
    from kdsweep.core.config import replace
    from kdsweep.service import objective as objective_mod
    from kdsweep.service.objective import Objective
    from kdsweep.service.worker import run_worker

    broken = tmp_path / "user-data.npz"
    np.savez(broken, x=np.zeros((10, 8, 8), np.uint8), y=np.arange(10) + 5)  # labels up to 14 of 10 classes
    broken.write_bytes(broken.read_bytes()[:200])  # and then truncated: not a readable archive

    OOM_LR, DATA_LR = 0.051, 0.052
    real_train = train_mod.train

    def faulty_train(config, report=None, checkpoint=None, stop=None, teacher=None):
        if config.optim.lr == OOM_LR:  # out of memory in the second epoch's first step
            real_progress = train_mod.models.set_progress
            calls = {"n": 0}

            def progress(model, fraction, cfg):
                if fraction >= 0.5 and calls["n"] == 0:
                    calls["n"] += 1
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
                return real_progress(model, fraction, cfg)

            with pytest.MonkeyPatch.context() as m:
                m.setattr(train_mod.models, "set_progress", progress)
                return real_train(config, report, checkpoint, stop, teacher)
        if config.optim.lr == DATA_LR:  # the user's data file is broken
            config = replace(config, **{"data.dataset": f"npz:{broken}"})
        return real_train(config, report, checkpoint, stop, teacher)

    monkeypatch.setattr(objective_mod, "train", faulty_train)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = create(url, "faults", 4, max_failures=3)
    good = {"optim.lr": 0.05, "mlp.depth": 1, "mlp.dropout": 0.0}
    points = [good, {**good, "optim.lr": 5000.0}, {**good, "optim.lr": OOM_LR}, {**good, "optim.lr": DATA_LR}]
    # They take the places of the study's 4 trials; the failed ones' replacements are three more
    # good points (sampled ones could diverge in this wide space and pass the failure limit).
    replacements = [{**good, "optim.lr": lr} for lr in (0.06, 0.07, 0.08)]
    for p in points + replacements:
        study.enqueue_trial(p, skip_if_exists=False)
    study_def = studies.load(str(TINY))
    objective = Objective(study_def, "faults", {"device": "cpu", "threads": 1}, tmp_path / "artifacts")
    summary = run_worker(join(url, objective), objective)

    study = load(url)
    trials = study.trials
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3
    reasons = [t.user_attrs["fail_reason"] for t in trials[1:4]]
    assert re.match(r"TrainingError: the training loss became (nan|inf)", reasons[0]), reasons[0]
    assert reasons[1].startswith("OutOfMemoryError: CUDA out of memory"), reasons[1]
    assert reasons[2].startswith("DataError: cannot read") and str(broken) in reasons[2], reasons[2]
    assert trials[2].intermediate_values  # the OOM trial had reported an epoch before it broke
    # The worker went on: each failure got a fresh slot (3 allowed), and it ran them all.
    assert len(trials) == 7 and summary.ran == 7 and not summary.interrupted
    assert counts(study).running == counts(study).waiting == 0
    # A failed trial can never be `best`, whatever it reported before failing.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    winner = Sweep(study).export_best()
    assert trials[winner["trial"]].state == TrialState.COMPLETE
    assert winner["value"] == max(t.value for t in complete)


# ---------------------------------------------------------------- 6. a worker from elsewhere


def test_worker_from_elsewhere_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.cli import main

    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = create(url, "quick", 2)
    other = tmp_path / "tiny.py"  # the same study file on another host, edited since
    other.write_text(TINY.read_text().replace("Float(\"optim.lr\", 0.01, 0.3", "Float(\"optim.lr\", 0.01, 0.5"))
    stored = dict(study.user_attrs[keys.DEFINITION])

    def refuse(args: list[str], fragment: str) -> None:
        before = [(t.number, t.state) for t in load(url).trials]
        result = CliRunner().invoke(main, ["worker", *args, "--storage", url, "--device", "cpu",
                                           "--no-tensorboard"])
        assert result.exit_code == 2, result.output
        message = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(message) == 1 and fragment in message[0], result.output
        assert message[0].count(". ") <= 1 and "Traceback" not in result.output  # one sentence
        assert [(t.number, t.state) for t in load(url).trials] == before

    refuse([str(other)], "space.optim.lr.high: study has 0.3, this study file gives 0.5")
    refuse([str(TINY), "--preset", "slow"], "was created with preset 'quick', not 'slow'")
    # A study created by another kdsweep version: its recorded definition says so.
    load(url).set_user_attr(keys.DEFINITION, {**stored, "kdsweep_version": "0.0.1"})
    refuse([str(TINY)], "kdsweep_version: study has '0.0.1'")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs a CUDA GPU; on CPU the out-of-memory error is injected (test above)")
def test_real_cuda_oom_fails_the_trial_and_the_worker_goes_on(tmp_path: Path, tiny_npz: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: one trial really exhausts the GPU's memory in its train step."""
    import torch

    from kdsweep.core import train as train_mod
    from kdsweep.core.config import replace
    from kdsweep.service import objective as objective_mod
    from kdsweep.service.objective import Objective
    from kdsweep.service.worker import run_worker

    greedy_lr = 0.051
    real_train = train_mod.train

    real_config = Objective.config
    npz = {"data.dataset": f"npz:{tiny_npz}", "data.val_size": 200, "data.train_subset": None,
           "data.test_subset": None}  # GPU hosts may lack Debian's Fashion-MNIST
    monkeypatch.setattr(Objective, "config", lambda self, params: replace(real_config(self, params), **npz))

    def greedy_train(config, report=None, checkpoint=None, stop=None, teacher=None):
        if config.optim.lr != greedy_lr:
            return real_train(config, report, checkpoint, stop, teacher)
        real_progress = train_mod.models.set_progress

        def progress(model, fraction, cfg):  # a real allocation far beyond the card's memory
            hog = torch.empty(1 << 44, dtype=torch.uint8, device="cuda")  # 16 TiB
            del hog
            return real_progress(model, fraction, cfg)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(train_mod.models, "set_progress", progress)
            return real_train(config, report, checkpoint, stop, teacher)

    monkeypatch.setattr(objective_mod, "train", greedy_train)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = create(url, "quick", 3, max_failures=3)  # its 3 trials are the points below
    good = {"optim.lr": 0.05, "mlp.depth": 1, "mlp.dropout": 0.0}
    for p in (good, {**good, "optim.lr": greedy_lr}, {**good, "optim.lr": 0.06}):
        study.enqueue_trial(p, skip_if_exists=False)
    objective = Objective(studies.load(str(TINY)), "quick", {"device": "cuda"}, tmp_path / "artifacts")
    summary = run_worker(join(url, objective), objective)
    trials = load(url).trials
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory"), \
        trials[1].user_attrs["fail_reason"]
    assert trials[2].user_attrs["device"].startswith("cuda")  # the next trial ran on the same GPU
    assert summary.ran == 4 and trials[3].state == TrialState.COMPLETE  # and so did its replacement
    print("fail_reason:", trials[1].user_attrs["fail_reason"][:200])
