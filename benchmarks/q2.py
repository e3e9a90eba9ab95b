"""Q2 entries: `q2_vs_plain_ce` (what distillation costs per trial) and `teacher_setups`.

`q2_vs_plain_ce`: a benchmark sweep of K distillation trials (alpha, T drawn once at random)
through `train()`, starting from an empty cache, so the teacher's training ("probe"; a full
fine-tune offline, where no pretrained weights exist) and every lazy logit-cache fill are paid
inside the sweep. Interleaved with them, the same student trains with plain cross-entropy
(kd=None). ratio = (teacher seconds + sum of KD trial seconds) / K / mean CE trial seconds.
Beside it: the uncached variant (teacher forward every step, teacher cost amortised alike) and
the last KD trial alone (the cache's steady state for this sweep length).

`teacher_setups`: a 2-worker, 6-trial Q2 sweep through the real launcher; counts how often the
teacher was trained (its `.runs` file) and how many teacher passes each (image, view) got (the
logit cache's pass counters).
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import Entry, env, mean_std, scratch
from kdsweep.core.config import TrainConfig
from kdsweep.service import spec as studies

TINY_STUDY = Path(__file__).parent / "studies" / "q2_tiny.py"


def _base(quick: bool, device: str, cache: Path) -> TrainConfig:
    if quick:
        cfg = studies.load(str(TINY_STUDY)).preset("tiny").config
    else:
        cfg = studies.load("q2").preset("smoke").config
    return dataclasses.replace(cfg, device=device, cache_dir=str(cache))


def q2_vs_plain_ce(device: str, quick: bool) -> Entry:
    from kdsweep.core import data, teacher, train
    from kdsweep.core.config import replace
    from kdsweep.core.devices import resolve_device

    k = 2 if quick else 6
    ce_at = {0, k - 1}
    rng = random.Random(0)
    points = [(rng.uniform(0.1, 1.0), rng.uniform(1.0, 20.0)) for _ in range(k)]
    with scratch("q2") as tmp:
        base = _base(quick, device, tmp / "cache")
        ce_cfg = dataclasses.replace(base, kd=None)
        splits = data.load_splits(base.data)
        teacher._LOADED.clear()  # an honest cold start: the teacher is trained inside the sweep
        t0 = time.perf_counter()
        teacher.load_teacher(base, splits, resolve_device(device))
        teacher_s = time.perf_counter() - t0
        kd_s, ce_s = [], []
        for i, (alpha, temp) in enumerate(points):
            if i in ce_at:
                ce_s.append(train.train(ce_cfg).wall_time)
            cfg = replace(base, **{"kd.alpha": alpha, "kd.temperature": temp})
            kd_s.append(train.train(cfg, teacher=teacher.prepare(cfg)).wall_time)
        uncached = replace(base, **{"kd.alpha": points[0][0], "kd.temperature": points[0][1],
                                    "kd.cache_logits": False})
        live_s = [train.train(uncached, teacher=teacher.prepare(uncached)).wall_time]
        stats = _cache_stats(tmp / "cache")
    ce, ce_std = mean_std(ce_s)
    cached = (teacher_s + sum(kd_s)) / k
    live = teacher_s / k + mean_std(live_s)[0]
    r = cached / ce
    return Entry(
        name="q2_vs_plain_ce", value=cached, unit="s per trial (teacher amortised)", baseline=ce,
        ratio=r, goal="<= 1.10", device=device, met=r <= 1.10,
        details={
            "trials_in_sweep": k, "teacher_s": teacher_s, "kd_trial_s": kd_s, "ce_trial_s": ce_s,
            "ce_std": ce_std,
            "uncached_ratio": live / ce, "uncached_trial_s": live_s,
            "steady_state_ratio": kd_s[-1] / ce,
            "teacher_amortised_per_trial_s": teacher_s / k,
            "logit_cache": stats,
            "setting": "q2 tiny preset" if quick else "q2 smoke preset (ResNet50 -> ResNet18, "
                       "Fashion-MNIST 1000 images, 28 px, 50 views, 3 epochs)",
        },
    )


def _cache_stats(cache: Path) -> dict[str, float | int]:
    """Teacher runs and the logit caches' pass counters under one cache folder."""
    runs = sum(len(f.read_text().splitlines()) for f in (cache / "teachers").glob("*.runs"))
    filled = total = max_passes = pairs = 0
    for passes_file in (cache / "logits").glob("*/passes.u1"):
        passes = np.fromfile(passes_file, dtype=np.uint8)
        pairs += passes.size
        filled += int(np.count_nonzero(passes))
        total += int(passes.sum(dtype=np.int64))
        max_passes = max(max_passes, int(passes.max()) if passes.size else 0)
    return {"teacher_trainings": runs, "logit_caches": len(list((cache / "logits").glob("*"))),
            "pairs": pairs, "filled": filled, "teacher_passes": total, "max_passes": max_passes}


def teacher_setups(device: str, quick: bool) -> Entry:
    from kdsweep.service import launch
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    # Counting, not timing: the tiny preset (Q2's space and pruner, 200 images, ResNet50
    # teacher) shows the same sharing as the smoke preset at a fraction of the cost.
    study_file, preset = str(TINY_STUDY), "tiny"
    study_def = studies.load(study_file)
    trials, workers = 6, 2
    with scratch("teacher") as tmp:
        cache = tmp / "cache"
        name = f"q2-{uuid.uuid4().hex[:6]}"
        url = f"sqlite:///{tmp / 'q2.db'}"
        study = Sweep.create(open_storage(url), study_def, preset, name, trials, seed=0)
        args = [study_def.source, "--study-name", name, "--no-tensorboard",
                "--artifacts", str(tmp / "artifacts")]
        with env(KDSWEEP_CACHE=str(cache)):  # before planning: plans copy the environment
            plans = launch.plan_workers(workers, device, url)
            final, how = launch.run(study, args, plans, lambda line: None, poll=0.5)
        stats = _cache_stats(cache)
    ok = stats["teacher_trainings"] == 1 and stats["max_passes"] <= 1
    return Entry(
        name="teacher_setups", value=stats["teacher_trainings"], unit="teacher trainings (probes)",
        baseline=trials, ratio=stats["max_passes"], goal="1 probe; <= 1 pass per (image, view)",
        device=device, met=ok and final.finished == trials,
        details={"ratio_is": "max teacher passes per (image, view)", "workers": workers,
                 "trials": trials, "finished": final.finished, "ended": how,
                 "study": f"{study_def.name} preset {preset}", **stats},
    )
