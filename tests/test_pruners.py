"""CurvePruner on synthetic curves, ask/tell style (as Optuna's own pruner tests), no model.

Each trial reports its values epoch by epoch and asks `should_prune` after every epoch but the
last, exactly as kdsweep's objective does.
"""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.core.train import TrainingError
from kdsweep.service.pruners import CurvePruner, ForecastPruner

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


# --- ForecastPruner ---------------------------------------------------------------------------

KINDS = optuna.distributions.CategoricalDistribution(["fast", "slow", "bad"])
LR = optuna.distributions.FloatDistribution(0.01, 0.4, log=True)
SHAPES = {  # epoch 1 .. T, before a per-curve offset
    "fast": [0.60, 0.70, 0.74, 0.77, 0.79, 0.80, 0.81, 0.82, 0.82],
    "slow": [0.15, 0.35, 0.55, 0.68, 0.76, 0.80, 0.82, 0.83, 0.84],  # DropBlock-like: ends on top
    "bad": [0.30, 0.38, 0.42, 0.45, 0.47, 0.48, 0.49, 0.50, 0.50],
}


def scripted_prior(n: int = 30, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = ("fast", "slow", "bad")[i % 3]
        offset = rng.uniform(-0.02, 0.02)
        out.append({"params": {"kind": kind, "lr": rng.uniform(0.02, 0.3)},
                    "curve": [round(v + offset + rng.uniform(-0.005, 0.005), 4) for v in SHAPES[kind]]})
    return out


def forecast_pruner(miss: float | tuple[float, ...] = 0.1, **kwargs) -> ForecastPruner:
    return ForecastPruner(T, prior=scripted_prior(), prior_distributions={"kind": KINDS, "lr": LR},
                          miss=miss, param_weight=1.0, neighbours=5, **kwargs)


def run_with_params(study: optuna.Study, params: dict, curve: list[float]) -> int | None:
    """`run`, for a trial that samples `params` first (as a sweep's trial does)."""
    study.enqueue_trial(params)
    trial = study.ask()
    trial.suggest_categorical("kind", list(KINDS.choices))
    trial.suggest_float("lr", LR.low, LR.high, log=True)
    for epoch, v in enumerate(curve, start=1):
        trial.report(v, epoch)
        if epoch < T and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return None


def forecast_study(pruner: ForecastPruner | None = None) -> optuna.Study:
    """A study whose one complete trial (a fast configuration ending at 0.83) is the incumbent."""
    study = optuna.create_study(direction="maximize", pruner=pruner or forecast_pruner())
    assert run_with_params(study, {"kind": "fast", "lr": 0.1}, [v + 0.01 for v in SHAPES["fast"]]) is None
    return study


def test_forecast_a_clear_loser_is_stopped_at_epoch_1() -> None:
    assert run_with_params(forecast_study(), {"kind": "bad", "lr": 0.1}, SHAPES["bad"]) == 1


def test_forecast_a_slow_starter_is_kept_to_the_end() -> None:
    # Below the loser at epoch 1 (0.15 < 0.30), but its parameters and early slope match the
    # prior's slow starters, which end on top.
    assert run_with_params(forecast_study(), {"kind": "slow", "lr": 0.1}, SHAPES["slow"]) is None


def test_forecast_stops_nothing_without_a_bound() -> None:
    # No prior and a single complete trial: too few residuals for a calibrated bound.
    study = optuna.create_study(direction="maximize", pruner=ForecastPruner(T, miss=0.1))
    for curve in (RISING, [0.1] * T):
        assert run(study, curve) is None


def test_forecast_the_same_inputs_give_the_same_decision() -> None:
    def bound(study: optuna.Study, pruner: ForecastPruner) -> tuple[float, float] | None:
        study.enqueue_trial({"kind": "slow", "lr": 0.05})
        trial = study.ask()
        trial.suggest_categorical("kind", list(KINDS.choices))
        trial.suggest_float("lr", LR.low, LR.high, log=True)
        for epoch, v in enumerate([0.2, 0.4], start=1):
            trial.report(v, epoch)
        out = pruner.bound(study, study._storage.get_trial(trial._trial_id))
        study.tell(trial, state=TrialState.FAIL)  # leave the study as it was
        return out

    curves = [("fast", [v + 0.01 for v in SHAPES["fast"]]), ("slow", SHAPES["slow"]), ("bad", SHAPES["bad"])]
    one = forecast_pruner()
    a = optuna.create_study(direction="maximize", pruner=one)
    for kind, curve in curves:
        run_with_params(a, {"kind": kind, "lr": 0.1}, curve)
    first = bound(a, one)
    # The same pruner again (its cache), and a new pruner on a study that saw the same trials.
    assert bound(a, one) == first
    fresh = forecast_pruner()
    assert bound(a, fresh) == first
    assert first is not None and math.isfinite(first[0])


def test_forecast_replay_equals_a_real_ask_tell_study() -> None:
    # The benchmark's replay harness and a real study (optimize with an objective that reports
    # the same curves) take the same decisions.
    from benchmarks.pruning import replay

    rng = random.Random(1)
    trials = [({"kind": k, "lr": round(rng.uniform(0.02, 0.3), 4)},
               [round(v + rng.uniform(-0.03, 0.03), 4) for v in SHAPES[k]])
              for k in ("fast", "bad", "slow", "bad", "fast", "slow", "bad", "bad")]
    replayed = replay([c for _, c in trials], forecast_pruner(), params=[p for p, _ in trials],
                      dists={"kind": KINDS, "lr": LR})

    study = optuna.create_study(direction="maximize", pruner=forecast_pruner())
    for p, _ in trials:
        study.enqueue_trial(p)
    curves = iter(c for _, c in trials)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("kind", list(KINDS.choices))
        trial.suggest_float("lr", LR.low, LR.high, log=True)
        curve = next(curves)
        for epoch, v in enumerate(curve, start=1):
            trial.report(v, epoch)
            if epoch < len(curve) and trial.should_prune():
                raise optuna.TrialPruned()
        return curve[-1]

    study.optimize(objective, n_trials=len(trials))
    real = [(len(t.intermediate_values), t.value if t.state == TrialState.COMPLETE else None) for t in study.trials]
    assert real == replayed
    assert any(v is None for _, v in real) and any(v is not None for _, v in real[1:])  # both happened


def test_forecast_a_miss_schedule_applies_per_epoch() -> None:
    # miss=(0.1, 0.05): epoch 1 decides at 0.1 like miss=0.1 (a clear loser still stops there);
    # from epoch 2 on the bound is the more cautious 0.05 level, so it is higher.
    schedule = forecast_pruner(miss=(0.1, 0.05))
    assert [schedule.miss_at(e) for e in (1, 2, 5, 8)] == [0.1, 0.05, 0.05, 0.05]
    assert run_with_params(forecast_study(schedule), {"kind": "bad", "lr": 0.1}, SHAPES["bad"]) == 1
    # A readier first epoch still keeps the slow starter.
    ready = forecast_pruner(miss=(0.2, 0.1, 0.075, 0.05))
    assert run_with_params(forecast_study(ready), {"kind": "slow", "lr": 0.1}, SHAPES["slow"]) is None

    def bound_at(pruner: ForecastPruner, values: list[float]) -> tuple[float, float] | None:
        study = forecast_study(pruner)
        study.enqueue_trial({"kind": "bad", "lr": 0.1})
        trial = study.ask()
        trial.suggest_categorical("kind", list(KINDS.choices))
        trial.suggest_float("lr", LR.low, LR.high, log=True)
        for epoch, v in enumerate(values, start=1):
            trial.report(v, epoch)
        return pruner.bound(study, study._storage.get_trial(trial._trial_id))

    early, later = SHAPES["bad"][:1], SHAPES["bad"][:3]
    flat = bound_at(forecast_pruner(miss=0.1), early)
    assert flat is not None and bound_at(forecast_pruner(miss=(0.1, 0.05)), early) == flat
    cautious, plain = bound_at(forecast_pruner(miss=(0.1, 0.05)), later), bound_at(forecast_pruner(miss=0.1), later)
    assert cautious is not None and plain is not None and cautious[0] > plain[0]
    # The same inputs, the same decision: a schedule of one value is that value.
    assert bound_at(forecast_pruner(miss=(0.1,)), later) == plain


def test_forecast_a_winner_whose_value_falls_for_one_epoch_is_kept() -> None:
    # A fast configuration 2 points above the incumbent's whose validation value drops for one
    # epoch (0.45 at epoch 3) and jumps back: read as its best so far, it is still a winner.
    winner = [v + 0.03 for v in SHAPES["fast"]]
    assert run_with_params(forecast_study(), {"kind": "fast", "lr": 0.1}, winner[:2] + [0.45] + winner[3:]) is None


def test_forecast_lead_0_forecasts_a_slower_starter_from_its_neighbours_final_values() -> None:
    # Below every slow curve of the prior at epoch 1 (0.02 against about 0.15), then on their
    # path: lead 1 adds the neighbours' gains to 0.02 and stops it at epoch 1; lead 0 at epoch 1
    # forecasts the slow neighbours' final values (on top) and keeps it to the end.
    slower = [0.02] + SHAPES["slow"][1:]
    assert run_with_params(forecast_study(forecast_pruner(window=1)), {"kind": "slow", "lr": 0.1}, slower) == 1
    schedule = forecast_pruner(window=1, lead=(0.0, 0.6, 1.0))
    assert run_with_params(forecast_study(schedule), {"kind": "slow", "lr": 0.1}, slower) is None
    # A clear loser is still stopped at epoch 1.
    assert run_with_params(forecast_study(forecast_pruner(window=1, lead=(0.0, 0.6, 1.0))),
                           {"kind": "bad", "lr": 0.1}, SHAPES["bad"]) == 1


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_epochs": 9, "miss": 0.0},
                                    {"max_epochs": 9, "miss": (0.1, 0.0)}, {"max_epochs": 9, "miss": ()},
                                    {"max_epochs": 9, "margin": -0.1}, {"max_epochs": 9, "min_epoch": 0},
                                    {"max_epochs": 9, "lead": -0.1}, {"max_epochs": 9, "lead": (0.0, 1.5)},
                                    {"max_epochs": 9, "lead": ()}])
def test_forecast_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ForecastPruner(**kwargs)


# --- the per-study cache: a call that finds no new complete trial reads none --------------------

def scripted_sqlite_study(url: str, pruner: optuna.pruners.BasePruner, storage=None) -> optuna.Study:
    return optuna.create_study(study_name="cache", storage=storage or url, direction="maximize", pruner=pruner)


@pytest.mark.parametrize("make", [lambda: forecast_pruner(), lambda: CurvePruner(T, min_epoch=1)],
                         ids=["forecast", "curve"])
def test_a_cached_pruner_decides_as_a_fresh_one_at_every_call(tmp_path, make) -> None:
    # One pruner kept over a whole scripted sweep on SQLite (its cache read once per new complete
    # trial) and a new pruner at every call (everything read afresh) give the same answers.
    from kdsweep.service.storage import open_storage

    url = f"sqlite:///{tmp_path / 'cache.db'}"
    storage = open_storage(url, heartbeat=False)
    kept = make()
    study = scripted_sqlite_study(url, kept, storage)
    rng = random.Random(2)
    kinds = ("fast", "bad", "slow", "bad", "fast", "slow", "bad", "bad", "fast", "slow")
    answers: list[tuple] = []
    for kind in kinds:
        curve = [round(v + rng.uniform(-0.03, 0.03), 4) for v in SHAPES[kind]]
        study.enqueue_trial({"kind": kind, "lr": round(rng.uniform(0.02, 0.3), 4)})
        trial = study.ask()
        trial.suggest_categorical("kind", list(KINDS.choices))
        trial.suggest_float("lr", LR.low, LR.high, log=True)
        for epoch, v in enumerate(curve, start=1):
            trial.report(v, epoch)
            if epoch == T:
                break
            frozen = study._storage.get_trial(trial._trial_id)
            mine = [kept.prune(study, frozen) for _ in range(2)]  # twice: the second from the cache
            fresh = make()
            answers.append((kind, epoch, mine[0], fresh.prune(study, frozen)))
            assert mine[0] == mine[1] == answers[-1][3], answers[-1]
            if isinstance(kept, ForecastPruner):
                assert kept.bound(study, frozen) == fresh.bound(study, frozen)
            else:
                assert kept.chance(study, frozen) == fresh.chance(study, frozen)
        study.tell(trial, curve[-1])  # every trial completes: each call after it sees one more
    assert any(a[2] for a in answers) and not all(a[2] for a in answers)  # both decisions happened


def test_complete_trials_are_counted_through_the_sweeps_storage_and_pruner_view(tmp_path) -> None:
    from kdsweep.service.requeue import AsOrigin
    from kdsweep.service.storage import complete_count, open_storage

    url = f"sqlite:///{tmp_path / 'count.db'}"
    study = optuna.create_study(study_name="count", storage=open_storage(url, heartbeat=False), direction="maximize")
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL):
        trial = study.ask()
        trial.report(0.5, 1)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    study.ask()  # running
    view = AsOrigin(CurvePruner(T)).view(study)
    plain = optuna.load_study(study_name="count", storage=url)  # Optuna's own cached RDB storage
    assert [complete_count(s._storage, s._study_id) for s in (study, view, plain)] == [2, 2, 2]
    assert complete_count(optuna.create_study()._storage, 0) is None  # in memory: no count


@pytest.mark.parametrize("make", [lambda: forecast_pruner(), lambda: CurvePruner(T, min_epoch=1)],
                         ids=["forecast", "curve"])
def test_a_call_with_no_new_complete_trial_reads_no_trials(tmp_path, make, monkeypatch) -> None:
    # The cost at thousands of trials: Optuna's RDB get_trials reloads every running trial and
    # sorts all of them; the pruner asks the database for a count instead and reads only when it grew.
    url = f"sqlite:///{tmp_path / 'reads.db'}"
    pruner = make()
    study = scripted_sqlite_study(url, pruner)
    for kind in ("fast", "bad", "slow"):  # three complete trials, told without asking the pruner
        study.enqueue_trial({"kind": kind, "lr": 0.1})
        done = study.ask()
        done.suggest_categorical("kind", list(KINDS.choices))
        done.suggest_float("lr", LR.low, LR.high, log=True)
        for epoch, v in enumerate(SHAPES[kind], start=1):
            done.report(v, epoch)
        study.tell(done, SHAPES[kind][-1])
    reads = []
    real = study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda *a, **k: reads.append(1) or real(*a, **k))
    study.enqueue_trial({"kind": "bad", "lr": 0.1})
    trial = study.ask()
    trial.suggest_categorical("kind", list(KINDS.choices))
    trial.suggest_float("lr", LR.low, LR.high, log=True)
    trial.report(0.3, 1)
    first = trial.should_prune()  # the first call reads them
    assert len(reads) == 1
    assert [trial.should_prune() for _ in range(3)] == [first] * 3
    assert len(reads) == 1  # the cache already holds all three complete trials
    other = study.ask()  # a fourth trial completes: the next call reads once
    other.report(0.9, 1)
    study.tell(other, 0.9)
    trial.should_prune()
    trial.should_prune()
    assert len(reads) == 2
