"""`q2_speed`: a q2 smoke trial and its teacher's build on the CPU, kdsweep's path against the
previous one, side by side in one process on one thread.

The previous path is kept here: evaluation under `no_grad` on default-layout input
(`before_correctness`), and a teacher build that scores the validation split after every epoch
(`train(..., validate="every")`). kdsweep's path: `train.correctness` (inference mode,
channels_last input) and the teacher scored after its last epoch only (`validate="last"`, as
`kdsweep.core.teacher` builds it). Training itself is the same code in both legs, so the
weights, and every validation image's top-1, must come out identical: the entry checks it.

Legs alternate (before, after) for the teacher, then for the trial; each is timed in process
CPU seconds (one thread: robust to other processes on the host) and in wall seconds. The trial
distils (alpha 0.5, T 4) from the teacher just built, with its logit cache filled for every
(image, view) first: the steady state a sweep reaches, the same for both legs.

`python -m benchmarks.speed --divisor N -o FILE` runs it with every image count of the preset
divided by N (same epochs, batch sizes and proportions of training to scoring), for hosts
where the full sizes do not fit the time at hand; `details.sizes` says which ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import click

from benchmarks.common import Entry, scratch, warm_logit_cache


def before_correctness(model, x, y, config, splits, device):
    """Evaluation as it was: `no_grad`, default memory layout, same batches."""
    import torch

    from kdsweep.core import data
    from kdsweep.core.train import _to_input

    model.eval()
    out = []
    with torch.no_grad():
        for idx in data.batch_indices(len(x), config.eval_batch_size, None, shuffle=False):
            inp = _to_input(x[idx].to(device), config, splits, device, channels_last=False)
            out.append(model(inp).argmax(1) == y[idx].to(device))
    return torch.cat(out)


@contextlib.contextmanager
def _path(before: bool) -> Iterator[None]:
    from kdsweep.core import train

    kept = train.correctness
    if before:
        train.correctness = before_correctness
    try:
        yield
    finally:
        train.correctness = kept


def _timed(fn) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _config(divisor: int, cache: str, device: str):
    from kdsweep.core.config import replace
    from kdsweep.service import spec as studies

    cfg = studies.load("q2").preset("smoke").config
    d, kd = cfg.data, cfg.kd
    cfg = replace(cfg, **{"data.val_size": d.val_size // divisor, "data.train_subset": d.train_subset // divisor,
                          "kd.teacher_train_subset": kd.teacher_train_subset // divisor,
                          "kd.alpha": 0.5, "kd.temperature": 4.0})
    return dataclasses.replace(cfg, device=device, threads=1, cache_dir=cache)


def measure(device: str, divisor: int) -> Entry:
    import torch

    from kdsweep.core import data, teacher, train

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with scratch("speed") as tmp:
        config = _config(divisor, str(tmp / "cache"), device)
        splits = data.load_splits(config.data)
        tconfig = teacher.resolve_data(teacher.teacher_config(config), splits)  # as load_teacher does
        legs: dict[str, dict[str, Any]] = {}
        for name, before in (("teacher_before", True), ("teacher_after", False)):
            with _path(before):
                result, cpu, wall = _timed(lambda b=before: train.train(tconfig, validate="every" if b else "last"))
            legs[name] = {"cpu_s": cpu, "wall_s": wall, "val_acc": result.final_val_acc,
                          "val_correct": result.val_correct, "state": result.model.state_dict()}
        # The trial's teacher: the build above, stored where teacher.prepare finds it.
        folder = train.cache_root(config) / "teachers"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": legs["teacher_after"]["state"], "val_acc": legs["teacher_after"]["val_acc"],
                    "seconds": legs["teacher_after"]["wall_s"]},
                   folder / f"{teacher.teacher_key(tconfig, splits)}.pt")
        teacher._LOADED.clear()
        warm_logit_cache(config)
        prepared = teacher.prepare(config)
        for name, before in (("trial_before", True), ("trial_after", False)):
            with _path(before):
                result, cpu, wall = _timed(lambda: train.train(config, teacher=prepared))
            legs[name] = {"cpu_s": cpu, "wall_s": wall, "val_acc": result.final_val_acc,
                          "history": [h["val_acc"] for h in result.history],
                          "val_correct": result.val_correct, "state": result.model.state_dict()}
    same = {}
    for what in ("teacher", "trial"):
        b, a = legs[f"{what}_before"], legs[f"{what}_after"]
        same[what] = bool(torch.equal(b["val_correct"], a["val_correct"])
                          and all(torch.equal(b["state"][k], a["state"][k]) for k in b["state"]))
    ratio = {w: legs[f"{w}_before"]["cpu_s"] / legs[f"{w}_after"]["cpu_s"] for w in ("teacher", "trial")}
    wall_ratio = {w: legs[f"{w}_before"]["wall_s"] / legs[f"{w}_after"]["wall_s"] for w in ("teacher", "trial")}
    total_before = legs["teacher_before"]["cpu_s"] + legs["trial_before"]["cpu_s"]
    total_after = legs["teacher_after"]["cpu_s"] + legs["trial_after"]["cpu_s"]
    worst = min(ratio.values())
    n = lambda full: full // divisor  # noqa: E731
    return Entry(
        name="q2_speed", value=round(total_after, 1), unit="CPU s (teacher build + one q2 smoke trial)",
        baseline=round(total_before, 1), ratio=round(worst, 3),
        goal=">= 1.5 (each of teacher and trial), identical accuracies", device=device,
        met=worst >= 1.5 and all(same.values()),
        details={
            "sizes": (f"q2 smoke preset with every image count divided by {divisor}: teacher on "
                      f"{n(6000)} images, student on {n(1000)}, {n(5000)} validation images; "
                      "epochs and batch sizes as the preset") if divisor > 1 else "q2 smoke preset",
            "threads": 1,
            "teacher_cpu_ratio": round(ratio["teacher"], 3), "trial_cpu_ratio": round(ratio["trial"], 3),
            "teacher_wall_ratio": round(wall_ratio["teacher"], 3), "trial_wall_ratio": round(wall_ratio["trial"], 3),
            **{f"{leg}_{k}": round(v[k], 2) for leg, v in legs.items() for k in ("cpu_s", "wall_s")},
            "teacher_val_acc": {"before": legs["teacher_before"]["val_acc"], "after": legs["teacher_after"]["val_acc"]},
            "trial_val_acc_per_epoch": {"before": legs["trial_before"]["history"],
                                        "after": legs["trial_after"]["history"]},
            "identical_weights_and_val_correct": same,
            "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
            "cores": os.cpu_count(),
        },
    )


def run(device: str, quick: bool) -> Entry:
    return measure(device, 20 if quick else 1)


@click.command()
@click.option("--divisor", type=int, default=1, show_default=True, help="Divide every image count by this.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True)
def main(divisor: int, output: str) -> None:
    """Run `q2_speed` alone, at the preset's sizes or smaller ones, into a JSON list."""
    import time as _t

    start = _t.perf_counter()
    entry = measure("cpu", divisor).to_json()
    entry["wall_s"] = round(_t.perf_counter() - start, 1)
    entry["details"]["command"] = f"python -m benchmarks.speed --divisor {divisor}"
    with open(output, "w") as f:
        json.dump([entry], f, indent=1)
    click.echo(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
