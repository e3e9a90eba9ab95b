"""kdsweep/service/baseline.py: the student alone (alpha=0) beside every Q2 sweep, in a sibling
study outside N, outside `best` and never pruned; and its place in `best --verify`."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from kdsweep.service import baseline, keys, verify
from kdsweep.service import spec as studies
from kdsweep.service.objective import Objective
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep


def create_or_resume(spec, preset, storage, name, n, overrides=None):
    return Sweep.create(storage, spec, preset, name, n, overrides=overrides)

SHRUNK = {"data.val_size": 200, "data.train_subset": 100, "epochs": 2, "batch_size": 50,
          "kd.teacher_train_subset": 200, "kd.teacher_epochs": 1}


@pytest.fixture
def storage(tmp_path: Path):
    return open_storage(f"sqlite:///{tmp_path / 'kd.db'}", heartbeat=False)


def test_prepare_makes_one_alpha0_run_outside_the_sweep(storage):
    sweep = create_or_resume(studies.load("q2"), "smoke", storage, "q2", 5, overrides=SHRUNK)
    before = sweep.counts()
    sibling = baseline.prepare(sweep)
    assert sibling is not None and sibling.name == "q2.baseline"
    (waiting,) = sibling.trials(TrialState.WAITING)
    assert waiting.system_attrs[keys.FIXED_PARAMS] == {"kd.alpha": 0.0, "kd.temperature": 1.0}
    assert waiting.user_attrs[keys.VERIFY_SEED] == 0 and waiting.user_attrs[baseline.REFERENCE]
    assert sibling.attrs[baseline.OF] == "q2" and sibling.n_trials == 1
    assert sibling.definition == sweep.definition
    # Nothing in the sweep changed (its N, its trials); preparing again adds nothing.
    assert sweep.counts() == before and sweep.n_trials == 5
    baseline.prepare(sweep)
    assert len(sibling.trials()) == 1
    # Not a KD study: no reference.
    q1 = create_or_resume(studies.load("q1"), "smoke", storage, "q1", 3)
    assert baseline.prepare(q1) is None


def test_reference_run_is_never_pruned_and_never_best(storage, tmp_path: Path, fmnist_dir: Path):
    study_def = studies.load("q2")
    sweep = create_or_resume(study_def, "smoke", storage, "q2", 5, overrides=SHRUNK)
    baseline.prepare(sweep)
    # A pruner that prunes every trial at its first report: the reference still completes.
    sibling = optuna.load_study(study_name="q2.baseline", storage=storage,
                                pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    objective = Objective(study_def, "smoke", {"device": "cpu", "threads": 1}, tmp_path / "art",
                          keep_weights=0, overrides=SHRUNK)
    sibling.optimize(objective, n_trials=1)
    (ref,) = sibling.get_trials()
    assert ref.state == TrialState.COMPLETE and ref.params["kd.alpha"] == 0.0
    assert ref.user_attrs["epochs_run"] == 2 and "teacher_key" not in ref.user_attrs
    assert ref.user_attrs["val_n"] == 200 and ref.user_attrs["test_acc"] is not None
    assert baseline.result(sweep).number == ref.number
    assert sweep.best_trial is None  # the sweep itself has no complete trial: the reference is not in it
    # best's line: the winner against it, paired on the images, one seed said.
    winner = optuna.trial.create_trial(value=ref.value, params={"kd.alpha": 0.5},
                                       distributions={"kd.alpha": FloatDistribution(0, 1)},
                                       user_attrs={k: ref.user_attrs[k] for k in ("val_correct", "val_n")})
    line = baseline.difference_line(winner, ref, "q2")
    assert "+0.0000" in line and "paired on 200 images" in line and "one seed" in line
    assert "not run yet" in baseline.difference_line(winner, None, "q2")


def test_verify_includes_the_reference_as_one_more_configuration(storage):
    sweep = create_or_resume(studies.load("q2"), "smoke", storage, "q2", 5, overrides=SHRUNK)
    for alpha, value in ((0.3, 0.7), (0.8, 0.72)):
        sweep.study.add_trial(optuna.trial.create_trial(
            value=value, params={"kd.alpha": alpha, "kd.temperature": 4.0},
            distributions={"kd.alpha": FloatDistribution(0, 1), "kd.temperature": FloatDistribution(1, 20)},
            user_attrs={"seed": 0}))
    seeds = verify.seeds_for(3)
    sibling, n = sweep.verify_sibling(2, seeds)
    n += baseline.add_to_verification(sweep, sibling, seeds, rank=3)
    assert n == 9 and sibling.n_trials == 9  # 2 configs + the reference, 3 seeds each
    refs = [t for t in sibling.trials() if t.user_attrs[keys.VERIFY_SOURCE] == verify.REFERENCE_SOURCE]
    assert len(refs) == 3 and {t.system_attrs[keys.FIXED_PARAMS]["kd.alpha"] for t in refs} == {0.0}
    # Seed-paired: the reference runs on the very seeds the configs run on.
    assert {t.user_attrs[keys.VERIFY_SEED] for t in refs} == set(seeds)
    # Asking again adds nothing.
    sweep.verify_sibling(2, seeds)
    baseline.add_to_verification(sweep, sibling, seeds, rank=3)
    assert len(sibling.trials()) == 9 and sibling.n_trials == 9
    runs = [verify.ConfigRuns(1, 1, {"kd.alpha": 0.8}, 0.72, {1000: 0.7, 1001: 0.71}, {1000: 0.69, 1001: 0.7}),
            verify.ConfigRuns(verify.REFERENCE_SOURCE, 3, {"kd.alpha": 0.0}, None, {1000: 0.68, 1001: 0.7})]
    text = verify.format_text(runs, verify.compare(runs))
    assert "alpha=0 reference (student alone)" in text and "vs the alpha=0 reference" in text
    assert "held-out test set: 0.6950" in text


@pytest.mark.slow
def test_launch_trains_the_alpha0_reference_first_not_after_the_sweep(tmp_path: Path, fmnist_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from kdsweep import cli

    study_file = Path(__file__).resolve().parent / "studies" / "tiny_kd.py"
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    monkeypatch.setenv("KDSWEEP_THREADS", "1")
    result = CliRunner().invoke(cli.main, ["launch", str(study_file), "--preset", "quick", "-n", "2", "-w", "1",
                                           "--device", "cpu", "--no-tensorboard", "--storage", url])
    assert result.exit_code == 0, result.output[-3000:]
    storage = open_storage(url, heartbeat=False)
    (ref,) = optuna.load_study(study_name="tiny_kd.baseline", storage=storage).get_trials()
    sweep = optuna.load_study(study_name="tiny_kd", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert ref.state == TrialState.COMPLETE and len(sweep) == 2
    # One worker: it took the reference before the sweep's trials, so the comparison with the
    # student alone is there while the sweep runs, not only after its last trial.
    assert ref.datetime_complete <= min(t.datetime_start for t in sweep)


def test_launch_eta_drops_the_reference_once_it_is_done(storage):
    """Worker 0 runs the alpha=0 reference first; once it is done, the ETA stops adding it
    (it was decided once, at the start, and kept adding it to the very end)."""
    from kdsweep.service.launch import ReferenceDue

    sweep = create_or_resume(studies.load("q2"), "smoke", storage, "q2", 5, overrides=SHRUNK)
    baseline.prepare(sweep)
    due = ReferenceDue(sweep)
    assert due() and due()
    sibling = optuna.load_study(study_name="q2.baseline", storage=storage)
    trial = sibling.ask()  # the waiting reference run
    sibling.tell(trial, 0.7)
    assert not due()
    q1 = create_or_resume(studies.load("q1"), "smoke", storage, "q1", 3)
    assert not ReferenceDue(q1)()
