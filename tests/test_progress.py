"""Progress: bars only on a terminal, plain log lines elsewhere, nothing when quiet; trial tags."""

from __future__ import annotations

import logging

import pytest

from kdsweep.core import progress


@pytest.fixture(autouse=True)
def info_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDSWEEP_PROGRESS", raising=False)
    logger = logging.getLogger("kdsweep")
    old = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(old)


def test_mode_follows_terminal_quiet_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress.mode() == "lines"  # pytest captures stderr: not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress.mode() == "bars"
    monkeypatch.setenv("KDSWEEP_PROGRESS", "lines")
    assert progress.mode() == "lines"
    logging.getLogger("kdsweep").setLevel(logging.WARNING)  # --quiet
    assert progress.mode() == "off"


def test_lines_mode_logs_progress_with_the_trial(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "LINE_S", 0.0)
    with caplog.at_level(logging.INFO, logger="kdsweep"), progress.trial_tag(7):
        assert list(progress.track(range(3), 3, "cnn epoch 1/4", "batch")) == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"trial 7: cnn epoch 1/4: {i}/3 batch" for i in (1, 2, 3)]


def test_lines_mode_is_silent_for_short_steps(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kdsweep"):
        list(progress.track(range(100), 100, "quick"))
    assert not caplog.records


def test_bars_mode_draws_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KDSWEEP_PROGRESS", "bars")
    with progress.trial_tag(3):
        list(progress.track(range(5), 5, "resnet18 epoch 2/3", "batch"))
    err = capsys.readouterr().err
    assert "trial 3: resnet18 epoch 2/3:   0%" in err and "0/5 [" in err
    assert err.endswith("\r") and err.rstrip("\r").endswith(" ")  # leave=False: erased at the end


def test_log_lines_carry_worker_and_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = logging.StreamHandler()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    progress.install_log_format(worker=1)
    record = logging.LogRecord("kdsweep.core.train", logging.INFO, __file__, 1, "epoch %d", (2,), None)
    with progress.trial_tag(12):
        handler.filter(record)
        tagged = handler.format(record)
    handler.filter(record)
    untagged = handler.format(record)
    assert tagged.endswith(" [w1 t12] epoch 2")
    assert untagged.endswith(" [w1] epoch 2")


def test_a_verification_run_is_named_as_such(caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own number (the sibling study's) would read as the sweep's trial of that number."""
    monkeypatch.setattr(progress, "LINE_S", 0.0)
    with caplog.at_level(logging.INFO, logger="kdsweep"), progress.trial_tag(3, "verify run 3 (sweep trial 29)"):
        list(progress.track(range(1), 1, "mlp epoch 1/2", "batch"))
    assert [r.getMessage() for r in caplog.records] == ["verify run 3 (sweep trial 29): mlp epoch 1/2: 1/1 batch"]


def test_one_launched_worker_draws_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch -w 1 > log` once forced bars on its worker, so they landed in the log file."""
    from kdsweep.service import launch

    (plan,) = launch.plan_workers(1, "cpu", "sqlite:///x.db")
    assert "KDSWEEP_PROGRESS" not in plan.env  # the worker checks its own stderr (launch's)
    assert all(p.env["KDSWEEP_PROGRESS"] == "lines" for p in launch.plan_workers(2, "cpu", "sqlite:///x.db"))


def test_the_teacher_build_is_tagged_as_the_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its epochs once read `[w1 t0] epoch 1/4`, as if they were trial 0's."""
    handler = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    progress.install_log_format(worker=1)
    record = logging.LogRecord("kdsweep.core.train", logging.INFO, __file__, 1, "epoch %d/4", (1,), None)
    with progress.trial_tag(0), progress.trial_tag(None, "teacher"):
        handler.filter(record)
        assert handler.format(record).endswith(" [w1 teacher] epoch 1/4")


def test_build_status_says_what_a_first_run_waits_for(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import time

    now = 1_000_000.0
    monkeypatch.setattr(time, "time", lambda: now)
    assert progress.build_status(tmp_path) is None
    # The builder holds the teacher's lock (another process: filelock is re-entrant within one).
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(tmp_path / 'abc.lock')!r}); lock.acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        progress.write_build_progress(tmp_path / "abc.progress.json", 0, 4, now)
        assert progress.build_status(tmp_path) == "building the teacher, once: epoch 0/4"
        progress.write_build_progress(tmp_path / "abc.progress.json", 2, 4, now - 40)  # 20 s an epoch
        for pid in (11, 12, 13):
            (tmp_path / f"abc.waiting-{pid}").touch()
        assert progress.build_status(tmp_path) == (
            "building the teacher, once: epoch 2/4, ~40 s left; 3 workers waiting for it")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert progress.build_status(tmp_path) is None  # its builder is gone: no longer shown


def test_eta_from_finished_trials() -> None:
    assert progress.eta([], 10, 2) == ""
    assert progress.eta([30.0], 0, 2) == ""  # nothing left
    assert progress.eta([30.0, 50.0], 9, 2) == "~3 min left"  # 9 trials x 40 s / 2 workers
    # The first wave waited for the teacher: once later trials finished, only theirs count.
    assert progress.eta([190.0, 190.0, 20.0, 20.0], 3, 2) == "~30 s left"
