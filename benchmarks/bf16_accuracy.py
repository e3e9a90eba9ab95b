"""`bf16_accuracy`: does bf16 autocast in training change what the q2 smoke preset measures?

fp32 against bf16 (`precision`), paired on the 5,000 validation images, on the CPU, one thread:

- the teacher (ResNet-50, 6,000 images, 3 epochs) built with several seeds in each precision;
- q2 smoke trials (alpha 0.5, T 4) with several seeds, each precision distilling from its own
  teacher (seed 0, as a sweep builds it), with the logit cache filled first, as a sweep runs.

Scoring is fp32 either way (`train.correctness`). For each pair the entry gives the images right
only in fp32 and only in bf16 and the accuracy difference; per network, the mean difference over
seeds with its standard error over seeds. bf16 may be the CPU's default only where, for both, the
mean's interval (2 SE) lies within 0.5 point of fp32; the entry is met when the default
(`devices.resolve_precision`) follows that verdict.
Both legs of a pair are timed in process CPU seconds, so the entry also gives bf16's speed-up of
whole teacher builds and trials.

`python -m benchmarks.bf16_accuracy --teacher-seeds 1,2 --student-seeds "" -o a.json` runs part of
it (two parts in two processes use two cores); `--merge a.json b.json -o out.json` joins the parts
into one entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

import click

from benchmarks.common import Entry, scratch, warm_logit_cache


def _config(cache: str, divisor: int = 1):
    from kdsweep.core.config import replace
    from kdsweep.service import spec as studies

    cfg = studies.load("q2").preset("smoke").config
    d, kd = cfg.data, cfg.kd
    cfg = replace(cfg, **{"kd.alpha": 0.5, "kd.temperature": 4.0, "data.val_size": d.val_size // divisor,
                          "data.train_subset": d.train_subset // divisor,
                          "kd.teacher_train_subset": kd.teacher_train_subset // divisor})
    return dataclasses.replace(cfg, device="cpu", threads=1, cache_dir=cache)


def _pair(fp32, bf16) -> dict[str, Any]:
    only_fp32 = int((fp32 & ~bf16).sum())
    only_bf16 = int((bf16 & ~fp32).sum())
    return {"images": len(fp32), "right_only_fp32": only_fp32, "right_only_bf16": only_bf16,
            "acc_fp32": round(float(fp32.float().mean()), 4), "acc_bf16": round(float(bf16.float().mean()), 4),
            "difference": round((only_bf16 - only_fp32) / len(fp32), 4)}


def _timed(fn):
    cpu = time.process_time()
    out = fn()
    return out, round(time.process_time() - cpu, 2)


def measure(teacher_seeds: list[int], student_seeds: list[int], divisor: int = 1) -> dict[str, Any]:
    import torch

    from kdsweep.core import data, teacher, train
    from kdsweep.core.config import replace

    torch.set_num_threads(1)
    out: dict[str, Any] = {"teachers": [], "trials": [], "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    with scratch("bf16") as tmp:
        config = _config(str(tmp / "cache"), divisor)
        splits = data.load_splits(config.data)
        tconfig = teacher.resolve_data(teacher.teacher_config(config), splits)
        for seed in sorted(set(teacher_seeds) | ({config.data.split_seed} if student_seeds else set())):
            legs = {}
            for precision in ("fp32", "bf16"):
                tc = dataclasses.replace(tconfig, seed=seed, precision=precision)
                result, cpu = _timed(lambda tc=tc: train.train(tc, validate="last"))
                legs[precision] = (result, cpu)
                if seed == config.data.split_seed:  # the teacher a sweep of this precision uses
                    folder = train.cache_root(config) / "teachers"
                    folder.mkdir(parents=True, exist_ok=True)
                    torch.save({"state_dict": result.model.state_dict(), "val_acc": result.final_val_acc,
                                "seconds": cpu}, folder / f"{teacher.teacher_key(tc, splits)}.pt")
            if seed in teacher_seeds:
                out["teachers"].append({"seed": seed, "cpu_s": {p: legs[p][1] for p in legs},
                                        **_pair(legs["fp32"][0].val_correct, legs["bf16"][0].val_correct)})
        for precision in ("fp32", "bf16"):
            warm_logit_cache(replace(config, precision=precision))
        for seed in student_seeds:
            legs = {}
            for precision in ("fp32", "bf16"):
                cfg = replace(config, seed=seed, precision=precision)
                prepared = teacher.prepare(cfg)
                result, cpu = _timed(lambda cfg=cfg, prepared=prepared: train.train(cfg, teacher=prepared))
                legs[precision] = (result, cpu)
            out["trials"].append({"seed": seed, "cpu_s": {p: legs[p][1] for p in legs},
                                  "val_acc_per_epoch": {p: [h["val_acc"] for h in legs[p][0].history] for p in legs},
                                  **_pair(legs["fp32"][0].val_correct, legs["bf16"][0].val_correct)})
    out["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    return out


def summarise(parts: list[dict[str, Any]]) -> Entry:
    teachers = sorted((t for p in parts for t in p["teachers"]), key=lambda t: t["seed"])
    trials = sorted((t for p in parts for t in p["trials"]), key=lambda t: t["seed"])

    def over_seeds(rows):
        diffs = [r["difference"] for r in rows]
        mean = statistics.fmean(diffs) if diffs else None
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        speed = (sum(r["cpu_s"]["fp32"] for r in rows) / sum(r["cpu_s"]["bf16"] for r in rows)) if rows else None
        return {"seeds": len(rows), "mean_difference": None if mean is None else round(mean, 4),
                "se_over_seeds": None if se is None else round(se, 4),
                "bf16_cpu_speedup": None if speed is None else round(speed, 3)}

    summary = {"teacher": over_seeds(teachers), "trial": over_seeds(trials)}
    for s in summary.values():  # equivalence: the mean's interval (2 SE over seeds) inside +-0.5 point
        s["within_half_point"] = (s["se_over_seeds"] is not None and s["seeds"] >= 3
                                  and abs(s["mean_difference"]) + 2 * s["se_over_seeds"] <= 0.005)
    worst = max(abs(s["mean_difference"]) for s in summary.values() if s["mean_difference"] is not None)
    import torch

    from kdsweep.core.devices import resolve_precision

    bf16_ok = all(s["within_half_point"] for s in summary.values())
    default = resolve_precision("auto", torch.device("cpu")) if "KDSWEEP_PRECISION" not in os.environ else None
    return Entry(
        name="bf16_accuracy", value=round(worst, 4), unit="largest |mean accuracy difference| bf16 - fp32",
        baseline=0.0, ratio=None,
        goal="bf16 on the CPU by default only if, for the teacher and the trial, the mean paired difference "
             "over seeds lies within +-0.5 point (mean +- 2 SE)",
        device="cpu", met=default is not None and (default == "bf16") == bf16_ok,
        details={"summary": summary, "verdict": ("bf16 is within 0.5 point: it may be on" if bf16_ok else
                                                 "bf16 is not shown within 0.5 point: it stays off on the CPU"),
                 "cpu_default_precision": default, "teachers": teachers, "trials": trials,
                 "sizes": "q2 smoke preset (trials: alpha 0.5, T 4)", "threads": 1,
                 "load_average_1min": [p["load_average_1min"] for p in parts]},
    )


def run(device: str, quick: bool) -> Entry:
    """The whole measurement in one process (about 40 min of one core; two parts in two
    processes, as the stored figures were taken, halve the wall time)."""
    if quick:
        return summarise([measure([0], [0], divisor=20)])
    return summarise([measure([0, 1, 2], [0, 1, 2, 3, 4, 5])])


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


@click.command()
@click.option("--teacher-seeds", default="0,1,2", show_default=True, help="Teacher seeds, comma-separated.")
@click.option("--student-seeds", default="0,1,2,3,4,5", show_default=True, help="Trial seeds, comma-separated.")
@click.option("--merge", "merge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Join parts written by earlier runs (repeat) instead of measuring.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True)
def main(teacher_seeds: str, student_seeds: str, merge: tuple[str, ...], output: str) -> None:
    """Measure bf16 against fp32 on q2's smoke networks (or merge parts into one entry)."""
    if merge:
        parts = [json.load(open(p)) for p in merge]
        entry = summarise(parts).to_json()
        entry["details"]["command"] = ("python -m benchmarks.bf16_accuracy, in parts: "
                                       + "; ".join(p.get("command", "?") for p in parts))
        with open(output, "w") as f:
            json.dump([entry], f, indent=1)
        click.echo(json.dumps(entry["details"]["summary"], indent=1))
        return
    start = time.perf_counter()
    part = measure(_seeds(teacher_seeds), _seeds(student_seeds))
    part["wall_s"] = round(time.perf_counter() - start, 1)
    part["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    part["command"] = (f"python -m benchmarks.bf16_accuracy --teacher-seeds '{teacher_seeds}' "
                       f"--student-seeds '{student_seeds}'")
    with open(output, "w") as f:
        json.dump(part, f, indent=1)
    click.echo(json.dumps(part, indent=1))


if __name__ == "__main__":
    main()
