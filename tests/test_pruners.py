"""CurvePruner on synthetic curves, ask/tell style (as Optuna's own pruner tests), no model.

Each trial reports its values epoch by epoch and asks `should_prune` after every epoch but the
last, exactly as kdsweep's objective does.
"""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.core.train import TrainingError
from kdsweep.service.pruners import CurvePruner

T = 9
RISING = [0.50, 0.62, 0.68, 0.72, 0.75, 0.77, 0.78, 0.79, 0.80]  # an ordinary curve that ends at 0.80


def study_with(*complete: list[float], pruner: CurvePruner | None = None,
               direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction, pruner=pruner or CurvePruner(T))
    for curve in complete:
        trial = study.ask()
        for epoch, v in enumerate(curve, start=1):
            trial.report(v, epoch)
        study.tell(trial, curve[-1])
    return study


def run(study: optuna.Study, curve: list[float]) -> int | None:
    """Feed one trial's curve like the objective; the epoch it was pruned at, or None."""
    trial = study.ask()
    for epoch, v in enumerate(curve, start=1):
        trial.report(v, epoch)
        if epoch < T and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return None


def test_a_flat_curve_below_the_incumbent_is_stopped_by_epoch_3_from_the_second_trial_on() -> None:
    study = study_with(RISING)  # one finished trial: the second trial of the sweep is judged
    assert run(study, [0.40] * T) == 3  # min_epoch 3 is the default: not before, but then


def test_a_flat_curve_is_stopped_among_many_curves_too() -> None:
    study = study_with(RISING, [v - 0.02 for v in RISING], [v + 0.01 for v in RISING], [0.3 + v / 2 for v in RISING])
    assert run(study, [0.50] * T) == 3


def test_a_slow_starter_whose_slope_carries_it_above_the_incumbent_is_kept() -> None:
    # DropBlock-like: far below the incumbent's epochs 1-4, rising fast, ends above it.
    slow = [0.10, 0.25, 0.40, 0.55, 0.68, 0.76, 0.80, 0.82, 0.83]
    assert run(study_with(RISING), slow) is None
    # ... also against flat, well-converged neighbours (whose own gains after epoch 3 are small).
    flat = [0.70, 0.76, 0.79, 0.795, 0.80, 0.80, 0.80, 0.80, 0.80]
    assert run(study_with(flat, [v - 0.01 for v in flat], [v - 0.03 for v in flat]), slow) is None


def test_a_stock_rung_pruner_stops_that_slow_starter() -> None:
    # Why the curve pruner exists: median pruning compares epoch values only.
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2))
    for curve in (RISING, RISING):
        trial = study.ask()
        for epoch, v in enumerate(curve, start=1):
            trial.report(v, epoch)
        study.tell(trial, curve[-1])
    assert run(study, [0.10, 0.25, 0.40, 0.55, 0.68, 0.76, 0.80, 0.82, 0.83]) is not None


def test_a_trial_in_an_empty_study_is_never_stopped() -> None:
    study = optuna.create_study(direction="maximize", pruner=CurvePruner(T, min_epoch=1))
    assert run(study, [0.0] * T) is None
    # Running, pruned and failed trials are no incumbent either.
    study = optuna.create_study(direction="maximize", pruner=CurvePruner(T, min_epoch=1))
    study.ask().report(0.9, 1)  # still running
    pruned = study.ask()
    pruned.report(0.95, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    assert run(study, [0.01] * T) is None


def test_a_diverged_nan_report_fails_the_trial_as_without_a_pruner() -> None:
    study = study_with(RISING, pruner=CurvePruner(T, min_epoch=1))

    def objective(trial: optuna.Trial) -> float:
        for epoch, v in enumerate([0.5, 0.6, math.nan], start=1):
            trial.report(v, epoch)
            if trial.should_prune():  # a NaN must not turn into PRUNED
                raise optuna.TrialPruned()
            if math.isnan(v):
                raise TrainingError("the training loss became nan in epoch 3.")  # as train() does
        return 0.6

    study.optimize(objective, n_trials=1, catch=(TrainingError,))
    assert study.trials[-1].state == TrialState.FAIL
    # The failed trial's NaN is no neighbour and no incumbent: the next decision is unchanged.
    other = study_with(RISING, pruner=CurvePruner(T, min_epoch=1))
    assert run(study, [0.40] * T) == run(other, [0.40] * T) == 1


def test_the_same_inputs_give_the_same_decision() -> None:
    curves = [RISING, [v - 0.05 for v in RISING], [0.2 + v * 0.7 for v in RISING]]
    probe = [0.45, 0.58, 0.63, 0.66, 0.68, 0.70, 0.71, 0.72, 0.725]
    pruner = CurvePruner(T)
    a, b = study_with(*curves, pruner=pruner), study_with(*curves, pruner=CurvePruner(T))
    chances = []
    for study in (a, b, a):  # another pruner object, and the same one again (its cache)
        trial = study.ask()
        for epoch, v in enumerate(probe[:4], start=1):
            trial.report(v, epoch)
        frozen = study._storage.get_trial(trial._trial_id)
        chances.append(study.pruner.chance(study, frozen))
        study.tell(trial, state=TrialState.FAIL)  # leave the study as it was
    assert chances[0] == chances[1] == chances[2]
    assert 0 < chances[0] < 1


def test_a_new_complete_trial_updates_the_forecast() -> None:
    pruner = CurvePruner(T)
    study = study_with(RISING, pruner=pruner)
    probe = [0.4, 0.5, 0.6]
    trial = study.ask()
    for epoch, v in enumerate(probe, start=1):
        trial.report(v, epoch)
    before = pruner.chance(study, study._storage.get_trial(trial._trial_id))
    better = [v + 0.1 for v in RISING]  # a new incumbent at 0.90
    other = study.ask()
    for epoch, v in enumerate(better, start=1):
        other.report(v, epoch)
    study.tell(other, better[-1])
    after = pruner.chance(study, study._storage.get_trial(trial._trial_id))
    assert after < before


def test_a_minimising_study_is_the_mirror_image() -> None:
    loss = [1 - v for v in RISING]
    study = study_with(loss, direction="minimize")
    assert run(study, [0.60] * T) == 3  # a flat loss far above the incumbent's
    assert run(study_with(loss, direction="minimize"), [0.9, 0.75, 0.6, 0.45, 0.32, 0.24, 0.2, 0.18, 0.17]) is None


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_epochs": 9, "confidence": 1.0},
                                    {"max_epochs": 9, "margin": -0.1}, {"max_epochs": 9, "min_epoch": 0}])
def test_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CurvePruner(**kwargs)
