"""`q2_fused`: trials/hour of Q2 students with `--fuse 4` and `--fuse 8` against one trial at a
time (K=1) and against 4 worker processes on the device (`--trials-per-device 4`).

Each variant runs a fresh Q2 study (the benchmark study's `fused_*` preset, Q2's space, TPE and
Hyperband) through kdsweep's real worker loops: `run_worker` (K=1), `run_fused_worker` (fused,
in this process) and `launch.run` with 4 `kdsweep worker` processes. The teacher is trained and
its logit cache filled for every (image, view) before any variant starts, so each variant meets
the same warm state a long sweep reaches. trials/hour = finished trials / (first trial start to
last trial end, as stored), so the dead time between trials counts.

On the CPU the figure is for the record (a fused model does the same arithmetic; it saves only
launch overhead and duplicated teacher gathers); on a GPU the goal is >= 2.8x K=1 at 32 px
(cifar stem), with a 224 px figure (the paper student) beside it.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.common import Entry, env, scratch, warm_logit_cache

STUDY = Path(__file__).parent / "studies" / "q2_tiny.py"


def _warm(study_def, preset: str, overrides: dict[str, Any], device: str) -> None:
    """Train the teacher and fill its logit cache for every (image, view)."""
    warm_logit_cache(study_def.config_for(preset, {"kd.alpha": 0.5, "kd.temperature": 4.0}, overrides,
                                          device=device, threads=1))


def _throughput(url: str, name: str) -> dict[str, Any]:
    from kdsweep.service.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"trials": len(done), "span_s": round(span, 2), "trials_per_hour": 3600 * len(done) / span}


def _variant(tmp: Path, preset: str, overrides: dict[str, Any], device: str, how: str, trials: int) -> dict:
    from kdsweep.service import launch
    from kdsweep.service import spec as studies
    from kdsweep.service.fused_worker import run_fused_worker
    from kdsweep.service.objective import Objective
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    study_def = studies.load(str(STUDY))
    # A study name takes letters, digits, '.', '_' and '-' only ("4 processes" has a space).
    name = f"fused-{how.replace(' ', '_').replace('=', '')}-{uuid.uuid4().hex[:6]}"
    url = f"sqlite:///{tmp / (name + '.db')}"
    storage = open_storage(url)
    sweep = Sweep.create(storage, study_def, preset, name, trials, seed=0, overrides=overrides)
    objective = Objective(study_def, preset, {"device": device, "threads": 1}, tmp / name,
                          overrides=overrides, keep_weights=0)
    t0 = time.perf_counter()
    if how == "K=1":
        run_worker(Sweep.join(storage, name, study_def), objective)
    elif how.startswith("fuse"):
        run_fused_worker(Sweep.join(storage, name, study_def), objective, int(how[4:]))
    else:  # 4 processes on the device, as --trials-per-device 4 plans them
        with env(KDSWEEP_THREADS="1", CUDA_VISIBLE_DEVICES="0" if device == "cuda" else None):
            plans = launch.plan_workers(4, device, url)
        args = launch.worker_args(str(STUDY), name, None, False, str(tmp / name), False)
        launch.run(sweep, args, plans, lambda line: None, poll=0.5)
    return {**_throughput(url, name), "wall_s": round(time.perf_counter() - t0, 1)}


def _compare(tmp: Path, preset: str, overrides: dict[str, Any], device: str,
             plan: dict[str, int]) -> dict[str, dict]:
    from kdsweep.service import spec as studies

    _warm(studies.load(str(STUDY)), preset, overrides, device)
    out = {how: _variant(tmp, preset, overrides, device, how, n) for how, n in plan.items()}
    base = out["K=1"]["trials_per_hour"]
    procs = out.get("4 processes", {}).get("trials_per_hour")
    for v in out.values():
        v["vs_K1"] = round(v["trials_per_hour"] / base, 3)
        if procs:
            v["vs_4_processes"] = round(v["trials_per_hour"] / procs, 3)
    return out


def _random_npz(path: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    np.savez(path, x=x, y=y, x_test=x[:1000], y_test=y[:1000])
    return f"npz:{path}"


def run(device: str, quick: bool) -> Entry:
    from kdsweep.core.devices import cpu_cores

    small = 2 if quick else 1
    with scratch("fused") as tmp, env(KDSWEEP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1"):
        if device == "cpu":
            plan = {"K=1": 4 // small, "fuse4": 8 // small, "fuse8": 8 // small, "4 processes": 8 // small}
            results = {"cpu 28 px": _compare(tmp, "fused_cpu", {}, device, plan)}
            main = results["cpu 28 px"]
        else:
            dataset = _random_npz(tmp / "r.npz", 11_000)
            plan = {"K=1": 3, "fuse4": 8, "fuse8": 8, "4 processes": 8}
            results = {"32 px cifar stem": _compare(tmp, "fused_32px", {"data.dataset": dataset}, device, plan),
                       "224 px paper student": _compare(tmp, "fused_224px", {"data.dataset": dataset}, device,
                                                        {"K=1": 2, "fuse4": 4, "fuse8": 8})}
            main = results["32 px cifar stem"]
    best = max(("fuse4", "fuse8"), key=lambda k: main[k]["trials_per_hour"])
    ratio = main[best]["vs_K1"]
    on_gpu = device != "cpu"
    return Entry(
        name="q2_fused", value=main[best]["trials_per_hour"], unit=f"trials/hour ({best})",
        baseline=main["K=1"]["trials_per_hour"], ratio=ratio,
        goal=">= 2.8x K=1 at 32 px on a GPU (CPU: recorded)", device=device,
        met=(ratio >= 2.8) if on_gpu else None,
        details={"ratio_is": f"{best} trials/hour / K=1 trials/hour", "cores": cpu_cores(),
                 "threads_per_process": 1, "results": results},
    )
