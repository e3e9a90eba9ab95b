"""The objective: checkpoints per study, and the pruner never asked at a trial's last epoch."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.service import keys
from kdsweep.service import spec as studies


@pytest.fixture(scope="module")
def q2() -> studies.StudySpec:
    return studies.load("q2")


def test_a_checkpoint_of_another_study_with_the_same_name_is_not_resumed(
        q2: studies.StudySpec, tmp_path: Path) -> None:
    from kdsweep.service.objective import Objective

    objective = Objective(q2, "smoke", {}, tmp_path / "artifacts")
    old = optuna.create_study(study_name="q2")
    old.set_user_attr(keys.UID, "old")
    path = objective._checkpoint(old.ask())
    path.write_bytes(b"old study's epoch 2")
    new = optuna.create_study(study_name="q2")
    new.set_user_attr(keys.UID, "new")
    assert objective._checkpoint(new.ask()) == path and not path.exists()  # same path, old file gone
    path.write_bytes(b"new study's epoch 1")
    again = optuna.create_study(study_name="q2")
    again.set_user_attr(keys.UID, "new")
    assert objective._checkpoint(again.ask()) == path and path.exists()  # its own file is kept


@pytest.mark.parametrize(("epochs", "state"), [(2, TrialState.PRUNED), (1, TrialState.COMPLETE)])
def test_the_pruner_is_never_asked_at_the_last_epoch(fmnist_dir: Path, tmp_path: Path, epochs: int,
                                                     state: TrialState) -> None:
    # A pruner that prunes whatever it is asked about: it stops a 2-epoch trial after epoch 1,
    # but a trial that has run its last epoch completes (its value is paid for).
    from kdsweep.service.objective import Objective

    tiny = studies.load(str(Path(__file__).parent / "studies" / "tiny.py"))
    objective = Objective(tiny, "quick", {"device": "cpu", "threads": 1}, tmp_path / "artifacts",
                          overrides={"epochs": epochs})
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == state and sorted(trial.intermediate_values) == [1]
