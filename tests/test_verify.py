"""Seed verification: paired statistics, and a real tiny sweep verified by real workers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from scipy import stats
from tiny_sweep import run_tiny_sweep, write_study

from kdsweep import cli
from kdsweep.service import verify
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep


def test_paired_interval_matches_scipy() -> None:
    a = {1: 0.80, 2: 0.82, 3: 0.79, 4: 0.81}
    b = {1: 0.78, 2: 0.81, 3: 0.78, 4: 0.78, 9: 0.99}  # seed 9 has no partner and is ignored
    p = verify.paired(a, b, other=7)
    d = [0.02, 0.01, 0.01, 0.03]
    low, high = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
    assert (p.other, p.n) == (7, 4)
    assert p.mean == pytest.approx(0.0175)
    assert (p.low, p.high) == (pytest.approx(low), pytest.approx(high))
    assert p.exceeds_noise  # every seed favours a


def test_noisy_difference_stays_within_noise() -> None:
    p = verify.paired({1: 0.80, 2: 0.70, 3: 0.85}, {1: 0.75, 2: 0.78, 3: 0.80}, other=1)
    assert p.low < 0 < p.high and not p.exceeds_noise
    one = verify.paired({1: 0.9}, {1: 0.1}, other=1)
    assert one.n == 1 and not one.exceeds_noise  # one pair says nothing about noise
    assert verify.paired({1: 0.9}, {2: 0.1}, other=1) is None


def test_format_text_says_mean_std_and_verdict() -> None:
    runs = [verify.ConfigRuns(4, 1, {"kd.alpha": 0.5}, 0.9, {1000: 0.80, 1001: 0.84}),
            verify.ConfigRuns(2, 2, {"kd.alpha": 0.1}, 0.88, {1000: 0.70, 1001: 0.75})]
    text = verify.format_text(runs, verify.compare(runs))
    assert "#1 trial 4: 0.8200 ± 0.0283 over 2 seeds (sweep 0.9000)  kd.alpha=0.5" in text
    assert "winner trial 4 vs trial 2: +0.0950" in text and "exceeds seed noise" in text


@pytest.mark.slow
def test_verify_end_to_end(tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/v.db"
    sweep = run_tiny_sweep(study_file, url, 3, tmp_path, tensorboard=False)
    top = Sweep(sweep).top(2)
    monkeypatch.setenv("KDSWEEP_STUDIES", str(tmp_path))  # the workers find the study file by name
    monkeypatch.setenv("KDSWEEP_THREADS", "1")
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--verify", "--seeds", "2", "--top", "2",
                                           "--device", "cpu", "--storage", url])
    assert result.exit_code == 0, result.output
    storage = open_storage(url, heartbeat=False)
    sibling = optuna.load_study(study_name="tiny.verify", storage=storage)
    runs = sibling.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    states = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in sibling.trials]
    assert len(runs) == 4 and len(sibling.trials) == 4, (states, result.output[-3000:])
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 3  # sweep untouched
    by = {(t.user_attrs["verify.source_trial"], t.user_attrs["verify.seed"]): t for t in runs}
    assert set(by) == {(t.number, s) for t in top for s in (1000, 1001)}
    for (src, seed), t in by.items():
        assert t.params == sweep.trials[src].params
        assert t.user_attrs["config"]["seed"] == seed  # the worker trained with the run's seed
        assert len(t.intermediate_values) == 2  # never pruned
    w = [by[(top[0].number, s)].value for s in (1000, 1001)]
    r = [by[(top[1].number, s)].value for s in (1000, 1001)]
    mean = statistics.fmean(w)
    assert f"#1 trial {top[0].number}: {mean:.4f} ± {statistics.stdev(w):.4f} over 2 seeds" in result.output
    diff = statistics.fmean([a - b for a, b in zip(w, r, strict=True)])
    assert f"winner trial {top[0].number} vs trial {top[1].number}: {diff:+.4f}" in result.output
    assert not math.isnan(diff)

    # Asking again queues nothing new; `best` and `report` show the verification afterwards.
    again = CliRunner().invoke(cli.main, ["best", "tiny", "--verify", "--seeds", "2", "--top", "2",
                                          "--no-run", "--storage", url])
    assert again.exit_code == 0 and len(sibling.trials) == 4, again.output
    shown = CliRunner().invoke(cli.main, ["best", "tiny", "--storage", url])
    assert "seed verification (tiny.verify)" in shown.output, shown.output
    out = tmp_path / "rep"
    assert CliRunner().invoke(cli.main, ["report", "tiny", "--storage", url, "-o", str(out)]).exit_code == 0
    assert "## Seed verification" in (out / "summary.md").read_text()


def test_verify_refuses_a_study_without_complete_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/n.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=False))
    study.set_user_attr("kdsweep.definition", {"study": "q2", "preset": "smoke"})
    result = CliRunner().invoke(cli.main, ["best", "s", "--verify", "--storage", url])
    # Exit 1, as `best` without --verify: no complete trial yet is a state, not a usage error.
    assert result.exit_code == 1 and "has no complete trial yet" in result.output
    assert "s.verify" not in [s.study_name for s in optuna.get_all_study_summaries(url)]


@pytest.mark.slow
def test_best_weights_are_kept_and_exported_with_their_config(tmp_path: Path, tiny_npz: Path) -> None:
    import torch

    from kdsweep.core.config import TrainConfig, from_dict
    from kdsweep.core.data import load_splits
    from kdsweep.core.train import evaluate, input_shape
    from kdsweep.service.weights import load_model

    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/w.db"
    sweep = run_tiny_sweep(study_file, url, 5, tmp_path, tensorboard=False)
    done = sweep.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    kept = [t for t in done if Path(t.user_attrs.get("weights", "/nonexistent")).exists()]
    files = list((tmp_path / "kdsweep-artifacts" / "tiny" / "weights").glob("*.pt"))
    assert 1 <= len(files) <= 3 and len(kept) == len(files)  # only the best few, not every trial
    assert min(t.value for t in kept) >= max(t.value for t in done if t not in kept)
    assert sweep.best_trial in kept

    out = tmp_path / "export" / "best.pt"
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--storage", url, "--weights", str(out),
                                           "-o", str(tmp_path / "best.yaml")])
    assert result.exit_code == 0, result.output
    blob = torch.load(out, weights_only=True)
    assert blob["trial"] == sweep.best_trial.number
    assert from_dict(TrainConfig, blob["config"]) == from_dict(TrainConfig, sweep.best_trial.user_attrs["config"])
    # The exported file alone rebuilds the model that earned the trial's value.
    model = load_model(out)
    config = from_dict(TrainConfig, blob["config"])
    splits = load_splits(config.data)
    assert input_shape(config, splits)
    acc = evaluate(model, splits.val_x, splits.val_y, config, splits, torch.device("cpu"))
    assert acc == pytest.approx(sweep.best_value, abs=1e-9)


def test_best_weights_missing_is_one_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=False), direction="maximize")
    study.add_trial(optuna.create_trial(value=0.5, user_attrs={"config": {}}))
    result = CliRunner().invoke(cli.main, ["best", "s", "--storage", url, "--weights", str(tmp_path / "w.pt")])
    assert result.exit_code == 1 and "no kept weights for trial 0" in result.output
    assert not (tmp_path / "w.pt").exists()


def test_verify_refuses_a_study_the_local_file_no_longer_matches(tmp_path: Path, tiny_npz: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.service import keys
    from kdsweep.service import spec as studies

    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/d.db"
    sweep = Sweep.create(open_storage(url), studies.load(str(study_file)), "smoke", "tiny", 1).study
    stale = sweep.user_attrs[keys.DEFINITION]
    stale["config"]["epochs"] = 7  # as if the study file changed since the sweep ran
    sweep.set_user_attr(keys.DEFINITION, stale)
    sweep.add_trial(optuna.create_trial(value=0.5, params={}, distributions={}))
    monkeypatch.setenv("KDSWEEP_STUDIES", str(tmp_path))
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--verify", "--storage", url])
    assert result.exit_code == 2 and "different definition (config.epochs" in result.output
    assert "tiny.verify" not in [s.study_name for s in optuna.get_all_study_summaries(url)]
