"""`trial_dead_time`: seconds a worker spends between two trials, at N=50 and N=2,000 finished.

Dead time runs from one trial's last `trial.report` to the next trial's first training step
(train()'s first `set_progress`): the rest of the old trial (its result's attributes, kept
weights, `tell`), taking the next slot (`Sweep.reap`, `pop`, `top_up`, `start`), sampling (TPE over the
study's history: its cost grows with N), the objective's stored attributes, and train()'s set-up
(data, model, teacher and logit-cache lookups; the teacher is warm, as in a running worker).
Measured in kdsweep's real worker loop (`run_worker`, one thread) on a study that already holds
N finished trials (random points of the study's space, each with one reported epoch), on
SQLite; each phase is timed by wrapping the function that starts it. The study is Q2 with the
benchmark preset `tiny` (benchmarks/studies/q2_tiny.py; ResNet18 student).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from benchmarks.common import Entry, env, scratch

TINY_STUDY = Path(__file__).parent / "studies" / "q2_tiny.py"
PHASES = ("finish_and_take", "sample", "store_attrs", "train_setup")


def _distributions(space) -> dict[str, optuna.distributions.BaseDistribution]:
    from kdsweep.service.space import Float

    return {p.name: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
            for p in space if isinstance(p, Float)}


def _fill(study: optuna.Study, space, n: int) -> None:
    """n COMPLETE trials at random points, each with one intermediate value, in one transaction
    per 200 (add_trials)."""
    rng = random.Random(0)
    dists = _distributions(space)
    trials = []
    for _ in range(n):
        params = {k: rng.uniform(d.low, d.high) for k, d in dists.items()}
        value = rng.uniform(0.3, 0.9)
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                intermediate_values={1: value}))
    for start in range(0, n, 200):
        study.add_trials(trials[start:start + 200])


def _measure(tmp: Path, n_done: int, new_trials: int, device: str) -> dict[str, Any]:
    from kdsweep.core import models
    from kdsweep.service import objective as objective_mod
    from kdsweep.service import space as sp
    from kdsweep.service import spec as studies
    from kdsweep.service.objective import Objective
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    study_def = studies.load(str(TINY_STUDY))
    url = f"sqlite:///{tmp / f'dead{n_done}.db'}"
    storage = open_storage(url)
    name = f"dead{n_done}"
    sweep = Sweep.create(storage, study_def, "tiny", name, n_done + new_trials, seed=0)
    _fill(sweep.study, study_def.space_for("tiny"), n_done)

    events: list[tuple[str, float]] = []

    def mark(label: str, fn: Callable, first_only: bool = False) -> Callable:
        def wrapped(*args, **kwargs):
            if not (first_only and events and events[-1][0] == label):
                events.append((label, time.perf_counter()))
            return fn(*args, **kwargs)

        return wrapped

    originals = {
        (optuna.trial.Trial, "report"): optuna.trial.Trial.report,
        (Objective, "__call__"): Objective.__call__,
        (sp, "sample"): sp.sample,
        (objective_mod, "train"): objective_mod.train,
        (models, "set_progress"): models.set_progress,
    }

    def after(fn: Callable, label: str) -> Callable:
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            events.append((label, time.perf_counter()))
            return out

        return wrapped

    try:
        optuna.trial.Trial.report = after(optuna.trial.Trial.report, "reported")
        Objective.__call__ = mark("objective", Objective.__call__)
        sp.sample = after(sp.sample, "sampled")
        objective_mod.train = mark("train", objective_mod.train)
        models.set_progress = mark("step", models.set_progress, first_only=True)
        objective = Objective(study_def, "tiny", {"device": device, "threads": 1}, tmp / f"art{n_done}")
        run_worker(Sweep.join(storage, name, study_def), objective)
    finally:
        for (owner, attr), fn in originals.items():
            setattr(owner, attr, fn)

    # Gaps: the last "reported" of a trial to the next "step" of the next trial.
    gaps: list[dict[str, float]] = []
    last_report = None
    phase_start: dict[str, float] = {}
    for label, t in events:
        if label == "reported":
            last_report = t
        elif label == "objective" and last_report is not None:
            phase_start = {"objective": t}
        elif label == "sampled" and phase_start:
            phase_start["sampled"] = t
        elif label == "train" and phase_start:
            phase_start["train"] = t
        elif label == "step" and phase_start and "train" in phase_start:
            gaps.append({
                "total": t - last_report,
                "finish_and_take": phase_start["objective"] - last_report,
                "sample": phase_start["sampled"] - phase_start["objective"],
                "store_attrs": phase_start["train"] - phase_start["sampled"],
                "train_setup": t - phase_start["train"],
            })
            phase_start = {}
    if not gaps:
        raise RuntimeError("no trial-to-trial gap was observed")
    med = {k: statistics.median(g[k] for g in gaps) for k in gaps[0]}
    return {"gaps": len(gaps), "median_s": med, "all_total_s": [round(g["total"], 4) for g in gaps]}


def run(device: str, quick: bool) -> Entry:
    """Median dead time per trial at N=50 and N=2,000 finished trials (quick: 20 and 200)."""
    small, large = (20, 200) if quick else (50, 2000)
    new = 3 if quick else 5
    with scratch("dead") as tmp, env(KDSWEEP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1"):
        # A warm worker: the teacher trained and the data loaded before the first measured gap.
        _measure(tmp, 0, 2, device)
        at_small = _measure(tmp, small, new, device)
        at_large = _measure(tmp, large, new, device)
    value = at_large["median_s"]["total"]
    return Entry(
        name="trial_dead_time", value=value, unit=f"s between trials at N={large}",
        baseline=at_small["median_s"]["total"], ratio=value / at_small["median_s"]["total"],
        goal="< 0.5 s at N=2000 (CPU)", device=device, met=value < 0.5,
        details={"ratio_is": f"dead time at N={large} / at N={small}", f"N={small}": at_small,
                 f"N={large}": at_large, "phases": list(PHASES),
                 "setting": "q2_tiny preset (ResNet18 student, Fashion-MNIST 28 px), SQLite, 1 thread"},
    )
