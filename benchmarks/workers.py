"""`worker_scaling`: parallel efficiency of kdsweep's launcher and workers on this machine.

Identical fixed-config trials (`benchmarks/studies/fixed.py`) run through the real code path:
`kdsweep.service.launch.plan_workers` + `kdsweep.service.launch.run`, which start `python -m kdsweep worker`
processes. Throughput is finished trials per hour between the first trial's start and the
last trial's end as stored (worker start-up excluded). Setups, all on the same cores:

* 1 worker, 1 thread    - the unit rate r1
* 2 workers, 1 thread each - efficiency = rate / (2 * r1); goal >= 0.85
* 4 workers on the cores (launch's own split: cores // 4, at least 1 thread) - rate vs 2 workers; goal >= 0.9
* 1 worker, all cores   - for the record (launch's default for --workers 1)
"""

from __future__ import annotations

import uuid
from pathlib import Path

from benchmarks.common import Entry, cores, env, scratch

STUDY_FILE = Path(__file__).parent / "studies" / "fixed.py"


def rate(tmp: Path, workers: int, threads: int | None, trials: int, preset: str) -> dict[str, float]:
    """Finished trials per hour for `workers` processes; `threads` overrides launch's split."""
    import optuna

    from kdsweep.service import launch
    from kdsweep.service import spec as studies
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    name = f"scaling-{uuid.uuid4().hex[:6]}"
    url = f"sqlite:///{tmp / (name + '.db')}"
    study = Sweep.create(open_storage(url), studies.load(str(STUDY_FILE)), preset, name, trials, seed=0)
    with env(KDSWEEP_CACHE=str(tmp / "cache")):  # before planning: plans copy the environment
        plans = launch.plan_workers(workers, "cpu", url)
    for plan in plans:
        if threads is not None:
            plan.env["KDSWEEP_THREADS"] = plan.env["OMP_NUM_THREADS"] = str(threads)
    args = [str(STUDY_FILE), "--study-name", name, "--no-tensorboard",
            "--artifacts", str(tmp / f"{name}-artifacts")]
    final, how = launch.run(study, args, plans, lambda line: None, poll=0.5)
    all_trials = optuna.load_study(study_name=name, storage=open_storage(url)).trials
    done = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t.user_attrs.get("fail_reason", "?") for t in all_trials
              if t.state == optuna.trial.TrialState.FAIL]
    if how != "done" or len(done) != trials:
        raise RuntimeError(f"{workers} worker(s) finished {len(done)} of {trials} trials ({how})")
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"trials_per_hour": 3600 * trials / span, "trials": trials, "span_s": span,
            "threads_per_worker": int(plans[0].env["KDSWEEP_THREADS"]), "failed": failed,
            "mean_trial_s": sum((t.datetime_complete - t.datetime_start).total_seconds()
                                for t in done) / trials}


def run(device: str, quick: bool) -> Entry:
    preset, n = ("quick", 2) if quick else ("scaling", 4)
    c = cores()
    with scratch("workers") as tmp:
        one = rate(tmp, 1, 1, n, preset)
        two = rate(tmp, 2, 1, 2 * n, preset)
        four = rate(tmp, 4, None, 2 * n, preset)
        both = rate(tmp, 1, c, n, preset)
    efficiency = two["trials_per_hour"] / (2 * one["trials_per_hour"])
    four_vs_two = four["trials_per_hour"] / two["trials_per_hour"]
    return Entry(
        name="worker_scaling", value=two["trials_per_hour"], unit="trials/hour (2 workers x 1 thread)",
        baseline=2 * one["trials_per_hour"], ratio=efficiency, goal=">= 0.85; 4 workers >= 0.9x 2",
        device="cpu", met=efficiency >= 0.85 and four_vs_two >= 0.9,
        details={"cores": c, "four_vs_two": four_vs_two, "one_worker_one_thread": one,
                 "two_workers": two, "four_workers": four, "one_worker_all_threads": both,
                 "trial": f"benchmarks/studies/fixed.py preset {preset}"},
    )
