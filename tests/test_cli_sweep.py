"""The CLI on a real tiny sweep (tests/tiny_sweep.py: an MLP on 8x8 images, seconds): exports,
exit codes, what launch prints and what a worker logs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner, Result
from tiny_sweep import run_tiny_sweep, write_study

from kdsweep.cli import main
from kdsweep.core.config import TrainConfig, from_dict, to_dict


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="kdsweep")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> tuple[Path, str, optuna.Study]:
    """A finished 3-trial tiny sweep: (folder, storage URL, study)."""
    folder = tmp_path_factory.mktemp("cli-sweep")
    study_file = write_study(folder, tiny_npz)
    url = f"sqlite:///{folder}/s.db"
    return folder, url, run_tiny_sweep(study_file, url, 3, folder)


def test_output_suffix_decides_the_format(tiny: tuple[Path, str, optuna.Study], tmp_path: Path) -> None:
    _, url, study = tiny
    out = tmp_path / "best.json"
    assert run("best", "tiny", "--storage", url, "-o", str(out)).exit_code == 0
    assert json.loads(out.read_text())["trial"] == study.best_trial.number  # JSON, not YAML
    out_yaml = tmp_path / "best.yaml"
    assert run("best", "tiny", "--storage", url, "-o", str(out_yaml)).exit_code == 0
    assert not out_yaml.read_text().lstrip().startswith("{")
    forced = tmp_path / "forced.json"
    assert run("best", "tiny", "--storage", url, "-o", str(forced), "--format", "yaml").exit_code == 0
    assert forced.read_text().startswith("study: tiny")


def test_export_omits_what_the_architecture_never_reads_and_still_reproduces(
        tiny: tuple[Path, str, optuna.Study], tmp_path: Path) -> None:
    _, url, study = tiny
    out = tmp_path / "best.yaml"
    assert run("best", "tiny", "--storage", url, "-o", str(out)).exit_code == 0
    model = yaml.safe_load(out.read_text())["config"]["model"]
    assert model["arch"] == "mlp" and "hidden" in model
    for meaningless in ("width", "channels", "block_size", "stem", "trainable", "weights"):
        assert meaningless not in model, meaningless
    stored = study.best_trial.user_attrs["config"]
    rebuilt = from_dict(TrainConfig, yaml.safe_load(out.read_text())["config"])
    assert json.loads(json.dumps(to_dict(rebuilt))) == stored
    result = run("train", "--config", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"val_acc {study.best_value:.4f}" in result.output  # the sweep's value, reproduced


def test_compact_round_trips_every_architecture() -> None:
    from kdsweep.core.config import KDConfig, ModelConfig, compact

    for model in (ModelConfig(arch="resnet18", stem="cifar"), ModelConfig(arch="mlp", hidden=(10, 9)),
                  ModelConfig(arch="cnn", width=8, channels=(8, 16, 30)),
                  ModelConfig(arch="resnet50", width=48)):  # a non-default value is always kept
        config = TrainConfig(model=model, kd=KDConfig(alpha=0.5))
        small = compact(to_dict(config))
        assert from_dict(TrainConfig, small) == config
    resnet = compact(to_dict(TrainConfig(model=ModelConfig(arch="resnet18"), kd=KDConfig())))
    assert set(resnet["model"]) == {"arch", "weights", "stem", "trainable"}
    assert set(resnet["kd"]["teacher"]) == {"arch", "weights", "stem", "trainable"}
    assert resnet["kd"]["teacher"]["arch"] == "resnet50"
    assert "width" in compact(to_dict(TrainConfig(model=ModelConfig(arch="resnet50", width=48))))["model"]


def test_best_without_a_complete_trial_exits_1_with_and_without_verify(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    assert run("create", "q2", "--preset", "smoke", "-n", "1", "--storage", url).exit_code == 0
    plain = run("best", "q2", "--storage", url)
    verify = run("best", "q2", "--storage", url, "--verify")
    assert plain.exit_code == verify.exit_code == 1, (plain.output, verify.output)
    assert "no complete trial" in plain.output and "no complete trial" in verify.output


def test_study_names_its_metric_for_the_dashboard(tiny: tuple[Path, str, optuna.Study]) -> None:
    assert tiny[2].metric_names == ["val_acc"]  # not "Objective 0"


def test_each_epoch_is_logged_once(tmp_path: Path, tiny_npz: Path, caplog: pytest.LogCaptureFixture) -> None:
    study_file = write_study(tmp_path, tiny_npz)
    with caplog.at_level(logging.INFO, logger="kdsweep"):
        run_tiny_sweep(study_file, f"sqlite:///{tmp_path}/e.db", 1, tmp_path, tensorboard=False)
    epoch_lines = [r.getMessage() for r in caplog.records if re.search(r"\bepoch 1\b", r.getMessage())]
    assert len(epoch_lines) == 1, epoch_lines


def test_a_finished_launch_prints_its_summary_without_starting_workers(
        tiny: tuple[Path, str, optuna.Study], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, url, _ = tiny
    from kdsweep.service import launch

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("workers started for a finished study")

    monkeypatch.setattr(launch, "run", no_workers)
    result = run("launch", str(folder / "tiny.py"), "--preset", "smoke", "-n", "3", "--storage", url,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("[3/3]") == 1 and "trial" in result.output


def test_launch_prints_the_last_progress_line_once(tmp_path: Path, tiny_npz: Path) -> None:
    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/l.db"
    result = run("launch", str(study_file), "--preset", "smoke", "-n", "2", "-w", "1", "--storage", url,
                 "--device", "cpu", "--no-tensorboard")
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^\[2/2\]", result.output, re.M)) == 1, result.output


def test_interrupted_attempts_are_re_queued_not_failed(tmp_path: Path) -> None:
    from kdsweep.service.sweep import Sweep

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/i.db")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for reason in ("interrupted (SIGTERM/Ctrl-C); re-queued", "interrupted (SIGTERM/Ctrl-C); re-queued",
                   "RuntimeError: boom"):
        study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL, params={"x": 0.1},
                                            distributions=dist, user_attrs={"fail_reason": reason}))
    line = Sweep(study).progress_line()
    assert "failed 1, re-queued 2" in line, line


def test_a_second_signal_during_the_first_raises_no_race_oserror(
        tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """Ctrl-C reaches a worker as SIGINT and, from launch, SIGTERM: both pending at once. The
    first handler used to set the second to SIG_IGN, and CPython then raised `OSError: Signal
    15 ignored due to race condition` (a traceback from inside autograd)."""
    from kdsweep.service import spec as studies
    from kdsweep.service.objective import Objective
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    def both_signals(self: Objective, trial: optuna.Trial) -> float:
        # Sent to this thread (a signal sent to the process may go to any thread that does not
        # block it, and its handler would then run before the second is sent), kept pending by
        # the mask, then delivered together when it is lifted.
        me = threading.get_ident()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            signal.pthread_kill(me, signal.SIGINT)
            signal.pthread_kill(me, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # both delivered
        for _ in range(1000):  # the bytecode where the handlers run
            pass
        return 0.5

    import sys

    unraisable: list[str] = []  # CPython reports the race through sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    monkeypatch.setattr(Objective, "__call__", both_signals)
    study_def = studies.load(str(write_study(tmp_path, tiny_npz)))
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    Sweep.create(storage, study_def, "smoke", "tiny", 2, seed=0)
    objective = Objective(study_def, "smoke", {"device": "cpu", "threads": 1}, tmp_path / "a")
    summary = run_worker(Sweep.join(storage, "tiny", study_def), objective)
    assert summary.interrupted
    assert not unraisable, unraisable
    err = capfd.readouterr().err
    assert "ignored due to race condition" not in err and "Traceback" not in err, err
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state for t in study.get_trials()][:2] == [optuna.trial.TrialState.FAIL,
                                                         optuna.trial.TrialState.WAITING]


# ---------------------------------------------------------------- new commands: trial, ls, rm, stop, create -n


def test_status_does_not_import_torch(tiny: tuple[Path, str, optuna.Study]) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom kdsweep.cli import main\ntry:\n    main(sys.argv[1:], prog_name='kdsweep')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "status", "tiny", "--storage", tiny[1]],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert "3 complete" in out.stdout and out.stdout.strip().endswith("exit 0 False"), out.stdout + out.stderr


def test_status_json(tiny: tuple[Path, str, optuna.Study]) -> None:
    result = run("status", "tiny", "--storage", tiny[1], "--json")
    doc = json.loads(result.output)
    assert doc["complete"] == 3 and doc["n_trials"] == 3 and doc["best"]["trial"] == tiny[2].best_trial.number


def test_trial_shows_everything_stored_about_it(tiny: tuple[Path, str, optuna.Study]) -> None:
    folder, url, study = tiny
    n = study.best_trial.number
    result = run("trial", "tiny", str(n), "--storage", url)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"trial {n}: COMPLETE, val_acc {study.best_value:.4f}" in text
    assert "optim.lr = " in text and re.search(r"epoch +2 +0\.\d{4} +#+", text)  # the curve
    assert "host " in text and "seed 0" in text and "arch: mlp" in text
    doc = json.loads(run("trial", "tiny", str(n), "--storage", url, "--json").output)
    assert doc["curve"] == {str(k): v for k, v in study.best_trial.intermediate_values.items()}
    log_file = Path(doc["log_file"])
    assert log_file.parent == folder / "runs" / "tiny" / f"trial-{n:04d}" and log_file.is_file()
    assert "epoch 2/2 val_acc" in log_file.read_text()  # the trial's own log lines
    assert doc["weights"] and Path(doc["weights"]).is_file()
    user_error = run("trial", "tiny", "99", "--storage", url)
    assert user_error.exit_code == 2 and "has no trial 99" in user_error.output


def test_ls_lists_the_studies_of_a_storage(tiny: tuple[Path, str, optuna.Study]) -> None:
    _, url, study = tiny
    rows = json.loads(run("ls", "--storage", url, "--json").output)
    (row,) = [r for r in rows if r["study"] == "tiny"]
    assert (row["complete"], row["n_trials"], row["best"]["value"]) == (3, 3, study.best_value)
    assert row["last_activity"].startswith(str(study.trials[-1].datetime_complete.date()))
    table = run("ls", "--storage", url).output
    assert re.search(r"^tiny +tiny/smoke +3 +3 ", table, re.M), table


def test_rm_deletes_the_study_its_sibling_and_files(tmp_path: Path, tiny_npz: Path) -> None:
    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/r.db"
    run_tiny_sweep(study_file, url, 1, tmp_path)
    assert (tmp_path / "runs" / "tiny").is_dir() and (tmp_path / "kdsweep-artifacts" / "tiny").is_dir()
    refused = CliRunner().invoke(main, ["rm", "tiny", "--storage", url], input="n\n")
    assert refused.exit_code == 1 and optuna.get_all_study_names(url) == ["tiny"]
    result = run("rm", "tiny", "--storage", url, "--yes")
    assert result.exit_code == 0, result.output
    assert optuna.get_all_study_names(url) == []
    assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "kdsweep-artifacts" / "tiny").exists()


def test_create_lowers_n_only_while_nothing_beyond_it_ran(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/n.db"
    assert run("create", "q2", "--preset", "smoke", "-n", "10", "--storage", url).exit_code == 0
    study = optuna.load_study(study_name="q2", storage=url)
    for _ in range(3):  # three slots made; two of them finished
        study.enqueue_trial({})
    for t in study.get_trials()[:2]:
        trial = optuna.Trial(study, t._trial_id)
        study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING)
        study.tell(trial, 0.5)
    lowered = run("create", "q2", "--preset", "smoke", "-n", "2", "--storage", url)
    assert lowered.exit_code == 0 and "(N=2): 0 waiting, 0 running, 2 finished" in lowered.output, lowered.output
    refused = run("create", "q2", "--preset", "smoke", "-n", "1", "--storage", url)
    assert refused.exit_code == 2 and "cannot lower N" in refused.output and "-n 2" in refused.output


def test_stop_drains_the_workers(tmp_path: Path, tiny_npz: Path) -> None:
    """`kdsweep stop`: the worker's heartbeat reads the flag, its trial is re-queued, it leaves;
    the next launch clears the flag and finishes the study."""
    import subprocess
    import sys
    import time

    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/s.db"
    slow = ["--set", "epochs=400", "--set", "data.val_size=300"]  # seconds: long enough that the stop lands mid-trial
    assert run("create", str(study_file), "--preset", "smoke", *slow, "-n", "3", "--storage", url).exit_code == 0
    env = {**os.environ, "KDSWEEP_HEARTBEAT": "1", "KDSWEEP_GRACE": "5", "KDSWEEP_STORAGE": url}
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep", "worker", str(study_file), "--device", "cpu",
                             "--threads", "1", "--no-tensorboard"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not optuna.load_study(study_name="tiny", storage=url).get_trials(
                states=(optuna.trial.TrialState.RUNNING,)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        result = run("stop", "tiny", "--storage", url)
        assert result.exit_code == 0 and "1 running trial(s)" in result.output, result.output
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "re-queuing this trial and leaving" in out and "stopped" in out
    study = optuna.load_study(study_name="tiny", storage=url)
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING in states
    assert "stopped" in run("status", "tiny", "--storage", url).output
