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


def run(
    sweep: Sweep,
    worker_args: list[str],
    plans: list[WorkerPlan],
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
            line = sweep.progress_line()
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
    final = sweep.counts()
    echo(sweep.progress_line(final))
    return final, stop["why"] or "done"
