"""`kdsweep launch`: create or resume a study, run W worker processes, show progress.

Workers are ordinary `kdsweep worker` processes (the same code path a remote host runs), each
pinned to one GPU round-robin through CUDA_VISIBLE_DEVICES and given its share of the CPU
cores, so W workers on C cores never oversubscribe them. The storage URL reaches them through
the environment, never the command line, where `ps` would show its password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdsweep.service.spec import StudySpec

if TYPE_CHECKING:  # imported where used: `kdsweep launch` answers a usage error without Optuna
    from optuna.trial import FrozenTrial

    from kdsweep.service.sweep import Counts, Sweep


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """GPU ids this process may use, honouring an existing CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@dataclass
class WorkerPlan:
    index: int
    env: dict[str, str]
    device: str  # what the worker passes to train(): cpu or cuda


def plan_workers(workers: int, device: str, storage_url: str,
                 threads: int | None = None) -> list[WorkerPlan]:
    """Environment and device of each worker: GPUs round-robin, CPU threads split evenly.

    `threads` (else a KDSWEEP_THREADS the user set) is every worker's thread count as given;
    otherwise each worker gets cores // workers, so workers x threads never exceeds the cores
    (OpenMP threads of processes sharing cores spin while they wait for each other).
    """
    gpus = visible_gpus() if device in ("auto", "cuda") or device.startswith("cuda") else []
    user = threads or int(os.environ.get("KDSWEEP_THREADS") or 0)
    threads = user if user > 0 else max(1, cpu_cores() // workers)
    plans = []
    for i in range(workers):
        env = dict(os.environ)
        env["KDSWEEP_STORAGE"] = storage_url
        env["KDSWEEP_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        # Several workers share one terminal: log lines, not bars that overwrite each other.
        # One worker decides by itself (bars only when its stderr, launch's, is a terminal),
        # so a launch whose output goes to a log file never writes bars into it.
        if workers > 1:
            env.setdefault("KDSWEEP_PROGRESS", "lines")
        level = logging.getLogger("kdsweep").getEffectiveLevel()  # -q / -vv reach the workers
        if level >= logging.WARNING:
            env["KDSWEEP_QUIET"] = "1"
        elif level <= logging.DEBUG:
            env["KDSWEEP_VERBOSE"] = "2"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        plans.append(WorkerPlan(i, env, "cuda" if gpus else "cpu"))
    return plans


ETA_EVERY_S = 30.0  # seconds between status lines that differ only in their time left
_ETA = re.compile(r"~[^;|]* left")


def status_line(sweep: Sweep, workers: int, pids: Collection[int] | None = None, reference: bool = False) -> str:
    """The progress line, with what a first run spends its first minutes on (the teacher's
    build, and how many of this launch's workers, `pids`, wait for it) and the sweep's ETA
    (`reference`: the alpha=0 reference run still follows the sweep; see `progress.eta_seconds`)."""
    from optuna.trial import TrialState

    from kdsweep.core import progress
    from kdsweep.service import keys

    c = sweep.counts()
    line = sweep.progress_line(c)
    building = progress.build_status(os.path.join(progress.cache_dir(), "teachers"), pids)
    if building:
        return f"{line} | {building}"
    done = sorted((t for t in sweep.trials(TrialState.COMPLETE, TrialState.PRUNED)
                   if keys.WALL_TIME in t.user_attrs and t.datetime_complete), key=lambda t: t.datetime_complete)
    finished = training_times(done)
    running = [len(t.intermediate_values) for t in sweep.trials(TrialState.RUNNING)]
    epochs = int((sweep.definition.get("config") or {}).get("epochs") or max((e for _, e in finished), default=1))
    left = progress.eta(finished, running, c.waiting, workers, epochs, reference)
    return f"{line} | {left}" if left else line


def training_times(trials: Sequence[FrozenTrial]) -> list[tuple[float, int]]:
    """(seconds, epochs) each finished trial spent training, for `progress.eta`: its wall time
    less the time it spent building the teacher or waiting for it. The teacher is built once,
    at the start; the first wave's trials (one per worker) waited for it, and minutes of
    waiting spread over a few epochs made the first ETA of a KD sweep 3-4 times too long."""
    from kdsweep.service import keys

    return [(max(0.0, float(t.user_attrs[keys.WALL_TIME]) - float(t.user_attrs.get(keys.TEACHER_S) or 0.0)),
             _epochs_run(t)) for t in trials]


def _epochs_run(trial) -> int:
    from kdsweep.service import keys

    return int(trial.user_attrs.get(keys.EPOCHS_RUN) or len(trial.intermediate_values) or 1)


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when launch dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(procs: list[subprocess.Popen], group: int | None, grace: float) -> None:
    """SIGTERM every worker (its running trial is re-queued), SIGKILL what is left after
    `grace` seconds, and reap them all: no worker outlives launch."""

    def signal_all(sig: int) -> None:
        if group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)  # the workers and anything they started
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    if any(p.poll() is None for p in procs):
        signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    if any(p.poll() is None for p in procs):
        signal_all(signal.SIGKILL)
    elif group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)  # a straggler the workers started
    for p in procs:
        p.wait()


def run(
    sweep: Sweep,
    worker_args: list[str],
    plans: list[WorkerPlan],
    echo: Callable[[str], None],
    timeout: float | None = None,
    poll: float = 2.0,
    extra_env: Mapping[str, str] | None = None,
    grace: float = 60.0,
    first: list[str] | None = None,
    reference: Callable[[], bool] | None = None,
) -> tuple[Counts, str]:
    """Start the workers and watch them; returns the final counts and how it ended.

    Ends as 'done', 'timeout' or 'interrupted'. On Ctrl-C/SIGTERM/SIGHUP (or the timeout)
    workers get SIGTERM: each re-queues its running trial (with its checkpoint) and exits
    within seconds. On every other way out (the storage unreachable past its retry budget, any
    exception) they are stopped the same way before the exception goes on; a worker still
    running `grace` seconds later is killed. The workers form one process group, and each
    gets SIGTERM from the kernel if launch itself is killed, so none is ever left behind.
    `first`: worker arguments the first worker runs to the end before its own (the alpha=0
    reference, so it is ready early rather than after the last trial). `reference`: whether
    that run still follows the sweep, asked at each status line (for the ETA).
    """
    procs: list[subprocess.Popen] = []
    group: int | None = None
    stop = {"why": ""}

    def on_signal(signum: int, frame: object) -> None:
        stop["why"] = "interrupted"

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in handled}
    start = time.monotonic()
    last, last_news, shown_at = "", "", 0.0
    try:
        def start_worker(plan: WorkerPlan, args: list[str], into: int | None) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "kdsweep", "worker", *args, "--device", plan.device,
                   "--worker-index", str(plan.index)]
            # Their own group: a terminal's Ctrl-C reaches launch alone, which stops them.
            return subprocess.Popen(cmd, env={**plan.env, **(extra_env or {})}, process_group=into or 0,
                                    preexec_fn=_die_with_parent)

        for i, plan in enumerate(plans):
            procs.append(start_worker(plan, first if first and i == 0 else worker_args, group))
            group = group or procs[0].pid
        then = bool(first and plans)  # the first worker's own work is still to start
        while then or any(p.poll() is None for p in procs):
            if then and procs[0].poll() is not None and not stop["why"]:
                # Into the workers' group while one of them keeps it; else a new group.
                alive = any(p.poll() is None for p in procs[1:])
                procs[0], then = start_worker(plans[0], worker_args, group if alive else None), False
                group = group if alive else procs[0].pid
            if stop["why"]:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                stop["why"] = "timeout"
                break
            line = status_line(sweep, len(procs), {p.pid for p in procs}, bool(reference and reference()))
            # A new line when something happened; a countdown alone only every ETA_EVERY_S.
            news = _ETA.sub("", line)
            if news != last_news or (line != last and time.monotonic() - shown_at >= ETA_EVERY_S):
                echo(line)
                last, last_news, shown_at = line, news, time.monotonic()
            # Short naps: time.sleep resumes after a signal handler, and Ctrl-C should stop
            # the workers at once, not after a whole polling period.
            nap_until = time.monotonic() + poll
            while not stop["why"] and time.monotonic() < nap_until:
                time.sleep(0.1)
        if stop["why"]:
            echo(f"{stop['why']}: stopping {len(procs)} worker(s); their running trials are re-queued.")
    finally:
        try:
            _stop(procs, group, grace)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    final = sweep.counts()
    line = status_line(sweep, len(procs), {p.pid for p in procs}, bool(reference and reference()))
    if line != last:  # "[50/50] ..." once, not again when nothing changed since the last line
        echo(line)
    return final, stop["why"] or "done"


# ---------------------------------------------------------------- what launch and worker check first


def runtime(device: str, data: str | None, download: bool = False, threads: int | None = None) -> dict[str, object]:
    """Per-host settings of a trial's config: device, data folder, CPU threads (this process's
    share of the cores: launch gives each of W workers cores // W; by hand, every core)."""
    out: dict[str, object] = {"device": device, "threads": threads or cpu_cores()}
    if data:
        out["data.root"] = data
    if download:
        out["data.download"] = True
    return out


def load_spec(study: str, preset: str, overrides: Sequence[str]) -> tuple[StudySpec, dict[str, object]]:
    """The study file (by name or path), checked with its preset and `--set` overrides."""
    from kdsweep.service import spec as specs

    spec = specs.load(study)
    spec.preset(preset)
    changes = specs.parse_overrides(overrides)
    spec.check_overrides(preset, changes)
    spec.space_for(preset, changes)
    return spec, changes


def check_device(device: str, needs_gpu: bool, preset: str, force: bool) -> None:
    """DeviceError for cuda without CUDA; StudyError for a GPU preset on a CPU (unless forced).

    A machine with no GPU device file at all is answered without importing torch (seconds).
    """
    from kdsweep.service.spec import StudyError

    def no_gpu() -> bool:
        if not gpu_device_files():
            return True
        import torch

        return not torch.cuda.is_available()

    if needs_gpu and not force and no_gpu():
        raise StudyError(f"preset {preset!r} is meant for a CUDA GPU and none is visible; "
                         "use --preset smoke, or add --force to run it on the CPU anyway.")
    from kdsweep.core import install
    from kdsweep.core.devices import resolve_device, resolve_precision

    install.check()  # torch and torchvision belong together: one sentence, not a traceback later
    resolve_precision("auto", resolve_device(device))  # a bad $KDSWEEP_PRECISION: one sentence, now


def gpu_device_files() -> list[str]:
    """The device files a CUDA (or ROCm) GPU shows on Linux; none means torch would find none."""
    import glob

    if sys.platform != "linux":
        return ["(not Linux: ask torch)"]
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg")


def default_workers(device: str, trials_per_device: int) -> int:
    """One worker per visible GPU (times `trials_per_device`), or 1 on the CPU."""
    gpus = visible_gpus() if device != "cpu" else []
    return len(gpus) * trials_per_device if gpus else 1


def preflight(spec, preset: str, overrides: Mapping[str, object], runtime: Mapping[str, object]) -> list[str]:
    """Load the data a trial will read (the teacher's too) and check the teacher's settings, so
    any problem is one sentence before anything is stored; returns the launch header's lines
    (the data and, for KD studies, the teacher, as they will actually be used)."""
    from kdsweep.core import data, teacher
    from kdsweep.core.train import input_shape, resolve_data

    config = spec.config_for(preset, {}, overrides, **runtime)
    splits = data.load_splits(config.data)
    config = resolve_data(config, splits)
    lines = [f"data: {data.describe(config.data, splits, input_shape(config, splits))}"]
    if config.kd is not None:
        lines.append(f"teacher: {teacher.preflight(config, splits)}")
    return lines


def with_dataset(spec, preset: str, overrides: Mapping[str, object], dataset: str | None,
                 runtime: Mapping[str, object]) -> dict[str, object]:
    """The overrides with --dataset and that data's augmentation recorded in them.

    Another dataset than the preset's drops the preset's flips and shifts (made for its own
    data) for the new data's defaults unless --set gives them; unset ones become explicit, so
    the study's definition says what every trial does.
    """
    from kdsweep.core import data

    changes = dict(overrides)
    base = spec.base_config(preset, changes).data
    if dataset and dataset != base.dataset:
        changes["data.dataset"] = dataset
        for key in ("data.pad", "data.flip"):
            changes.setdefault(key, None)
    base = spec.config_for(preset, {}, changes, **runtime).data
    if base.pad is None or base.flip is None:
        pad, flip = data.default_augmentation(base.dataset, data.load_splits(base).in_shape)
        if base.pad is None:
            changes["data.pad"] = pad
        if base.flip is None:
            changes["data.flip"] = flip
    return changes


def worker_args(source: str, study_name: str, data: str | None, download: bool, artifacts: str | None,
                tensorboard: bool, fuse: int = 1, track: str | None = None) -> list[str]:
    """The `kdsweep worker` arguments launch gives each of its workers."""
    args = [source, "--study-name", study_name]
    if fuse > 1:
        args += ["--fuse", str(fuse)]
    if data:
        args += ["--data", data]
    if download:
        args.append("--download")
    if artifacts:
        args += ["--artifacts", artifacts]
    if not tensorboard:
        args.append("--no-tensorboard")
    if track:
        args += ["--track", track]
    return args


def start_worker(storage, spec, study_name: str, preset: str | None, runtime: Mapping[str, object],
                 artifacts, tensorboard, worker_index: int = 0, fuse: int = 1, track: str | None = None):
    """`kdsweep worker`: join `study_name` (refusing another study file, preset or version) and
    run its waiting trials, `fuse` at a time in one fused model when fuse > 1 (Q2-like studies
    only: kdsweep/service/fused_worker.py); returns the worker's summary."""
    from kdsweep.core import install
    from kdsweep.core.devices import resolve_device, resolve_precision
    from kdsweep.service.objective import Objective
    from kdsweep.service.spec import StudyError
    from kdsweep.service.sweep import Sweep, SweepNotFound
    from kdsweep.service.worker import run_worker

    try:
        found = Sweep.load(storage, study_name, spec)
    except SweepNotFound:
        raise StudyError(f"no study named {study_name!r} in this storage; "
                         "create it with `kdsweep create` or `kdsweep launch`.") from None
    if preset is not None and found.definition.get("preset") not in (None, preset):
        raise StudyError(f"study {study_name!r} was created with preset {found.preset!r}, not {preset!r}; "
                         "drop --preset (workers read it from the study) or use another --study-name.")
    sweep = Sweep.join(storage, study_name, spec)
    if fuse > 1:
        from kdsweep.service.fused_worker import check_fusable

        check_fusable(spec, sweep.preset, sweep.overrides)
    install.check()
    resolve_precision("auto", resolve_device(str(runtime["device"])))
    preflight(spec, sweep.preset, sweep.overrides, runtime)
    objective = Objective(spec, sweep.preset, dict(runtime), artifacts, tensorboard=tensorboard,
                          track=track, overrides=sweep.overrides)
    if fuse > 1:
        from kdsweep.service.fused_worker import run_fused_worker

        summary = run_fused_worker(sweep, objective, fuse)
    else:
        summary = run_worker(sweep, objective)
    logging.getLogger("kdsweep").info(
        "worker %d done: %d trials (%d complete, %d pruned, %d failed, %d re-queued)%s", worker_index,
        summary.ran, summary.complete, summary.pruned, summary.failed, summary.requeued,
        " - interrupted" if summary.interrupted else (" - stopped" if summary.stopped else ""))
    return summary


def launch(url: str, spec, preset: str, overrides: Mapping[str, object], study_name: str | None,
           n_trials: int | None, seed: int, device: str, force: bool, workers: int | None,
           trials_per_device: int, data: str | None, download: bool, artifacts: str | None,
           tensorboard: bool, timeout: float | None, echo: Callable[[str], None], *,
           threads: int | None = None, fuse: int = 1, track: str | None = None) -> tuple[Sweep, Counts, str]:
    """`kdsweep launch`: check the device and the data, create or resume the sweep, run its
    workers; (sweep, final counts, how it ended: done, finished, timeout or interrupted).

    `threads`: CPU threads of each worker (None: KDSWEEP_THREADS if the user set it, else
    cores // workers; see `plan_workers`). `fuse` > 1: each worker trains that many Q2 trials
    as one fused model (refused, before anything is stored, for a study that cannot be fused).
    `track`: "mlflow" logs each trial as one MLflow run (kdsweep/service/tracking.py).

    A sweep that has nothing left to run prints its summary and starts no worker ('finished').
    """
    from kdsweep.service.storage import open_storage, redact
    from kdsweep.service.sweep import Sweep

    check_device(device, spec.preset(preset).needs_gpu, preset, force)
    if fuse > 1:
        from kdsweep.service.fused_worker import check_fusable

        check_fusable(spec, preset, overrides)
    workers = workers or default_workers(device, trials_per_device)
    header = preflight(spec, preset, overrides, runtime(device, data, download))  # before anything is stored
    sweep = Sweep.create(open_storage(url), spec, preset, study_name, n_trials, seed=seed, overrides=overrides)
    c = sweep.counts()
    if c.waiting + c.running == 0:
        echo(f"{sweep.progress_line(c)}\n{sweep.summary_table()}")
        return sweep, c, "finished"
    echo(f"study {sweep.name!r} ({spec.name}, preset {preset}) in {redact(url)}: "
         f"{sweep.n_trials} trials, {workers} worker(s)")
    for line in header:  # what will actually be used: data, sizes, augmentation, the teacher
        echo(line)
    args = worker_args(spec.source, sweep.name, data, download, artifacts, tensorboard, fuse, track)
    from optuna.trial import TrialState

    from kdsweep.service import baseline, verify

    reference = baseline.prepare(sweep)  # the alpha=0 run: the first worker takes it first
    early = None
    if reference is not None and reference.trials(TrialState.WAITING):
        echo(f"worker 0 trains the student alone (alpha=0) first, in {reference.name!r}")
        early = worker_args(spec.source, reference.name, data, download, artifacts, tensorboard, track=track)
    final, how = run(sweep, args, plan_workers(workers, device, url, threads), echo, timeout=timeout, first=early,
                     reference=ReferenceDue(sweep))
    reference = baseline.prepare(sweep) if how == "done" else None  # its run failed or was stopped
    if reference is not None and reference.trials(TrialState.WAITING):
        # The student alone (alpha=0), outside N: one run, one worker with this host's cores.
        echo(f"training the student alone (alpha=0) once, in {reference.name!r}")
        solo = worker_args(spec.source, reference.name, data, download, artifacts, tensorboard, track=track)
        run(reference, solo, plan_workers(1, device, url), echo)
    echo(sweep.summary_table())
    if sweep.best_trial is not None:  # else the table has said "no complete trials."
        for line in verify.noise_summary(sweep):  # how much of the top is noise
            echo(line)
    if how != "interrupted":  # Ctrl-C returns at once: the note imports optuna-dashboard (pandas,
        # scikit-learn: seconds); the launch that finishes the study writes it
        from kdsweep.service.dashboard import write_verdict

        write_verdict(sweep)  # the same verdict as the study's note in optuna-dashboard
    return sweep, final, how


class ReferenceDue:
    """Whether the alpha=0 reference run still follows `sweep` (for its ETA), asked anew at
    each status line until it turns false: worker 0 runs it first, so it is usually done
    while the sweep still runs, and from then on the ETA must leave it out. Once false, it
    stays false without another storage read."""

    def __init__(self, sweep: Sweep) -> None:
        from kdsweep.service import baseline, keys

        self.sweep = sweep
        self.due = (keys.BASELINE_OF not in sweep.attrs and sweep.verifies is None
                    and baseline.reference_point(sweep.spec.space) is not None)

    def __call__(self) -> bool:
        from kdsweep.service import baseline

        if self.due:
            self.due = baseline.result(self.sweep) is None
        return self.due


# A study stopped short of N that the same command finishes: sysexits' EX_TEMPFAIL ("a
# temporary failure; the user is invited to retry"), so `launch ... && next` does not go on.
EXIT_RESUME = 75


def ending(sweep: Sweep, final: Counts, how: str) -> tuple[str, int]:
    """The closing sentence of a launch and its exit code: 0 done; 1 a study short of N after
    failures; 75 (`EXIT_RESUME`) stopped short by --timeout or `kdsweep stop`, the same command
    finishes it; 130 interrupted."""
    if how == "done" and sweep.stop_requested:
        return "stopped by `kdsweep stop`: run the same command again to finish the study.", EXIT_RESUME
    if how in ("interrupted", "timeout"):
        return f"{how}: run the same command again to finish the study.", 130 if how == "interrupted" else EXIT_RESUME
    if how == "done" and final.finished < (sweep.n_trials or 0):
        return (f"the study has {final.finished} of {sweep.n_trials} finished trials after {final.failed} "
                "failures; see `kdsweep status` for their reasons."), 1
    return "", 0
