"""Progress: bars only on a terminal, plain log lines elsewhere, nothing when quiet; trial tags."""

from __future__ import annotations

import logging
import os

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
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for pid in (os.getpid(), holder.pid, dead.pid):
            (tmp_path / f"abc.waiting-{pid}").touch()
        # A killed waiter's marker stays behind; only live processes wait.
        assert progress.build_status(tmp_path) == (
            "building the teacher, once: epoch 2/4, ~40 s left; 2 workers waiting for it")
        # The cache is shared by every sweep on the host: a launch counts its own workers only.
        assert progress.build_status(tmp_path, pids={holder.pid, dead.pid, 999_999_999}) == (
            "building the teacher, once: epoch 2/4, ~40 s left; 1 worker waiting for it")
        # Another sweep's build, which none of this launch's workers runs or waits for: not shown.
        assert progress.build_status(tmp_path, pids={dead.pid, 999_999_999}) is None
        assert progress.build_status(tmp_path, pids={os.getpid()}) is not None  # one of its own waits
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert progress.build_status(tmp_path) is None  # its builder is gone: no longer shown


def test_eta_needs_a_finished_trial_and_work_left() -> None:
    assert progress.eta([], [], 10, 2, epochs=4) == ""
    assert progress.eta([(30.0, 3)], [], 0, 2, epochs=3) == ""  # nothing left


def test_eta_is_the_epochs_left_times_the_seconds_an_epoch_takes() -> None:
    # 10 s an epoch, no pruning so far (4 of 4 epochs each): 9 trials x 40 s / 2 workers.
    assert progress.eta_seconds([(40.0, 4), (40.0, 4)], [], 9, 2, epochs=4) == pytest.approx(180.0)
    # The first wave waited for the teacher: once later trials finished, only theirs count.
    assert progress.eta_seconds([(190.0, 4), (190.0, 4), (40.0, 4), (40.0, 4)], [], 3, 2,
                                epochs=4) == pytest.approx(60.0)


def test_eta_counts_the_epochs_pruning_leaves_trials() -> None:
    """Half the trials so far were pruned after 1 of 9 epochs: a trial not yet started is
    expected to run 5 epochs, not 9; one that got past the cut is expected to finish."""
    finished = [(90.0, 9), (10.0, 1), (90.0, 9), (10.0, 1)]  # 10 s an epoch
    # 4 waiting x 5 epochs + a running trial at epoch 3 (6 left) = 26 epochs / 2 workers x 10 s.
    assert progress.eta_seconds(finished, [3], 4, 2, epochs=9) == pytest.approx(130.0)
    # The last trial alone: it sets the time, whatever the number of idle workers.
    assert progress.eta_seconds(finished, [3], 0, 4, epochs=9) == pytest.approx(60.0)


def test_eta_includes_the_reference_run_after_the_sweep() -> None:
    finished = [(40.0, 4), (40.0, 4)]
    without = progress.eta_seconds(finished, [], 2, 2, epochs=4)
    assert progress.eta_seconds(finished, [], 2, 2, epochs=4, reference=True) == pytest.approx(without + 40.0)
    # The sweep done, the reference still to run: not "nothing left".
    assert progress.eta(finished, [], 0, 2, epochs=4, reference=True) == "~40 s left"


def test_log_lines_do_not_run_into_a_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A worker's log line written while its bar is drawn starts on a line of its own."""
    import sys

    monkeypatch.setenv("KDSWEEP_PROGRESS", "bars")
    handler = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    log = logging.getLogger("kdsweep.test")
    for i in progress.track(range(3), 3, "epoch 1/2", "batch"):
        if i == 1:
            log.warning("trial 9 interrupted and re-queued")
    err = capsys.readouterr().err
    line = next(x for x in err.replace("\r", "\n").split("\n") if "re-queued" in x)
    assert line == "trial 9 interrupted and re-queued", repr(line)
