"""What `kdsweep trial` and `kdsweep ls` show, as records (for --json) and as text.

A trial's record holds everything stored about one trial: its parameters and resolved config,
its curve (one value per epoch), state and why, timings, seeds, the worker's host, and the
files it left (checkpoint, kept weights, TensorBoard run and its own log file).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from kdsweep.core.config import compact
from kdsweep.service import keys
from kdsweep.service.sweep import BASELINE_SUFFIX, VERIFY_SUFFIX, Sweep, is_requeued

CHART_WIDTH = 40  # characters of the curve's bars


def trial_record(sweep: Sweep, number: int) -> dict[str, Any]:
    """Everything stored about trial `number` of `sweep` (StudyError when there is none)."""
    t = sweep.trial(number)
    attrs = t.user_attrs
    state = t.state.name
    reason = None
    if t.state == TrialState.FAIL:
        state = "REQUEUED" if is_requeued(t) else "FAIL"
        reason = attrs.get(keys.FAIL_REASON)
    elif t.state == TrialState.PRUNED:
        reason = attrs.get(keys.INFEASIBLE) or attrs.get(keys.PRUNED_REASON)
    log_file = attrs.get(keys.LOG_FILE)
    return {
        "study": sweep.name,
        "trial": t.number,
        "state": state,
        "reason": reason,
        "value": t.value,
        "metric": sweep.metric,
        "params": t.params,
        "curve": {int(k): v for k, v in sorted(t.intermediate_values.items())},
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
        "wall_time_s": attrs.get(keys.WALL_TIME),
        "epochs_run": attrs.get(keys.EPOCHS_RUN),
        "images_per_s": attrs.get(keys.IMAGES_PER_S),
        "seed": attrs.get(keys.TRAIN_SEED),
        "sampler_seed": attrs.get(keys.SAMPLER_SEED),
        "first_attempt": t.system_attrs.get(keys.ORIGIN),
        "host": attrs.get(keys.HOST),
        "device": attrs.get(keys.DEVICE),
        "parameters": attrs.get(keys.PARAMS_COUNT),
        "weights": attrs.get(keys.WEIGHTS),
        "log_file": log_file,
        "tensorboard_run": str(Path(log_file).parent) if log_file else None,
        "config": compact(attrs[keys.CONFIG]) if keys.CONFIG in attrs else None,
    }


def curve_chart(curve: Mapping[int, float], width: int = CHART_WIDTH) -> list[str]:
    """One line per epoch: a bar scaled between the curve's lowest and highest value."""
    if not curve:
        return ["  (no epoch reported)"]
    lo, hi = min(curve.values()), max(curve.values())
    span = (hi - lo) or 1.0
    return [f"  epoch {e:3d}  {v:.4f}  " + "#" * max(1, round(1 + (width - 1) * (v - lo) / span))
            for e, v in curve.items()]


def trial_text(r: Mapping[str, Any]) -> str:
    """A trial's record as text for a person."""
    value = f"{r['metric']} {r['value']:.4f}" if r["value"] is not None else "no value"
    lines = [f"study {r['study']!r} trial {r['trial']}: {r['state']}, {value}"
             + (f" ({r['reason']})" if r["reason"] else "")]
    lines += ["parameters:"] + [f"  {k} = {v}" for k, v in r["params"].items()]
    lines += ["curve:"] + curve_chart(r["curve"])
    timing = [f"started {r['started']}", f"finished {r['finished']}" if r["finished"] else "",
              f"{r['wall_time_s']:.1f} s" if r["wall_time_s"] is not None else "",
              f"{r['epochs_run']} epochs" if r["epochs_run"] is not None else "",
              f"{r['images_per_s']:.0f} img/s" if r["images_per_s"] else ""]
    lines.append("time: " + ", ".join(x for x in timing if x))
    lines.append(f"seed {r['seed']} (sampler seed {r['sampler_seed']}), host {r['host']}, device {r['device']}, "
                 f"{r['parameters']:,} trainable parameters" if r["parameters"] else
                 f"seed {r['seed']}, host {r['host']}, device {r['device']}")
    if r["first_attempt"] is not None:
        lines.append(f"a retry of trial {r['first_attempt']}")
    lines.append(f"weights: {r['weights'] or 'not kept (only the best few are)'}")
    lines.append(f"log: {r['log_file'] or 'none (run without TensorBoard)'}")
    lines.append(f"TensorBoard run: {r['tensorboard_run'] or 'none'}")
    if r["config"]:
        import yaml

        lines.append("config:")
        lines += ["  " + line for line in yaml.safe_dump(r["config"], sort_keys=False).splitlines()]
    return "\n".join(lines)


def ls_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """`kdsweep ls`: one line per study."""
    header = ["study", "spec/preset", "N", "complete", "pruned", "failed", "running", "waiting", "best",
              "last activity"]
    table = [header]
    for r in rows:
        best = r["best"]
        table.append([r["study"] + (" (stopped)" if r["stopped"] else ""), f"{r['spec']}/{r['preset']}",
                      str(r["n_trials"] if r["n_trials"] is not None else "-"), str(r["complete"]),
                      str(r["pruned"]), str(r["failed"]), str(r["running"]), str(r["waiting"]),
                      f"{best['value']:.4f} (trial {best['trial']})" if best else "-",
                      (r["last_activity"] or "-").replace("T", " ")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


def study_folders(storage_url: str, study_name: str, artifacts: str | None = None,
                  logdir: str | None = None) -> list[Path]:
    """The folders a study and its verify and baseline siblings fill: artifacts (checkpoints,
    kept weights) and TensorBoard runs. None for a name that is not a safe one (stored before
    names were checked, or by plain Optuna): kdsweep never made folders for it, and a path made
    of it could lead anywhere."""
    from kdsweep.service.location import StorageURLError, check_study_name, location

    where = location(storage_url)
    try:
        names = tuple(check_study_name(study_name + s) for s in ("", VERIFY_SUFFIX, BASELINE_SUFFIX))
    except StorageURLError:
        return []
    return [where.artifacts(n, artifacts) for n in names] + [where.runs(logdir) / n for n in names]


def studies_table() -> str:
    """`kdsweep studies`: the study files found, with their presets (a broken one says why)."""
    from kdsweep.service import spec as specs

    lines = []
    for name, path in specs.available().items():
        try:
            s = specs.load(str(path))
            lines.append(f"{name:10s} {', '.join(s.presets):24s} {s.description}  ({path})")
        except specs.StudyError as exc:
            lines.append(f"{name:10s} (broken: {exc})")
    return "\n".join(lines)


def dump(doc: Any, fmt: str | None, output: str | None = None) -> str:
    """`doc` as JSON or YAML: `fmt` if given, else JSON for an `output` ending in .json."""
    import json

    import yaml

    fmt = fmt or ("json" if output and output.lower().endswith(".json") else "yaml")
    return json.dumps(doc, indent=2) + "\n" if fmt == "json" else yaml.safe_dump(doc, sort_keys=False)


def rm_question(sweep, folders: list[Path]) -> str:
    """What `kdsweep rm` asks to delete: "study 'q2' (3 of 50 trials finished, 1 running), its
    verify sibling 'q2.verify' and the folders runs/q2"."""
    c = sweep.counts()
    items = [f"study {sweep.name!r} ({c.finished} of {sweep.n_trials} trials finished, {c.running} running)"]
    items += [f"its {s.name.rsplit('.', 1)[-1]} sibling {s.name!r}" for s in sweep.family()[1:]]
    if folders:
        items.append(f"the folder{'s' if len(folders) > 1 else ''} {', '.join(map(str, folders))}")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def swept_value(path: str) -> tuple[str, int, float] | None:
    """(study, trial, value) recorded in an export of `kdsweep best`, or None for a bare config."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
        return str(doc["study"]), int(doc["trial"]), float(doc["value"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def remove_files(folders: Iterable[Path]) -> None:
    """Delete a study's folders (checkpoints, kept weights, TensorBoard runs) where they exist."""
    for folder in folders:
        if folder.is_dir():
            shutil.rmtree(folder)
