"""Progress of long steps: a bar on a terminal, a plain log line now and then elsewhere.

* On a terminal (stderr is a tty, log level INFO or more verbose) `Bar` draws a tqdm bar that
  disappears when the step ends; the step's own summary log line stays.
* When stderr is a file or a pipe (CI, Slurm, `kdsweep launch` with several workers sharing one
  terminal) it writes no bar, only a log line every `LINE_S` seconds of a step that is still
  running, so a slow epoch is visibly alive but logs stay readable.
* `--quiet` (log level WARNING) shows neither.

`KDSWEEP_PROGRESS=bars|lines|off` overrides the choice (`launch` sets `lines` for its workers
when it runs more than one). Log lines of a worker carry its index and the trial it is
running (`[w1 t12]`), through `trial_tag` and the formatter `install_log_format` sets up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

log = logging.getLogger("kdsweep.core.progress")

LINE_S = 30.0  # seconds between the plain log lines of a step that is still running
_TRIAL: ContextVar[int | None] = ContextVar("kdsweep_trial", default=None)
_LABEL: ContextVar[str | None] = ContextVar("kdsweep_label", default=None)  # how bars name the run
T = TypeVar("T")


@contextmanager
def trial_tag(number: int | None, label: str | None = None) -> Iterator[None]:
    """Tag log lines (and progress bars) written inside the block with trial `number`.

    `label` replaces "trial N" in progress lines, e.g. "verify run 3 (sweep trial 29)" for a
    seed-verification run, whose own number means nothing next to the sweep's trials, or
    "teacher" for the build every trial waits on (log lines then read `[w1 teacher]`).
    """
    token, label_token = _TRIAL.set(number), _LABEL.set(label)
    try:
        yield
    finally:
        _TRIAL.reset(token)
        _LABEL.reset(label_token)


def current_trial() -> int | None:
    return _TRIAL.get()


class _TrialFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        n, label = _TRIAL.get(), _LABEL.get()
        record.trial = f" {label.split(' ')[0]}" if label and n is None else (f" t{n}" if n is not None else "")
        return True


def setup_logging(verbose: int, quiet: bool, worker: int | None = None) -> None:
    """kdsweep's log lines on stderr: INFO by default, WARNING with -q, DEBUG with -vv."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, force=True)
    install_log_format(worker)  # "12:00:00 [w1 t12] ...": worker index and trial number
    logging.getLogger("kdsweep").setLevel(level)


def install_log_format(worker: int | None) -> None:
    """Prefix every root-handler log line with the worker index and the current trial."""
    tag = f" [w{worker}%(trial)s]" if worker is not None else "%(trial)s"
    fmt = logging.Formatter(f"%(asctime)s{tag} %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_TrialFilter())
        handler.setFormatter(fmt)


def mode() -> str:
    """'bars', 'lines' or 'off' for this process (see the module docstring)."""
    if not logging.getLogger("kdsweep").isEnabledFor(logging.INFO):
        return "off"
    forced = os.environ.get("KDSWEEP_PROGRESS", "").lower()
    if forced in ("bars", "lines", "off"):
        return forced
    try:
        return "bars" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return "lines"


class Bar:
    """Progress of one step of `total` units; use as a context manager, call `update()`."""

    def __init__(self, total: int, desc: str, unit: str = "batch") -> None:
        trial, label = _TRIAL.get(), _LABEL.get()
        name = label or (f"trial {trial}" if trial is not None else None)
        self.desc = f"{name}: {desc}" if name else desc
        self.total, self.unit, self.done = total, unit, 0
        self.mode = mode()
        self._bar = None
        self._redirect = None
        self._last = time.monotonic()
        if self.mode == "bars":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=unit, leave=False, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)
            # Log lines written while the bar is drawn go through tqdm.write, which clears the
            # bar first and redraws it below, so a line never runs into a half-drawn bar.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= LINE_S:
                self._last = now
                log.info("%s: %d/%d %s", self.desc, self.done, self.total, self.unit)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "item") -> Iterator[T]:
    """Iterate over `items`, showing a `Bar` of `total` units."""
    with Bar(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()


# ---------------------------------------------------------------- a shared build others wait for
# The teacher of a Q2 study is built once, by the first worker that needs it, while the others
# wait on its file lock. The builder writes `<key>.progress.json` beside the lock after every
# epoch, and each waiter a `<key>.waiting-<pid>` file, so `kdsweep launch` can say what is
# happening ("building the teacher, once: epoch 2/4, ~40 s left; 3 workers waiting for it").



def cache_dir() -> str:
    """Where teachers are cached by default: $KDSWEEP_CACHE, else ~/.cache/kdsweep (a config's
    own cache_dir overrides it; see kdsweep.core.train.cache_root)."""
    return os.path.expanduser(os.environ.get("KDSWEEP_CACHE") or "~/.cache/kdsweep")


def write_build_progress(path: str | os.PathLike, epoch: int, epochs: int, started: float,
                         done: bool = False) -> None:
    """Record a build's progress (epochs finished of `epochs`, wall-clock start) in `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"epoch": epoch, "epochs": epochs, "started": started, "updated": time.time(),
                   "done": done, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def build_status(folder: str | os.PathLike, pids: Collection[int] | None = None) -> str | None:
    """'building the teacher, once: epoch 2/4, ~40 s left; 3 workers waiting for it' for a build
    in progress under `folder` (the teacher cache), else None.

    Waiters are counted from their `<key>.waiting-<pid>` markers, only those of a live process
    and, given `pids` (a launch's own workers), only those: the cache is shared by every sweep
    on the host, and a killed waiter leaves its marker behind. Given `pids`, a build that none
    of them runs or waits for is not shown.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    now = time.time()
    for name in names:
        if not name.endswith(".progress.json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                p = json.load(f)
        except (OSError, ValueError):
            continue
        key = name[: -len(".progress.json")]
        if p.get("done") or not _held(os.path.join(folder, f"{key}.lock")):
            continue  # finished, or its builder died (the OS released its lock)
        waiting = sum(1 for n in names if n.startswith(f"{key}.waiting-")
                      and _live_waiter(n[len(f"{key}.waiting-"):], pids))
        if pids is not None and not waiting and p.get("pid") not in pids:
            continue  # another sweep's teacher: none of this launch's workers builds or waits for it
        epoch, epochs = int(p["epoch"]), int(p["epochs"])
        left = ""
        if epoch > 0:
            per_epoch = (p["updated"] - p["started"]) / epoch
            left = f", ~{_duration(per_epoch * (epochs - epoch) - (now - p['updated']))} left"
        others = f"; {waiting} worker{'s' if waiting != 1 else ''} waiting for it" if waiting else ""
        return f"building the teacher, once: epoch {epoch}/{epochs}{left}{others}"
    return None


def _live_waiter(pid_text: str, pids: Collection[int] | None) -> bool:
    """Whether a waiting marker's process is alive (and one of `pids`, when given)."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pids is not None and pid not in pids:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _held(lock_path: str) -> bool:
    """Whether another process holds the file lock at `lock_path` (a build in progress)."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def eta(finished: Sequence[tuple[float, int]], running: Sequence[int], waiting: int, workers: int,
        epochs: int, reference: bool = False) -> str:
    """'~3 min left' from the work that remains, or '' before any trial finished or when none is
    left (see `eta_seconds`)."""
    seconds = eta_seconds(finished, running, waiting, workers, epochs, reference)
    return "" if seconds is None else f"~{_duration(seconds)} left"


def eta_seconds(finished: Sequence[tuple[float, int]], running: Sequence[int], waiting: int, workers: int,
                epochs: int, reference: bool = False) -> float | None:
    """Seconds until a sweep is done: the epochs left / workers x the seconds one epoch takes.

    `finished`: (wall seconds, epochs run) of each finished trial (complete or pruned), in the
    order they finished (the seconds a trial trained: `kdsweep launch` leaves out the time it
    waited for the teacher); `running`: the epochs each running trial has done; `waiting`: trials
    not started; `epochs`: a trial's full length. A trial that has done d epochs is expected to
    run as long as the finished trials that got past d did (pruning so far decides that), a
    trial not yet started as long as the finished ones did on average. Seconds per epoch come
    from the finished trials, leaving out the first wave (one per worker) once later ones exist:
    it started cold, beside the teacher's build (while a build runs, `build_status` gives its
    own time left). `reference`: the alpha=0 reference (one full-length trial, alone) still runs after
    the last trial. None before any trial finished or when nothing is left.
    """
    if not finished or (waiting <= 0 and not running and not reference):
        return None
    later = list(finished[workers:]) or list(finished)
    per_epoch = sum(w for w, _ in later) / max(1, sum(e for _, e in later))

    def left(done: int) -> float:
        beyond = [e - done for _, e in finished if e > done]
        return sum(beyond) / len(beyond) if beyond else float(max(0, epochs - done))

    each = [left(0)] * max(0, waiting) + [left(d) for d in running]
    trials = max(sum(each) / max(1, workers), max(each, default=0.0)) * per_epoch
    return trials + (epochs * per_epoch if reference else 0.0)
