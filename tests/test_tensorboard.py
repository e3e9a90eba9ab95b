"""TensorBoard event files of a real tiny sweep, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tiny_sweep import run_tiny_sweep, write_study

from kdsweep import cli
from kdsweep.service.tensorboard import TrialWriter, runs_root


def _read(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _session(folder: Path) -> tuple[dict, dict]:
    """(hparams, metric names) of the HParams session recorded in `folder`."""
    acc = _read(folder)
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = None
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            start = data.session_start_info
    assert start is not None, f"no HParams session in {folder}"
    hparams = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[name] = getattr(value, kind)
    return hparams, acc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> tuple[Path, optuna.Study]:
    folder = tmp_path_factory.mktemp("tb")
    study_file = write_study(folder, tiny_npz)
    study = run_tiny_sweep(study_file, f"sqlite:///{folder}/s.db", 3, folder)
    return folder, study


def test_every_trial_writes_curves_and_hparams(sweep: tuple[Path, optuna.Study]) -> None:
    folder, study = sweep
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    for t in trials:
        run = folder / "runs" / "tiny" / f"trial-{t.number:04d}"
        hparams, acc = _session(run)
        scalars = acc.Tags()["scalars"]
        for tag in ("train/loss", "train/lr", "train/images_per_s", "val/acc", "hparam/val_acc"):
            assert tag in scalars, (tag, scalars)
        val = acc.Scalars("val/acc")
        assert [e.step for e in val] == [1, 2]
        # The curve holds what the trial reported to Optuna, epoch by epoch.
        for e in val:
            assert e.value == pytest.approx(t.intermediate_values[e.step], abs=1e-6)
        assert acc.Scalars("hparam/val_acc")[-1].value == pytest.approx(t.value, abs=1e-6)
        assert all(e.value > 0 for e in acc.Scalars("train/images_per_s"))
        assert hparams["optim.lr"] == pytest.approx(t.params["optim.lr"])
        assert hparams["mlp.dropout"] == pytest.approx(t.params["mlp.dropout"])
        assert hparams["trial"] == t.number


def test_event_files_hold_no_storage_url_or_paths(sweep: tuple[Path, optuna.Study]) -> None:
    folder, _ = sweep
    files = list((folder / "runs").rglob("events.out.tfevents.*"))
    assert files
    for f in files:
        blob = f.read_bytes()
        assert b"sqlite" not in blob and str(folder).encode() not in blob


def test_no_hparams_entry_before_the_first_epoch(tmp_path: Path) -> None:
    writer = TrialWriter(tmp_path / "t")
    writer.close({"kd.alpha": 0.5})
    acc = _read(tmp_path / "t")
    with pytest.raises(KeyError):
        acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    assert not acc.Tags()["scalars"]


def test_runs_root_sits_beside_the_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDSWEEP_RUNS", raising=False)
    assert runs_root(f"sqlite:///{tmp_path}/a/k.db") == tmp_path / "a" / "runs"
    assert runs_root("postgresql+psycopg://u:secret@h/db") == Path("runs")
    assert runs_root("postgresql+psycopg://u:secret@h/db", tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("KDSWEEP_RUNS", str(tmp_path / "shared"))
    assert runs_root(f"sqlite:///{tmp_path}/k.db") == tmp_path / "shared"


def test_tensorboard_command_finds_the_study_runs(sweep: tuple[Path, optuna.Study],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = sweep
    calls = []
    # The command's one call: serve that folder (TensorBoard itself is not started here).
    monkeypatch.setattr("kdsweep.service.tensorboard.serve", lambda logdir, host, port: calls.append(logdir) or 0)
    monkeypatch.chdir(folder.parent)  # not the sweep folder: the storage URL leads there
    result = CliRunner().invoke(cli.main, ["tensorboard", "tiny", "--storage", f"sqlite:///{folder}/s.db"])
    assert result.exit_code == 0, result.output
    assert calls == [folder / "runs" / "tiny"]
    missing = CliRunner().invoke(cli.main, ["tensorboard", "nope", "--storage", f"sqlite:///{folder}/s.db"])
    assert missing.exit_code == 2 and "no TensorBoard runs" in missing.output


def test_sigterm_to_the_command_stops_tensorboard_too(tmp_path: Path) -> None:
    """`kill` (or docker stop) of `kdsweep tensorboard` once left TensorBoard running on its port."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    (tmp_path / "runs" / "q2" / "trial-0000").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    env = {k: v for k, v in os.environ.items() if not k.startswith("KDSWEEP_")}
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep", "tensorboard", "q2", "--logdir",
                             str(tmp_path / "runs"), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not listening():
            assert proc.poll() is None and time.monotonic() < deadline, "TensorBoard never listened"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while listening() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(), f"TensorBoard still holds port {port} after SIGTERM to kdsweep"
    finally:
        if proc.poll() is None:
            proc.kill()
