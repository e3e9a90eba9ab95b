"""`kdsweep export`: one row per trial, as a table a notebook reads (CSV, parquet, JSON lines).

Built on Optuna's `Study.trials_dataframe()`; kdsweep adds what its trials store beside the
parameters (epochs run, wall time, FLOPs, parameter count, training seed, host) and the binomial
standard error of each value, and leaves out what a table should not hold: the per-image
validation masks and the full config (`kdsweep trial N --json` has both). Re-queued attempts
(an interrupted or dead worker's, run again under a new number) are left out unless asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdsweep.service import keys
from kdsweep.service.spec import StudyError
from kdsweep.service.sweep import BASELINE_SUFFIX, VERIFY_SUFFIX, Sweep, is_requeued

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# kdsweep's user attrs that become columns, under these names (the rest stay out of the table).
COLUMNS = {keys.EPOCHS_RUN: "epochs", keys.WALL_TIME: "wall_time_s", keys.FLOPS: "flops",
           keys.PARAMS_COUNT: "params", keys.TRAIN_SEED: "seed", keys.HOST: "host",
           keys.TEST_ACC: "test_acc", keys.VAL_N: "val_n"}
SIBLINGS = {"verify": VERIFY_SUFFIX, "baseline": BASELINE_SUFFIX}


def output_format(path: str) -> str:
    """csv, parquet or jsonl from the file's suffix; StudyError (a usage error) otherwise."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise StudyError(f"cannot tell the format of {path!r}; end it in .csv, .parquet or .jsonl.")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise StudyError("writing .parquet needs pyarrow (pip install 'kdsweep[parquet]'); "
                             "or write .csv or .jsonl.") from None
    return fmt


def trials_table(sweep: Sweep, all_attempts: bool = False, siblings: Sequence[str] = ()):
    """The pandas DataFrame of `sweep` (and of the `siblings` asked for: verify, baseline):
    one row per trial, re-queued attempts left out unless `all_attempts`."""
    import pandas as pd

    frames = [_frame(sweep, all_attempts)]
    for kind in siblings:
        sibling = sweep.sibling(SIBLINGS[kind])
        if sibling is not None:
            frames.append(_frame(sibling, all_attempts))
    return pd.concat(frames, ignore_index=True)


def _frame(sweep: Sweep, all_attempts: bool):
    trials = {t.number: t for t in sweep.study.get_trials(deepcopy=False)}
    df = sweep.study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                             "datetime_start", "datetime_complete"))
    if df.empty:
        df = df.reindex(columns=["number", "state", "value"])
    # Optuna names the value column after the study's metric (value_val_acc) when it has one.
    metric = [c for c in df.columns if c.startswith("value_")]
    df = df.rename(columns={c: "value" for c in metric[:1]})
    if not all_attempts:
        df = df[[not is_requeued(trials[n]) for n in df["number"]]]
    df = df.rename(columns={f"user_attrs_{k}": v for k, v in COLUMNS.items()})
    df = df.drop(columns=[c for c in df.columns if c.startswith("user_attrs_")])
    df = df.rename(columns=lambda c: c.removeprefix("params_") if c.startswith("params_") else c)
    df.insert(0, "study", sweep.name)
    df.insert(1, "metric", metric[0].removeprefix("value_") if metric else "value")
    df["requeued"] = [is_requeued(trials[n]) for n in df["number"]]
    sizes = df["val_n"] if "val_n" in df else [None] * len(df)
    df["value_se"] = [_binomial_se(v, n) for v, n in zip(df["value"], sizes, strict=True)]
    df["state"] = df["state"].astype(str)
    first = ["study", "number", "state", "metric", "value", "value_se"]
    return df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)


def _binomial_se(value: Any, n: Any) -> float | None:
    """sqrt(p (1 - p) / n) of an accuracy p measured on n images (None where either is missing)."""
    try:
        p, n = float(value), int(n)
    except (TypeError, ValueError):
        return None
    if math.isnan(p) or n <= 0:
        return None
    return math.sqrt(p * (1 - p) / n)


def write(df, path: str) -> None:
    """Write the table to `path` in the format its suffix names."""
    fmt = output_format(path)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, date_format="iso")
