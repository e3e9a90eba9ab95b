"""`kdsweep export`: one row per trial in CSV / JSON lines, built on Optuna's trials_dataframe."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from kdsweep.cli import main
from kdsweep.service import keys
from kdsweep.service.storage import open_storage

DISTS = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
         "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
TRAINED = {keys.EPOCHS_RUN: 3, keys.WALL_TIME: 12.5, keys.FLOPS: 1_000_000, keys.PARAMS_COUNT: 11_000,
           keys.TRAIN_SEED: 0, keys.HOST: "gpu-1", keys.VAL_N: 400, keys.VAL_CORRECT: "AAAA",
           keys.CONFIG: {"epochs": 3}}


def add(study: optuna.Study, alpha: float, state: optuna.trial.TrialState, value: float | None,
        **attrs: object) -> None:
    study.add_trial(optuna.create_trial(
        params={"kd.alpha": alpha, "kd.temperature": 4.0}, distributions=DISTS, state=state, value=value,
        intermediate_values={1: 0.5}, user_attrs={**TRAINED, **attrs}))


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/kd.db"
    storage = open_storage(url, heartbeat=False)
    study = optuna.create_study(study_name="q2", direction="maximize", storage=storage)
    study.set_metric_names(["val_acc"])
    C = optuna.trial.TrialState
    add(study, 0.9, C.COMPLETE, 0.8)
    add(study, 0.5, C.PRUNED, None, **{keys.EPOCHS_RUN: 1})
    add(study, 0.1, C.FAIL, None, **{keys.REQUEUED: True, keys.FAIL_REASON: "interrupted"})  # run again
    add(study, 0.1, C.COMPLETE, 0.75)
    verify = optuna.create_study(study_name="q2.verify", direction="maximize", storage=storage)
    add(verify, 0.9, C.COMPLETE, 0.79)
    return url


def export(url: str, out: Path, *args: str):
    return CliRunner().invoke(main, ["export", "q2", "--storage", url, "-o", str(out), *args], prog_name="kdsweep")


def test_one_row_per_trial_with_its_standard_error_and_no_masks(url: str, tmp_path: Path) -> None:
    db = Path(url.removeprefix("sqlite:///"))
    before = db.read_bytes()
    result = export(url, tmp_path / "trials.csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "3"]  # the re-queued attempt left out
    first = rows[0]
    assert first["state"] == "COMPLETE" and first["metric"] == "val_acc" and float(first["value"]) == 0.8
    assert float(first["value_se"]) == pytest.approx(math.sqrt(0.8 * 0.2 / 400))
    assert (first["kd.alpha"], first["epochs"], first["wall_time_s"], first["flops"], first["params"],
            first["seed"], first["host"]) == ("0.9", "3", "12.5", "1000000", "11000", "0", "gpu-1")
    assert rows[1]["state"] == "PRUNED" and rows[1]["epochs"] == "1" and rows[1]["value_se"] == ""
    assert not any("val_correct" in c or "config" in c for c in first)
    assert db.read_bytes() == before  # a read command


def test_all_attempts_and_siblings_on_request_in_json_lines(url: str, tmp_path: Path) -> None:
    result = export(url, tmp_path / "trials.jsonl", "--all", "--verify")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [(r["study"], r["number"], r["requeued"]) for r in rows] == [
        ("q2", 0, False), ("q2", 1, False), ("q2", 2, True), ("q2", 3, False), ("q2.verify", 0, False)]


def test_an_unknown_format_is_a_usage_error(url: str, tmp_path: Path) -> None:
    result = export(url, tmp_path / "trials.xlsx")
    assert result.exit_code == 2 and "end it in .csv, .parquet or .jsonl" in result.output
    assert not (tmp_path / "trials.xlsx").exists()
