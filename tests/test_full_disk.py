"""A full disk and a read-only one, for real: a small tmpfs mounted for the test and filled.

Mounting needs root (CI containers and this machine run tests as root); elsewhere these tests
skip, saying so. Each case checks that kdsweep stops at once with one sentence naming the
cause (no minutes of retries ending in "did not answer"), and leaves no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parent / "studies" / "tiny.py"


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "4m") mounted at `folder`; skips the test where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Write a filler file until the disk has no space left, then free `leave` bytes of it."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    chunk = b"\0" * 4096
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    if leave:
        os.truncate(disk / "filler", (disk / "filler").stat().st_size - leave)


def kdsweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdsweep", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "KDSWEEP_RETRIES": "12"}, timeout=300)


def one_sentence(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out[-3000:]
    assert "retry" not in out, f"a permanent error was retried:\n{out[-3000:]}"
    return errors[0]


def test_sqlite_on_a_full_disk_stops_at_once_and_says_so(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        url = f"sqlite:///{disk / 'sweep.db'}"
        first = kdsweep("create", str(TINY), "--preset", "quick", "--storage", url, "-n", "3", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        con = sqlite3.connect(disk / "sweep.db")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # so the next write must grow the WAL file
        con.close()
        fill(disk)
        again = kdsweep("create", str(TINY), "--preset", "quick", "--storage", url, "-n", "40", cwd=tmp_path)
        assert again.returncode == 1, again.stderr[-3000:]
        message = one_sentence(again)
        assert "the disk holding the database is full" in message and "free space" in message, message
        # SQLite's own words follow: "database or disk is full", or "disk I/O error" where its
        # shared-memory file could not grow (then the free bytes are named too).
        assert "database or disk is full" in message or "0 bytes free" in message, message


def test_a_disk_that_fills_under_a_running_worker_is_not_retried(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage is open (as in a worker mid-sweep) when the disk fills: the next write ends at
    once in a StorageError naming the full disk, rather than minutes of retries."""
    import time

    import optuna

    from kdsweep.service import storage

    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("a full disk was retried"))
    with small_disk(tmp_path / "disk", "2m") as disk:
        url = f"sqlite:///{disk / 'sweep.db'}"
        st = storage.open_storage(url, heartbeat=False)
        study = optuna.create_study(study_name="full", storage=st)
        con = sqlite3.connect(disk / "sweep.db")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        fill(disk)
        with pytest.raises(storage.StorageError, match="the disk holding the database is full") as caught:
            for i in range(50):  # the first write that needs a new page of the WAL file
                study.set_user_attr(f"note-{i}", "x" * 2000)
        assert "free space there" in str(caught.value)


def test_sqlite_on_a_read_only_disk_stops_at_once_and_says_so(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        url = f"sqlite:///{disk / 'sweep.db'}"
        first = kdsweep("create", str(TINY), "--preset", "quick", "--storage", url, "-n", "3", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        again = kdsweep("create", str(TINY), "--preset", "quick", "--storage", url, "-n", "40", cwd=tmp_path)
        assert again.returncode == 1, again.stderr[-3000:]
        message = one_sentence(again)
        assert "the database is read-only" in message and "write access" in message, message


def test_a_checkpoint_on_a_full_disk_fails_clearly_and_leaves_no_partial_file(tmp_path: Path,
                                                                             tiny_npz: Path) -> None:
    from kdsweep.core.config import DataConfig, ModelConfig, TrainConfig
    from kdsweep.core.train import TrainingError, train

    config = TrainConfig(data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=200, pad=0, flip=False),
                         model=ModelConfig(arch="mlp", hidden=(256, 256)), epochs=2, batch_size=64,
                         device="cpu", threads=1)
    with small_disk(tmp_path / "disk", "1m") as disk:
        folder = disk / "checkpoints"
        folder.mkdir()
        fill(disk)
        with pytest.raises(TrainingError, match=r"cannot write the checkpoint .*trial-7\.pt: its disk is full"):
            train(config, checkpoint=folder / "trial-7.pt")
        assert sorted(p.name for p in folder.iterdir()) == []  # no trial-7.pt.tmp left behind


@pytest.mark.parametrize("free_kib", [0, 96])
def test_a_new_database_on_a_full_disk_leaves_no_file_behind(tmp_path: Path, free_kib: int) -> None:
    """Full, or so nearly full that SQLite starts the new database and fails half-way: no
    file is left (then `status` says there is none, not that it holds no study)."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "keep").mkdir()
        fill(disk, leave=free_kib * 1024)
        url = f"sqlite:///{disk / 'keep' / 'sweep.db'}"
        for command in ("create", "launch"):
            result = kdsweep(command, str(TINY), "--preset", "quick", "--storage", url, "-n", "3", cwd=tmp_path)
            assert result.returncode == 1, result.stderr[-3000:]
            message = one_sentence(result)
            assert "the disk holding the database is full" in message, message
            assert sorted(p.name for p in (disk / "keep").iterdir()) == [], command
        status = kdsweep("status", "tiny", "--storage", url, cwd=tmp_path)
        assert status.returncode != 0 and "does not exist" in status.stderr, status.stderr[-3000:]


def test_an_existing_database_on_a_full_disk_keeps_its_files_as_they_were(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        url = f"sqlite:///{disk / 'sweep.db'}"
        first = kdsweep("create", str(TINY), "--preset", "quick", "--storage", url, "-n", "3", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        before = sorted(p.name for p in disk.iterdir())
        assert before == ["sweep.db"], before  # the last connection's close removed -wal and -shm
        fill(disk)
        for command in ("create", "launch"):
            again = kdsweep(command, str(TINY), "--preset", "quick", "--storage", url, "-n", "40", cwd=tmp_path)
            assert again.returncode == 1, again.stderr[-3000:]
            assert "the disk holding the database is full" in one_sentence(again)
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "sweep.db"], command
        (disk / "filler").unlink()
        status = kdsweep("status", "tiny", "--storage", url, cwd=tmp_path)
        assert status.returncode == 0 and "N=3" in status.stdout, status.stdout + status.stderr[-3000:]
