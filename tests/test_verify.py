"""Seed verification: paired statistics, and a real tiny sweep verified by real workers."""

from __future__ import annotations

import json
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
    # Launched from a file path: verification finds it by the recorded path, with no search path.
    monkeypatch.delenv("KDSWEEP_STUDIES", raising=False)
    monkeypatch.setenv("KDSWEEP_THREADS", "1")
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--verify", "--grid", "--seeds", "2", "--top", "2",
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
    again = CliRunner().invoke(cli.main, ["best", "tiny", "--verify", "--grid", "--seeds", "2", "--top", "2",
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


# ---------------------------------------------------------------- scripted verification (no model)

LR = optuna.distributions.FloatDistribution(0.001, 0.3, log=True)
DROP = optuna.distributions.CategoricalDistribution([0.0, 0.2])


def _scripted_sweep(tmp_path: Path, tiny_npz: Path, values: list[float]) -> tuple[Sweep, str]:
    """A sweep of the tiny study created from its file path (as `kdsweep launch path/tiny.py`),
    holding complete trials with the given one-seed values (no training)."""
    from kdsweep.core.config import to_dict
    from kdsweep.service import spec as studies

    study_file = write_study(tmp_path, tiny_npz)
    url = f"sqlite:///{tmp_path}/s.db"
    spec = studies.load(str(study_file))
    sweep = Sweep.create(open_storage(url), spec, "smoke", "tiny", len(values), seed=0)
    for i, v in enumerate(values):
        params = {"optim.lr": 0.01 * (i + 1), "mlp.dropout": 0.0}
        config = to_dict(spec.config_for("smoke", params))
        sweep.study.add_trial(optuna.create_trial(
            value=v, params=params, distributions={"optim.lr": LR, "mlp.dropout": DROP},
            user_attrs={"config": config, "seed": config["seed"]}))
    return sweep, url


def _complete_waiting(sibling: Sweep, script: dict[int, list[float]]) -> int:
    """Finish every waiting verification run with its scripted value (by source trial and seed)."""
    from kdsweep.service import keys

    done = 0
    for _ in sibling.trials(optuna.trial.TrialState.WAITING):
        t = sibling.study.ask()
        attrs = sibling.study._storage.get_trial(t._trial_id).user_attrs
        sibling.study.tell(t, script[attrs[keys.VERIFY_SOURCE]][attrs[keys.VERIFY_SEED] - 1000])
        done += 1
    return done


def test_best_exports_a_runner_up_that_verifies_higher(tmp_path: Path, tiny_npz: Path) -> None:
    from kdsweep.service import racing

    sweep, url = _scripted_sweep(tmp_path, tiny_npz, [0.90, 0.88, 0.70])
    # The one-seed winner (trial 0) was lucky: on fresh seeds trial 1 is ahead.
    script = {0: [0.80, 0.81, 0.79, 0.80, 0.81, 0.80, 0.79, 0.80],
              1: [0.85, 0.86, 0.85, 0.84, 0.86, 0.85, 0.85, 0.86],
              2: [0.70, 0.71, 0.70, 0.69, 0.70, 0.71, 0.70, 0.70]}
    rounds = []

    def workers(sibling: Sweep) -> None:  # what `best --verify`'s own workers do: run the round
        rounds.append(_complete_waiting(sibling, script))

    st = racing.run(sweep, 8, 8, workers, lambda line: None)
    assert st.race.finished and st.race.winner() == 1
    assert rounds[:3] == [3, 3, 3] and sum(rounds) < 3 * 8  # the race stopped the beaten early
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--storage", url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["trial"] == 1 and doc["params"]["optim.lr"] == pytest.approx(0.02)
    assert doc["verified"]["trial"] == 1 and doc["verified"]["one_seed_winner"]["trial"] == 0
    assert doc["seed"] == doc["config"]["seed"]
    assert "exporting the verified winner, trial 1" in result.stderr
    assert "trial 0 vs trial 2" in result.stderr or "trial 1 vs trial" in result.stderr
    # Verified and finished: nothing asks for another verification.
    assert "--verify" not in result.stderr and "the seed verification is what settles it" in result.stderr


def test_best_without_verification_exports_the_one_seed_winner_and_suggests_verify(
        tmp_path: Path, tiny_npz: Path) -> None:
    _, url = _scripted_sweep(tmp_path, tiny_npz, [0.90, 0.88])
    result = CliRunner().invoke(cli.main, ["best", "tiny", "--storage", url, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["trial"] == 0
    assert "not verified over seeds" in result.stderr and "--verify" in result.stderr


def test_verify_no_run_queues_one_round_at_a_time_for_a_study_launched_from_a_file_path(
        tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep, url = _scripted_sweep(tmp_path, tiny_npz, [0.90, 0.89, 0.88])
    monkeypatch.delenv("KDSWEEP_STUDIES", raising=False)  # only the recorded path finds tiny.py
    monkeypatch.chdir(tmp_path.parent)
    args = ["best", "tiny", "--verify", "--no-run", "--storage", url]
    first = CliRunner().invoke(cli.main, args)
    assert first.exit_code == 0, first.output
    sibling = sweep.sibling(".verify")
    assert len(sibling.trials()) == 3 and sibling.n_trials == 3  # round 1: three candidates
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 0 and len(sibling.trials()) == 3  # nothing new until the round ran
    assert "race running: round 1 of at most 8" in again.output
    _complete_waiting(sibling, {c: [0.8] * 8 for c in range(3)})
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    assert len(sibling.trials()) == 6 and sibling.n_trials == 6  # round 2
    seeds = sorted({t.user_attrs["verify.seed"] for t in sibling.trials()})
    assert seeds == [1000, 1001]


def test_reverify_ranks_by_the_current_sweep(tmp_path: Path, tiny_npz: Path) -> None:
    from kdsweep.service import keys

    sweep, _ = _scripted_sweep(tmp_path, tiny_npz, [0.79, 0.78])
    sweep.queue_verification([(sweep.study.trials[n].params, n, s) for n in (0, 1) for s in (1000, 1001)])
    sibling = sweep.sibling(".verify")
    for t in sibling.trials():  # as an earlier kdsweep stored them: the rank when queued
        sibling.study._storage.set_trial_user_attr(t._trial_id, keys.VERIFY_RANK, t.user_attrs[keys.VERIFY_SOURCE] + 1)
    _complete_waiting(sibling, {0: [0.78, 0.79], 1: [0.77, 0.78]})
    # The sweep then finds a better trial, verified by the next --verify (rank 1 when queued).
    sweep.study.add_trial(optuna.create_trial(value=0.89, params={"optim.lr": 0.2, "mlp.dropout": 0.2},
                                              distributions={"optim.lr": LR, "mlp.dropout": DROP},
                                              user_attrs={"config": {}, "seed": 0}))
    sweep.queue_verification([(sweep.study.trials[2].params, 2, s) for s in (1000, 1001)])
    for t in sibling.trials(optuna.trial.TrialState.WAITING):
        sibling.study._storage.set_trial_user_attr(t._trial_id, keys.VERIFY_RANK, 1)
    _complete_waiting(sibling, {2: [0.88, 0.87]})
    runs = verify.collect(sweep, sibling)
    assert [(c.trial, c.rank) for c in runs] == [(2, 1), (0, 2), (1, 3)]
    text = verify.format_text(runs, verify.compare(runs))
    assert "#1 trial 2" in text and "#1 trial 0" not in text
    assert "winner trial 2 vs trial 0" in text and "winner trial 0 vs" not in text
