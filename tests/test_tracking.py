"""`--track mlflow`: each trial as one MLflow run, checked against a real MLflow tracking server.

The server is `mlflow server` with its SQLite backend on a free loopback port; a tiny real sweep
runs against it (one trial interrupted and re-queued in process, then `kdsweep launch --track
mlflow` finishes the study), and everything is read back through MLflow's own client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_sweep import write_study

from kdsweep.cli import main

INSTALL = "pip install 'kdsweep[mlflow]'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- without MLflow, or off


@pytest.mark.parametrize("command", ["launch", "worker"])
def test_track_mlflow_without_mlflow_installed_is_one_sentence_and_stores_nothing(
        command: str, tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib.util.find_spec then finds none
    monkeypatch.chdir(tmp_path)
    study = write_study(tmp_path, tiny_npz)
    db = tmp_path / "t.db"
    result = CliRunner().invoke(main, [command, str(study), "--storage", f"sqlite:///{db}",
                                       "--preset", "smoke", "--track", "mlflow"])
    assert result.exit_code == 2, result.output
    assert INSTALL in result.output and "Traceback" not in result.output
    assert not db.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]


def test_an_unknown_tracker_is_a_choice_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "q1", "--storage", f"sqlite:///{tmp_path / 't.db'}",
                                       "--track", "foo"])
    assert result.exit_code == 2 and "'foo' is not 'mlflow'" in result.output
    assert not (tmp_path / "t.db").exists()


NOTHING_IMPORTED = """
import sys
from pathlib import Path

from tiny_sweep import run_tiny_sweep

import kdsweep.cli, kdsweep.service.fused_worker, kdsweep.service.launch, kdsweep.service.tracking

folder = Path(sys.argv[1])
study = run_tiny_sweep(folder / "tiny.py", f"sqlite:///{folder / 't.db'}", 1, folder, tensorboard=False)
assert [t.state.name for t in study.trials] == ["COMPLETE"], study.trials
print(sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "mlflow_skinny")))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and trains one tiny trial
def test_nothing_of_mlflow_is_imported_when_tracking_is_off(tmp_path: Path, tiny_npz: Path) -> None:
    write_study(tmp_path, tiny_npz)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    out = subprocess.run([sys.executable, "-c", NOTHING_IMPORTED, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow  # imports MLflow and torch, trains two tiny trials
def test_a_tracking_server_that_does_not_answer_costs_a_warning_not_the_trial(
        tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow", reason=f"needs MLflow ({INSTALL}, or the test extra)")
    from kdsweep.service import spec as studies
    from kdsweep.service.objective import Objective
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nobody listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    spec = studies.load(str(write_study(tmp_path, tiny_npz)))
    storage = open_storage(f"sqlite:///{tmp_path / 't.db'}")
    Sweep.create(storage, spec, "smoke", "tiny", 2, seed=0)
    objective = Objective(spec, "smoke", {"device": "cpu", "threads": 1}, tmp_path / "artifacts", track="mlflow")
    sweep = Sweep.join(storage, "tiny", spec)
    summary = run_worker(sweep, objective)
    assert (summary.complete, summary.failed) == (2, 0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdsweep.service.tracking"]
    assert len(warnings) == 2 and all("is not tracked in MLflow" in w for w in warnings), warnings


# ---------------------------------------------------------------- a real tracking server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and local artifacts on a free loopback port: its URI."""
    pytest.importorskip("mlflow", reason=f"needs MLflow ({INSTALL}, or the test extra)")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    # No background job runner (its consumers are processes this test does not need).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                start_new_session=True)  # its own group: stopped with its children
    try:
        deadline = time.monotonic() + 240  # imports and migrations: under a minute on a busy 2-core host
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_each_trial_is_one_mlflow_run_and_a_requeued_trial_continues_its_run(
        mlflow_server: str, tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from kdsweep.service import spec as studies
    from kdsweep.service.location import location
    from kdsweep.service.objective import Objective, TrialRun
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import Interrupted, run_worker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path / 't.db'}"
    spec = studies.load(str(study_file))
    storage = open_storage(url)

    def load() -> optuna.Study:
        return optuna.load_study(study_name="tiny", storage=open_storage(url))

    Sweep.create(storage, spec, "smoke", "tiny", 3, seed=0)

    # Attempt one of the first trial: interrupted right after its first epoch's report, as
    # Ctrl-C would; the worker re-queues it.
    first: dict[str, float] = {}
    report = TrialRun.report

    def interrupted_once(run: TrialRun, epoch: int, metrics) -> None:  # noqa: ANN001
        report(run, epoch, metrics)
        if not first:
            first.update(metrics)
            raise Interrupted()

    monkeypatch.setattr(TrialRun, "report", interrupted_once)
    objective = Objective(spec, "smoke", {"device": "cpu", "threads": 1}, location(url).artifacts("tiny", None),
                          track="mlflow")
    summary = run_worker(Sweep.join(storage, "tiny", spec), objective)
    monkeypatch.setattr(TrialRun, "report", report)
    assert (summary.ran, summary.requeued, summary.complete) == (1, 1, 0)
    (number,) = [t.number for t in load().trials if t.state == TrialState.FAIL]

    client = MlflowClient()
    assert client.tracking_uri == mlflow_server
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    (waiting,) = client.search_runs([experiment.experiment_id])
    assert waiting.info.status == "KILLED" and waiting.data.tags["state"] == "REQUEUED"
    assert waiting.data.tags["kdsweep.trial"] == str(number) and waiting.info.run_name == f"trial-{number}"

    # A real `kdsweep launch --track mlflow` finishes the study: the retry and two fresh trials.
    env = {**os.environ, "KDSWEEP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "kdsweep", "launch", str(study_file), "--storage", url,
                          "--preset", "smoke", "--device", "cpu", "--workers", "1", "--no-tensorboard",
                          "--track", "mlflow"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    done = [t for t in load().trials if t.state == TrialState.COMPLETE]
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == number)
    assert len(done) == 3 and retry.number != number
    found = client.search_runs([experiment.experiment_id])
    runs = {r.data.tags["kdsweep.trial"]: r for r in found}
    origins = {str(t.system_attrs.get("failed_trial", t.number)): t for t in done}
    assert len(found) == 3 and sorted(runs) == sorted(origins)  # one run per trial, the re-queued one too
    assert runs[str(number)].info.run_id == waiting.info.run_id  # ... which continued its first run
    assert runs[str(number)].data.tags["kdsweep.number"] == str(retry.number)
    for origin_number, trial in origins.items():
        run = runs[origin_number]
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
        assert run.data.tags["kdsweep.study"] == "tiny"
        params = run.data.params
        assert float(params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert params["mlp.dropout"] == str(trial.params["mlp.dropout"])
        assert params["seed"] == str(trial.user_attrs["seed"])
        assert run.data.metrics["value"] == pytest.approx(trial.value)
        assert 0 < run.data.metrics["value_se"] < 0.05  # sqrt(p(1-p)/300): at most 0.029
        history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.timestamp)
        if origin_number == str(number):
            # Attempt one's epoch 1, then the retry's epochs (it re-ran epoch 1: no checkpoint yet).
            assert history[0].step == 1 and history[0].value == pytest.approx(first["val_acc"])
            assert len(history) == 3
        steps = sorted({m.step for m in history})
        assert steps == [1, 2] == sorted(trial.intermediate_values)
        last = max(history, key=lambda m: (m.step, m.timestamp))
        assert last.value == pytest.approx(trial.intermediate_values[2])


@pytest.mark.slow
def test_a_fused_workers_trials_are_one_run_each_across_a_requeue(
        mlflow_server: str, tmp_path: Path, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from kdsweep.service import spec as studies
    from kdsweep.service.fused_worker import run_fused_worker
    from kdsweep.service.objective import Objective, TrialRun
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import Interrupted

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    spec = studies.load(str(Path(__file__).parent / "studies" / "tiny_kd.py"))
    storage = open_storage(f"sqlite:///{tmp_path / 't.db'}")
    Sweep.create(storage, spec, "quick", "tiny_kd", 3, seed=0)
    objective = Objective(spec, "quick", {"device": "cpu", "threads": 1}, tmp_path / "artifacts", track="mlflow")
    report = TrialRun.report

    def interrupted(run: TrialRun, epoch: int, metrics) -> None:  # noqa: ANN001
        report(run, epoch, metrics)
        raise Interrupted()  # Ctrl-C after the first member's first epoch: all three re-queued

    monkeypatch.setattr(TrialRun, "report", interrupted)
    run_fused_worker(Sweep.join(storage, "tiny_kd", spec), objective, 3)
    monkeypatch.setattr(TrialRun, "report", report)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny_kd")
    assert experiment is not None
    first = {r.data.tags["kdsweep.trial"]: r for r in client.search_runs([experiment.experiment_id])}
    assert len(first) == 3 and {r.data.tags["state"] for r in first.values()} == {"REQUEUED"}

    summary = run_fused_worker(Sweep.join(storage, "tiny_kd", spec), objective, 3)
    assert summary.complete == 3
    done = optuna.load_study(study_name="tiny_kd", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 3
    for run in found:
        trial = next(t for t in done if str(t.system_attrs.get("failed_trial")) == run.data.tags["kdsweep.trial"])
        assert run.info.run_id == first[run.data.tags["kdsweep.trial"]].info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
        assert float(run.data.params["kd.alpha"]) == pytest.approx(trial.params["kd.alpha"])
        assert run.data.metrics["value"] == pytest.approx(trial.value)
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert steps == {1, 2}
