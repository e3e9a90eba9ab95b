"""`kdsweep launch` stopped by Ctrl-C: it returns as soon as its workers are gone.

A stopped worker re-queues its trial within a second; what used to follow it was the
interpreter's final garbage collections in every process (seconds each with torch, Optuna and
SQLAlchemy loaded) and, in launch, importing optuna-dashboard to write the study's note.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from pgcluster import wait_until

from kdsweep.service.storage import open_storage

TINY = Path(__file__).resolve().parent / "studies" / "tiny.py"
DONE = re.compile(r"\[w\d\] worker \d done: .* - interrupted")


def test_every_command_exits_without_the_last_garbage_collections(tmp_path: Path) -> None:
    """gc.freeze runs at exit (before logging's shutdown, which still flushes): the objects
    loaded so far are not walked again by the interpreter's final collections."""
    open_storage(f"sqlite:///{tmp_path / 'x.db'}")  # an empty storage for `kdsweep ls`
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from kdsweep.cli import main\n"
        f"main(['ls', '--storage', 'sqlite:///{tmp_path / 'x.db'}'], standalone_mode=False)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("frozen True"), out.stdout


def _launch(tmp: Path, url: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdsweep", "launch", str(TINY), "--preset", "slow", "--n-trials", "3",
           "--workers", "2", "--device", "cpu", "--no-tensorboard", "--artifacts", str(tmp / "artifacts")]
    env = {**os.environ, "KDSWEEP_STORAGE": url, "KDSWEEP_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("KDSWEEP_HEARTBEAT", None)  # the default heartbeat: the one a user's Ctrl-C meets
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp, start_new_session=True)


def _load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat=False))


def _system_attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


@pytest.mark.slow
def test_ctrl_c_returns_once_the_workers_are_done_and_the_study_resumes(tmp_path: Path, fmnist_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    proc = _launch(tmp_path, url)
    lines: list[tuple[float, str]] = []

    def read() -> None:  # each output line with the time it arrived
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        def running() -> bool:
            try:
                return any(t.intermediate_values for t in _load(url).get_trials(states=(TrialState.RUNNING,)))
            except KeyError:  # launch has not created the study yet
                return False

        wait_until(running, 120, 0.2, "a trial to report an epoch")
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
        proc.wait(timeout=120)
        ended = time.monotonic()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(line for _, line in lines)
    assert proc.returncode == 130, out[-3000:]
    done = [at for at, line in lines if DONE.search(line)]
    assert len(done) == 2, out[-3000:]  # both workers re-queued their trial and said so
    # What follows the last worker's last line: its exit, launch's summary and launch's exit.
    # It took 12-15 s on a busy 2-core host (garbage collections at exit, the dashboard note).
    assert ended - max(done) < 5.0, f"launch returned {ended - max(done):.1f} s after its workers were done"
    study = _load(url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert "dashboard:note_ver" not in _system_attrs(study)  # the launch that finishes it writes the note

    again = _launch(tmp_path, url)
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out2[-3000:]
    study = _load(url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3 and not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    assert "dashboard:note_ver" in _system_attrs(study)


def test_the_first_eta_of_a_kd_sweep_leaves_out_the_teacher_build(tmp_path: Path, tmp_cache: Path) -> None:
    """The q2 smoke job (50 trials, 4 workers): the teacher took 286 s, an epoch ~28 s. The
    first wave's 4 trials waited for the teacher, so each took 286 s + its epochs; spread over
    those epochs, that read 3-4 times the time left (~66 min here for the other 46 trials of
    2 epochs, not ~11)."""
    from kdsweep.service import keys
    from kdsweep.service import spec as specs
    from kdsweep.service.launch import status_line
    from kdsweep.service.sweep import Sweep

    spec = specs.load(str(TINY.parent / "tiny_kd.py"))  # 2 epochs a trial (preset quick)
    sweep = Sweep.create(open_storage(f"sqlite:///{tmp_path / 'kd.db'}"), spec, "quick", "kd", 50, seed=0)
    for _ in range(4):  # the first wave: each waited 286 s for the teacher, then trained 2 x 28 s
        sweep.study.add_trial(optuna.trial.create_trial(
            value=0.8, intermediate_values={1: 0.7, 2: 0.8},
            user_attrs={keys.WALL_TIME: 286.0 + 56.0, "teacher_s": 286.0, keys.EPOCHS_RUN: 2}))
    line = status_line(sweep, 4)
    assert line.startswith("[4/50]") and line.endswith("| ~11 min left"), line  # 46 x 2 x 28 s / 4
    # A trial that did not wait (no teacher, or a study stored before it was recorded): its wall time.
    sweep.study.add_trial(optuna.trial.create_trial(
        value=0.8, intermediate_values={1: 0.7, 2: 0.8}, user_attrs={keys.WALL_TIME: 56.0, keys.EPOCHS_RUN: 2}))
    assert status_line(sweep, 4).endswith("| ~10 min left")  # 45 x 2 x 28 s / 4, from the later trial
