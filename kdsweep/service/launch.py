"""`kdsweep launch`: create or resume a study, run W worker processes, show progress.

Workers are ordinary `kdsweep worker` processes (the same code path a remote host runs), each
pinned to one GPU round-robin through CUDA_VISIBLE_DEVICES and given its share of the CPU
cores, so W workers on C cores never oversubscribe them. The storage URL reaches them through
the environment, never the command line, where `ps` would show its password.
"""

from __future__ import annotations

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


def run(
    study: optuna.Study,
    worker_args: list[str],
    plans: list[WorkerPlan],
    n_trials: int,
    echo: Callable[[str], None],
    timeout: float | None = None,
    poll: float = 2.0,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[Counts, str]:
    """Start the workers and watch them; returns the final counts and how it ended.

    Ends as 'done', 'timeout' or 'interrupted'. On Ctrl-C/SIGTERM (or the timeout) workers get
    SIGTERM: each re-queues its running trial (with its checkpoint) and exits within seconds.
    """
    procs: list[subprocess.Popen] = []
    for plan in plans:
        env = {**plan.env, **(extra_env or {})}
        cmd = [sys.executable, "-m", "kdsweep", "worker", *worker_args,
               "--device", plan.device, "--worker-index", str(plan.index)]
        procs.append(subprocess.Popen(cmd, env=env))

    stop = {"why": ""}

    def on_signal(signum: int, frame: object) -> None:
        stop["why"] = "interrupted"

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    last = ""
    try:
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
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    final = counts(study)
    echo(progress_line(final, n_trials, study))
    return final, stop["why"] or "done"
