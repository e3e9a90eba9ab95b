"""Calibrate a study preset's recipe: train fixed configurations over seeds and keep every run.

    python -m benchmarks.calibration record --study q1 --preset smoke \
        --out benchmarks/calibration/q1_smoke.json --seeds 0,1 \
        --arm mlp:model.arch=mlp --arm cnn16:model.arch=cnn,model.width=16 \
        --grid data.pad=0,2 --grid optim.lr=0.05,0.1 --set epochs=4

trains every arm (a named set of settings, e.g. each family's un-regularised baseline) at every
point of the grid (the product of the `--grid` lists) and every seed, with `--set` applied to
all, through the real training core (`kdsweep.core.train.train`, CPU, one thread), on the
preset's own data. Sampled parameters (the learning rate, the width) are set like any other
setting: a calibration fixes what a sweep would sample. Every run is stored with its settings,
seed, per-epoch validation accuracy, seconds and per-image validation correctness (packed), so
runs on the same validation images compare paired.

Resumable and parallel-safe like `benchmarks.curves`: a run is keyed by its settings and seed,
merged into `--out` as soon as it ends (under a lock, atomically); a restarted command skips
what the file holds; `--shard K/N` splits one command among N processes (run each with
`nice -n 10`; runs use one thread).

    python -m benchmarks.calibration table --out benchmarks/calibration/q1_smoke.json \
        --compare "cnn16 - mlp"

prints mean, standard deviation and per-seed values of each setting, and paired differences
(`A - B` of two arms at the same common settings; what each arm sets itself, such as its family,
regulariser or learning rate, may differ): per seed on the validation images
(kdsweep.service.stats.paired_difference) and over seeds (mean of the per-seed differences with
a Student-t 95% interval).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from benchmarks.curves import locked
from kdsweep.core.config import replace
from kdsweep.core.train import TrainingError, train
from kdsweep.service import spec as studies
from kdsweep.service import stats

# Two-sided 95% Student-t quantiles by degrees of freedom (1..9), for intervals over a few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_value(text: str) -> Any:
    """`--set` style: JSON where it parses (numbers, true/false, null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,key=value` -> (NAME, {key: value})."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise click.UsageError(f"--arm {text!r} is not NAME:KEY=VALUE,...")
    settings = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise click.UsageError(f"--arm {text!r}: {item!r} is not KEY=VALUE")
        settings[key] = parse_value(value)
    return name, settings


def run_key(arm: str, settings: dict[str, Any], seed: int) -> str:
    return json.dumps([arm, dict(sorted(settings.items())), seed])


def _merge(path: Path, meta: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    with locked(path):
        table = json.loads(path.read_text()) if path.exists() else {"meta": meta, "commands": [], "runs": []}
        if (table["meta"]["study"], table["meta"]["preset"]) != (meta["study"], meta["preset"]):
            raise click.UsageError(f"{path} holds runs of another study or preset; choose another --out.")
        if row is None:
            if meta["command"] not in table["commands"]:
                table["commands"].append(meta["command"])
        elif row["key"] not in {r["key"] for r in table["runs"]}:
            table["runs"].append(row)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, separators=(",", ":")).replace(',{"key"', ',\n{"key"') + "\n")
        os.replace(tmp, path)
        return table


def train_one(study: studies.StudySpec, preset: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    config = replace(study.base_config(preset), **settings, seed=seed, device="cpu", threads=1)
    curve: list[float] = []

    def report(epoch: int, metrics: dict[str, float]) -> None:
        curve.append(round(float(metrics[study.metric]), 4))

    start = time.perf_counter()
    row: dict[str, Any] = {"curve": curve, "diverged": False}
    try:
        result = train(config, report=report)
    except TrainingError:
        row["diverged"] = True
    else:
        row["params"] = result.params
        if result.val_correct is not None:
            row["val_n"] = len(result.val_correct)
            row["val_correct"] = stats.pack(result.val_correct.numpy())
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Calibration runs of a study preset's recipe (record them, then tabulate)."""
    logging.getLogger("optuna").setLevel(logging.WARNING)


@main.command()
@click.option("--study", "study_name", required=True, help="Study name or file (e.g. q1).")
@click.option("--preset", default="smoke", show_default=True)
@click.option("--arm", "arms", multiple=True, required=True, metavar="NAME:KEY=VALUE,...",
              help="A named configuration to train (repeatable).")
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...",
              help="Values of one setting; every arm runs at every point of the product (repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A setting for every run (repeatable).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--shard", default="0/1", show_default=True, help="K/N: this process runs every N-th run from K.")
def record(study_name: str, preset: str, arms: tuple[str, ...], grids: tuple[str, ...], sets: tuple[str, ...],
           seeds: str, out: Path, shard: str) -> None:
    """Train every arm at every grid point and seed; store each run in --out as it ends."""
    k, _, m = shard.partition("/")
    if not (k.isdigit() and m.isdigit() and int(k) < int(m)):
        raise click.UsageError(f"--shard {shard!r} is not K/N with 0 <= K < N.")
    try:
        study = studies.load(study_name)
    except studies.StudyError as exc:
        raise click.UsageError(str(exc)) from None
    common = dict(parse_arm("set:" + ",".join(sets))[1]) if sets else {}
    axes = []
    for g in grids:
        key, eq, values = g.partition("=")
        if not eq:
            raise click.UsageError(f"--grid {g!r} is not KEY=V1,V2,...")
        axes.append([(key, parse_value(v)) for v in values.split(",")])
    plan = []
    for arm in map(parse_arm, arms):
        for point in itertools.product(*axes):
            for seed in (int(s) for s in seeds.split(",")):
                plan.append((arm[0], {**common, **dict(point), **arm[1]}, seed, arm[1]))
    meta = {"study": study.name, "preset": preset,
            "command": "python -m benchmarks.calibration " + " ".join(sys.argv[1:])}
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in _merge(out, meta, None)["runs"]}
    todo = [p for i, p in enumerate(plan) if i % int(m) == int(k) and run_key(*p[:3]) not in done]
    click.echo(f"{len(plan)} runs planned, {len(todo)} to train in this process", err=True)
    for arm, settings, seed, own in todo:
        row = {"key": run_key(arm, settings, seed), "arm": arm, "settings": settings, "arm_settings": own,
               "seed": seed, **train_one(study, preset, settings, seed)}
        _merge(out, meta, row)
        click.echo(f"{arm} {settings} seed {seed}: {row['curve']} in {row['seconds']:.0f} s", err=True)


def _groups(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(json.dumps([r["arm"], dict(sorted(r["settings"].items()))]), []).append(r)
    return groups


def _final(r: dict[str, Any]) -> float:
    return r["curve"][-1] if r["curve"] and not r["diverged"] else float("nan")


def over_seeds(diffs: list[float]) -> dict[str, float]:
    """Mean of per-seed differences with a Student-t 95% interval (none from one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "seeds": len(diffs)}
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(diffs)}


def compare(runs: list[dict[str, Any]], a: str, b: str, settings_a: dict[str, Any] | None = None,
            settings_b: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A - B for every group of A with a B at the same other settings (or the ones given)."""
    out = []
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    for key_a, group_a in _groups(by_arm.get(a, [])).items():
        sa = json.loads(key_a)[1]
        if settings_a and any(sa.get(k) != v for k, v in settings_a.items()):
            continue
        for key_b, group_b in _groups(by_arm.get(b, [])).items():
            sb = json.loads(key_b)[1]
            # Settings an arm defines itself (its family, regulariser, learning rate) may differ.
            own = set(group_a[0].get("arm_settings", {})) | set(group_b[0].get("arm_settings", {}))
            shared = (set(sa) & set(sb)) - own
            if settings_b is not None:
                if any(sb.get(k) != v for k, v in settings_b.items()):
                    continue
                shared -= set(settings_b)
            if any(sa[k] != sb[k] for k in shared):
                continue
            seeds_b = {r["seed"]: r for r in group_b}
            per_seed = []
            for ra in sorted(group_a, key=lambda r: r["seed"]):
                rb = seeds_b.get(ra["seed"])
                if rb is None or "val_correct" not in ra or "val_correct" not in rb:
                    continue
                d = stats.paired_difference(stats.unpack(ra["val_correct"], ra["val_n"]),
                                            stats.unpack(rb["val_correct"], rb["val_n"]))
                per_seed.append({"seed": ra["seed"], "a": _final(ra), "b": _final(rb), "diff": d.mean,
                                 "low": d.low, "high": d.high})
            if per_seed:
                out.append({"a": a, "b": b, "settings_a": sa, "settings_b": sb, "per_seed": per_seed,
                            "over_seeds": over_seeds([p["diff"] for p in per_seed])})
    return out


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key, group in _groups(runs).items():
        arm, settings = json.loads(key)
        finals = [_final(r) for r in sorted(group, key=lambda r: r["seed"])]
        rows.append({"arm": arm, "settings": settings, "seeds": [r["seed"] for r in group],
                     "final": finals, "mean": float(np.mean(finals)),
                     "sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
                     "seconds": round(sum(r["seconds"] for r in group), 1)})
    return sorted(rows, key=lambda r: (r["arm"], json.dumps(r["settings"], sort_keys=True)))


@main.command()
@click.option("--out", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--compare", "pairs", multiple=True, metavar="A - B",
              help="Paired difference of arm A minus arm B at equal other settings (repeatable).")
def table(out: Path, pairs: tuple[str, ...]) -> None:
    """Print each setting's accuracy over seeds and the paired differences asked for."""
    runs = json.loads(out.read_text())["runs"]
    for row in summary(runs):
        finals = " ".join(f"{v:.4f}" for v in row["final"])
        click.echo(f"{row['arm']:>10} {json.dumps(row['settings'], sort_keys=True)}: mean {row['mean']:.4f} "
                   f"sd {row['sd']:.4f} [{finals}] ({row['seconds']:.0f} s)")
    for pair in pairs:
        a, sep, b = pair.partition(" - ")
        if not sep:
            raise click.UsageError(f"--compare {pair!r} is not 'A - B'.")
        for c in compare(runs, a.strip(), b.strip()):
            o = c["over_seeds"]
            seeds = "; ".join(f"seed {p['seed']} {p['diff']:+.4f} ({p['low']:+.4f}..{p['high']:+.4f})"
                              for p in c["per_seed"])
            click.echo(f"{a} - {b} at {json.dumps(c['settings_a'], sort_keys=True)}: over {o['seeds']} seeds "
                       f"{o['mean']:+.4f} (95% CI {o['low']:+.4f}..{o['high']:+.4f}); per seed: {seeds}")


if __name__ == "__main__":
    main()
