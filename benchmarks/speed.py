"""`q2_speed`: a q2 smoke trial and its teacher's build on the CPU, kdsweep's path against the
previous one, side by side on one thread, each leg in a fresh process of its own.

The previous path is kept here: evaluation under `no_grad` on default-layout input with the
BatchNorms unfolded in batches of 1024 (`before_correctness`), torch.optim.SGD's default
per-parameter loop (`before_optimizer`), plain `nn.Conv2d` everywhere (no `LiveTapConv2d`), a
teacher build that scores the validation split after every epoch (`train(...,
validate="every")`), and fp32 training. kdsweep's path: `train.correctness` (inference mode,
channels_last input, BatchNorms folded, the smallest maps as matrix products, batches of 256),
fused SGD, convolutions that skip taps meeting only zero padding, the teacher scored after its
last epoch only (`validate="last"`, as `kdsweep.core.teacher` builds it), and training in the
precision "auto" resolves to (`details.precision`: fp32 on the CPU unless $KDSWEEP_PRECISION
says otherwise).

The two paths compute the same functions up to float rounding, so the weights differ in the
last bits and accuracies are compared paired, image by image: `paired` gives, per leg pair,
the images right only before and only after, and whether the accuracy difference lies within
two standard errors of the paired difference. Evaluation alone is checked exactly: the after
path's final model scored both ways must classify every validation image the same
(`eval_identical`). Training is checked in float64 (`float64_check`, run beside every full
run at a twentieth of the sizes): there the two paths round alike to ~1e-15 and must classify
every validation image the same after the teacher's build and after the trial; `met` counts it.

Legs alternate (before, after) for the teacher, then for the trial; each runs in a freshly
spawned process (nothing one leg leaves in memory or caches reaches the next) with its data
loaded before the clock, and is timed in process CPU seconds (one thread: robust to other
processes on the host) and in wall seconds. The trial distils (alpha 0.5, T 4) from the teacher
just built (the after leg's, for both legs), with its logit cache filled for every (image, view)
first: the steady state a sweep reaches.

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
    """Evaluation as it was: `no_grad`, default memory layout, batches of 1024 (the default then)."""
    import torch

    from kdsweep.core import data
    from kdsweep.core.train import _to_input

    model.eval()
    out = []
    with torch.no_grad():
        for idx in data.batch_indices(len(x), config.eval_batch_size or 1024, None, shuffle=False):
            inp = _to_input(x[idx].to(device), config, splits, device, channels_last=False)
            out.append(model(inp).argmax(1) == y[idx].to(device))
    return torch.cat(out)


def before_optimizer(model, config):
    """The optimiser as it was: torch.optim.SGD's default (not fused) update."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    return torch.optim.SGD(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0}],
        lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0,
    )


@contextlib.contextmanager
def _path(before: bool) -> Iterator[None]:
    from kdsweep.core import shortcuts, train

    kept = train.correctness, train._optimizer, shortcuts.use_shortcuts
    if before:
        train.correctness, train._optimizer = before_correctness, before_optimizer
        shortcuts.use_shortcuts = lambda model: model
    try:
        yield
    finally:
        train.correctness, train._optimizer, shortcuts.use_shortcuts = kept


def paired(before, after) -> dict[str, Any]:
    """Two bool per-image correctness vectors on the same images, compared paired."""
    n = len(before)
    only_before = int((before & ~after).sum())
    only_after = int((after & ~before).sum())
    diff = (only_after - only_before) / n
    se = (only_before + only_after) ** 0.5 / n  # paired (McNemar) standard error
    return {"images": n, "right_only_before": only_before, "right_only_after": only_after,
            "acc_difference": round(diff, 4), "within_2se": abs(diff) <= 2 * se}


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


def leg(what: str, before: bool, divisor: int, cache: str, device: str, precision: str, dtype: str
        ) -> dict[str, Any]:
    """One leg (the teacher's build or a trial, on one path), run in a process of its own.

    Every leg starts in a fresh process, as a sweep's worker does: its memory allocator, caches
    and thread pool are a new process's, and the data it trains on is loaded before the clock
    starts. A trial leg distils from the teacher already stored in `cache`."""
    import torch

    from kdsweep.core import data, teacher, train

    torch.set_default_dtype(getattr(torch, dtype))
    torch.set_num_threads(1)
    config = _config(divisor, cache, device)
    splits = data.load_splits(config.data)
    if what == "teacher":
        tconfig = teacher.resolve_data(teacher.teacher_config(config), splits)  # as load_teacher does
        data.load_splits(tconfig.data)
        tc = dataclasses.replace(tconfig, precision=precision)
        with _path(before):
            result, cpu, wall = _timed(lambda: train.train(tc, validate="every" if before else "last"))
        out = {"val_acc": result.final_val_acc, "val_correct": result.val_correct}
    else:
        cfg = dataclasses.replace(config, precision=precision)
        warm_logit_cache(cfg)
        prepared = teacher.prepare(cfg)
        with _path(before):
            result, cpu, wall = _timed(lambda: train.train(cfg, teacher=prepared))
        out = {"val_acc": result.final_val_acc, "val_correct": result.val_correct,
               "history": [h["val_acc"] for h in result.history]}
    if not before:
        out["model"] = result.model
    return {"cpu_s": cpu, "wall_s": wall, **out}


def in_own_process(fn, *args: Any) -> Any:
    """`fn(*args)` in a freshly spawned Python process (nothing inherited but the arguments)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure(device: str, divisor: int) -> Entry:
    import torch

    from kdsweep.core import data, teacher, train
    from kdsweep.core.devices import native_bf16, resolve_precision

    torch.set_num_threads(1)
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    load_before = os.getloadavg()[0]
    with scratch("speed") as tmp:
        config = _config(divisor, str(tmp / "cache"), device)
        splits = data.load_splits(config.data)
        tconfig = teacher.resolve_data(teacher.teacher_config(config), splits)  # as load_teacher does
        dev = torch.device(device)
        after = resolve_precision(config.precision, dev)
        legs: dict[str, dict[str, Any]] = {}
        for name, before in (("teacher_before", True), ("teacher_after", False)):
            legs[name] = in_own_process(leg, "teacher", before, divisor, config.cache_dir, device,
                                        "fp32" if before else after, dtype)
        # The trial's teacher: the build above, stored where teacher.prepare finds it.
        folder = train.cache_root(config) / "teachers"
        folder.mkdir(parents=True, exist_ok=True)
        # Stored under the keys of both precisions, so both trial legs distil from this one teacher.
        for precision in {"fp32", after}:
            torch.save({"state_dict": legs["teacher_after"]["model"].state_dict(),
                        "val_acc": legs["teacher_after"]["val_acc"], "seconds": legs["teacher_after"]["wall_s"]},
                       folder / f"{teacher.teacher_key(dataclasses.replace(tconfig, precision=precision), splits)}.pt")
        for name, before in (("trial_before", True), ("trial_after", False)):
            legs[name] = in_own_process(leg, "trial", before, divisor, config.cache_dir, device,
                                        "fp32" if before else after, dtype)
        # Evaluation alone, exactly: the after path's final models scored the old way.
        eval_identical = {}
        for what in ("teacher", "trial"):
            cfg = tconfig if what == "teacher" else train.resolve(config, splits)
            old_way = before_correctness(legs[f"{what}_after"]["model"], splits.val_x, splits.val_y,
                                         cfg, splits, torch.device(device)).cpu()
            eval_identical[what] = bool(torch.equal(old_way, legs[f"{what}_after"]["val_correct"]))
    same = {w: paired(legs[f"{w}_before"]["val_correct"], legs[f"{w}_after"]["val_correct"])
            for w in ("teacher", "trial")}
    ratio = {w: legs[f"{w}_before"]["cpu_s"] / legs[f"{w}_after"]["cpu_s"] for w in ("teacher", "trial")}
    wall_ratio = {w: legs[f"{w}_before"]["wall_s"] / legs[f"{w}_after"]["wall_s"] for w in ("teacher", "trial")}
    total_before = legs["teacher_before"]["cpu_s"] + legs["trial_before"]["cpu_s"]
    total_after = legs["teacher_after"]["cpu_s"] + legs["trial_after"]["cpu_s"]
    worst = min(ratio.values())
    n = lambda full: full // divisor  # noqa: E731
    return Entry(
        name="q2_speed", value=round(total_after, 1), unit="CPU s (teacher build + one q2 smoke trial)",
        baseline=round(total_before, 1), ratio=round(worst, 3),
        goal=(">= 1.5 (each of teacher and trial); the same function: every validation image classified "
              "alike by the two paths in float64 (float64_check) and by the two ways of scoring"),
        device=device,
        met=worst >= 1.5 and all(eval_identical.values()),  # and float64_check, see `checked`
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
            "paired": same,
            "eval_identical": eval_identical,
            "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
            "cores": os.cpu_count(),
            "precision": {"before": "fp32", "after": after, "cpu_native_bf16": native_bf16(torch.device("cpu"))},
        },
    )


CHECK_DIVISOR = 20  # the float64 check's sizes: float64 training is ~3x slower


def checked(entry: Entry, device: str) -> Entry:
    """`entry` with the float64 check run beside it and counted in `met`.

    A float32 run of either path rounds differently from the first step and training amplifies
    it: one run's paired accuracies differ by chaos (the 3-epoch ResNet-50 teacher by about 2
    points). In float64 the two paths round alike to ~1e-15, so there every validation image must
    be classified the same by the teacher and by the trial, or the paths compute different
    functions."""
    import torch

    kept = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        check = measure(device, CHECK_DIVISOR)
    finally:
        torch.set_default_dtype(kept)
    same = all(p["right_only_before"] == p["right_only_after"] == 0 for p in check.details["paired"].values())
    entry.details["float64_check"] = {
        "command": f"python -m benchmarks.speed --divisor {CHECK_DIVISOR} --float64",
        "sizes": check.details["sizes"], "paired": check.details["paired"],
        "eval_identical": check.details["eval_identical"], "identical": same,
        "teacher_val_acc": check.details["teacher_val_acc"],
        "trial_val_acc_per_epoch": check.details["trial_val_acc_per_epoch"],
        "cpu_ratios": {"teacher": check.details["teacher_cpu_ratio"], "trial": check.details["trial_cpu_ratio"]},
    }
    entry.details["accuracy_note"] = (
        "float32 runs of the two paths differ in the last bits from the first step and training "
        "amplifies it: the paired counts compare two differently rounded runs; float64_check shows "
        "whether the paths compute the same function")
    entry.met = bool(entry.met and same and all(check.details["eval_identical"].values()))
    return entry


def run(device: str, quick: bool) -> Entry:
    return checked(measure(device, 20 if quick else 1), device)


@click.command()
@click.option("--divisor", type=int, default=1, show_default=True, help="Divide every image count by this.")
@click.option("--float64", "float64", is_flag=True,
              help="Train and score in float64: the paths then round alike to ~1e-15, so any accuracy "
                   "difference left is a real one (float32 runs this small can drift apart by chaos).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True)
def main(divisor: int, float64: bool, output: str) -> None:
    """Run `q2_speed` alone, at the preset's sizes or smaller ones, into a JSON list."""
    import time as _t

    import torch

    if float64:
        torch.set_default_dtype(torch.float64)
    start = _t.perf_counter()
    entry = measure("cpu", divisor)
    entry = (entry if float64 else checked(entry, "cpu")).to_json()
    entry["wall_s"] = round(_t.perf_counter() - start, 1)
    entry["details"]["dtype"] = str(torch.get_default_dtype())
    entry["details"]["command"] = f"python -m benchmarks.speed --divisor {divisor}" + (" --float64" if float64 else "")
    with open(output, "w") as f:
        json.dump([entry], f, indent=1)
    click.echo(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
