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
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from kdsweep.service.worker import Counts, counts


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


def plan_workers(workers: int, device: str, storage_url: str) -> list[WorkerPlan]:
    """Environment and device of each worker: GPUs round-robin, CPU threads split evenly."""
    gpus = visible_gpus() if device in ("auto", "cuda") or device.startswith("cuda") else []
    threads = max(1, cpu_cores() // workers)
    plans = []
    for i in range(workers):
        env = dict(os.environ)
        env["KDSWEEP_STORAGE"] = storage_url
        env["KDSWEEP_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        # Several workers share one terminal: log lines, not bars that overwrite each other.
        env.setdefault("KDSWEEP_PROGRESS", "bars" if workers == 1 else "lines")
        level = logging.getLogger("kdsweep").getEffectiveLevel()  # -q / -vv reach the workers
        if level >= logging.WARNING:
            env["KDSWEEP_QUIET"] = "1"
        elif level <= logging.DEBUG:
            env["KDSWEEP_VERBOSE"] = "2"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        plans.append(WorkerPlan(i, env, "cuda" if gpus else "cpu"))
    return plans


def best_line(study: optuna.Study) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "no finished trial yet"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    return f"best {best.value:.4f} (trial {best.number}: {params})"


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def progress_line(c: Counts, n_trials: int, study: optuna.Study) -> str:
    return (f"[{c.finished}/{n_trials}] complete {c.complete}, pruned {c.pruned}, "
            f"failed {c.failed}, running {c.running} | {best_line(study)}")


def summary_table(study: optuna.Study, top: int = 5) -> str:
    """The best `top` trials as a fixed-width table."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda t: t.value, reverse=maximize)
    if not done:
        return "no complete trials."
    keys = sorted({k for t in done[:top] for k in t.params})
    header = ["trial", "value", "epochs"] + keys
    rows = [[str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("epochs_run", ""))]
            + [_fmt(t.params.get(k, "-")) for k in keys] for t in done[:top]]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header] + rows]
    return "\n".join(lines)


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
    study: optuna.Study,
    worker_args: list[str],
    plans: list[WorkerPlan],
    n_trials: int,
    echo: Callable[[str], None],
    timeout: float | None = None,
    poll: float = 2.0,
    extra_env: Mapping[str, str] | None = None,
    grace: float = 60.0,
) -> tuple[Counts, str]:
    """Start the workers and watch them; returns the final counts and how it ended.

    Ends as 'done', 'timeout' or 'interrupted'. On Ctrl-C/SIGTERM/SIGHUP (or the timeout)
    workers get SIGTERM: each re-queues its running trial (with its checkpoint) and exits
    within seconds. On every other way out (the storage unreachable past its retry budget, any
    exception) they are stopped the same way before the exception goes on; a worker still
    running `grace` seconds later is killed. The workers form one process group, and each
    gets SIGTERM from the kernel if launch itself is killed, so none is ever left behind.
    """
    procs: list[subprocess.Popen] = []
    group: int | None = None
    stop = {"why": ""}

    def on_signal(signum: int, frame: object) -> None:
        stop["why"] = "interrupted"

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in handled}
    start = time.monotonic()
    last = ""
    try:
        for plan in plans:
            env = {**plan.env, **(extra_env or {})}
            cmd = [sys.executable, "-m", "kdsweep", "worker", *worker_args,
                   "--device", plan.device, "--worker-index", str(plan.index)]
            # Their own group: a terminal's Ctrl-C reaches launch alone, which stops them.
            procs.append(subprocess.Popen(cmd, env=env, process_group=group or 0,
                                          preexec_fn=_die_with_parent))
            group = group or procs[0].pid
        while any(p.poll() is None for p in procs):
            if stop["why"]:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                stop["why"] = "timeout"
                break
            line = progress_line(counts(study), n_trials, study)
            if line != last:
                echo(line)
                last = line
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
    final = counts(study)
    echo(progress_line(final, n_trials, study))
    return final, stop["why"] or "done"
