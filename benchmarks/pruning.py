"""`pruning_epoch_savings`: time to accuracy with and without the Q1 study's pruner.

A Q1-style sweep on a real data subset (Fashion-MNIST at 14x14 px, 5k validation images, 9
epochs per trial), restricted to the MLP family so it stays affordable on a CPU. For each of
several sequences, N configurations are sampled once (random sampler, one seed per sequence)
and enqueued in two studies that differ only in their pruner: `studies/q1.py`'s own, and none.
Both run in order through kdsweep's real objective (`kdsweep.service.objective.Objective` -> `train()`
-> `trial.report` / `should_prune`). Then:

    target   = the unpruned sweep's final best - 0.5 points
    E_none   = epochs the unpruned sweep spends until a finished trial reaches `target`
    E_pruned = epochs the pruned sweep spends until a finished trial reaches `target` (None: never)
    ratio    = E_none / E_pruned

reported as mean +- std over the sequences (a sequence that never gets there counts as None
and makes the entry fail its goal), with both final bests and total epochs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any

import optuna

from benchmarks.common import Entry, env, mean_std, scratch
from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.core.train import TrainingError
from kdsweep.service import space as sp
from kdsweep.service import spec as studies
from kdsweep.service.objective import Objective
from kdsweep.service.spec import Preset

EPOCHS = 9
MARGIN = 0.005  # 0.5 points of accuracy


def bench_study(quick: bool) -> studies.StudySpec:
    """Q1's study (its space, sampler and pruner) with an affordable MLP-only preset."""
    q1 = studies.load("q1")
    config = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=5000 if not quick else 1000,
                        train_subset=4000 if not quick else 1000, image_size=14, pad=1),
        model=ModelConfig(arch="mlp", budget=30_000, depth=2),
        optim=OptimConfig(lr=0.05, weight_decay=5e-4),
        epochs=EPOCHS if not quick else 3,
        batch_size=128,
    )
    preset = Preset(
        description="benchmark: Q1 MLP family, Fashion-MNIST 14 px, 9 epochs",
        config=config,
        space={"model.family": {"choices": ["mlp"]}},
    )
    return dataclasses.replace(q1, presets={"bench": preset})


def sample_sequence(study_def: studies.StudySpec, n: int, seed: int) -> list[dict[str, Any]]:
    """n parameter sets drawn once from the study's space (random sampler, fixed seed)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = study_def.space_for("bench")
    return [sp.sample(probe.ask(), space) for _ in range(n)]


def run_sweep(study_def: studies.StudySpec, params: list[dict[str, Any]], pruner: optuna.pruners.BasePruner,
              tmp, name: str) -> tuple[list[tuple[int, float | None]], list[list[float]]]:
    """(epochs run, final value or None if pruned) per trial, in order; and the curves."""
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for p in params:
        study.enqueue_trial(p)
    # One thread: this entry counts epochs, not seconds, and one thread per process is what
    # stays fast when other processes share the cores (OpenMP threads spin-wait otherwise).
    objective = Objective(study_def, "bench", {"device": "cpu", "threads": 1}, tmp / name, tensorboard=None,
                          keep_weights=0)
    # A diverging trial fails, as in a real sweep; its epochs still count.
    study.optimize(objective, n_trials=len(params), catch=(TrainingError,))
    out, curves = [], []
    for t in study.trials:
        epochs = len(t.intermediate_values)
        out.append((epochs, t.value if t.state == optuna.trial.TrialState.COMPLETE else None))
        curve = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        curves.append(curve if t.state != optuna.trial.TrialState.FAIL else curve + [None])
    return out, curves


def replay(curves: list[list[float]], pruner: optuna.pruners.BasePruner, name: str
           ) -> list[tuple[int, float | None]]:
    """Run a pruner over recorded full learning curves, as if the trials trained again.

    Exact because `train()` is deterministic on CPU for a fixed config and seed (a pruned
    trial's curve is a prefix of its unpruned one); the real pruned sweep checks this.
    """
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
    out = []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            if value is None:  # the trial failed (diverged) after epoch - 1
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                out.append((epoch - 1, None))
                break
            trial.report(value, epoch)
            # The objective checks after every epoch but the last (a finished trial completes).
            if epoch < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                out.append((epoch, None))
                break
        else:
            if curve and curve[-1] is not None:
                study.tell(trial, curve[-1])
                out.append((len(curve), curve[-1]))
    return out


def candidates(epochs: int) -> dict[str, optuna.pruners.BasePruner]:
    """Stock pruners compared by replay (not the study's choice unless studies/q1.py says so)."""
    P = optuna.pruners
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # PatientPruner
    return {
        "hyperband(1..9, eta 3)": P.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3),
        "median(5 startup, 1 warm-up)": P.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        "median(5 startup, 2 warm-up)": P.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
        "percentile 25 (5 startup, 2 warm-up)": P.PercentilePruner(25, n_startup_trials=5, n_warmup_steps=2),
        "successive halving(min 1, eta 3)": P.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "successive halving(min 2, eta 3)": P.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3),
        "patient(median, patience 1)": P.PatientPruner(P.MedianPruner(n_startup_trials=5, n_warmup_steps=1), patience=1),
    }


def summarise(unpruned, pruned) -> dict[str, Any]:
    best_none = max(v for _, v in unpruned if v is not None)
    finished = [v for _, v in pruned if v is not None]
    target = best_none - MARGIN
    e_none = epochs_to(unpruned, target)
    e_pruned = epochs_to(pruned, target)
    return {
        "best_unpruned": best_none, "best_pruned": max(finished) if finished else None,
        "epochs_unpruned": sum(e for e, _ in unpruned), "epochs_pruned": sum(e for e, _ in pruned),
        "epochs_to_target_unpruned": e_none, "epochs_to_target_pruned": e_pruned,
        "ratio": None if e_pruned is None else e_none / e_pruned,
    }


def epochs_to(trials: list[tuple[int, float | None]], target: float) -> int | None:
    spent = 0
    for epochs, value in trials:
        spent += epochs
        if value is not None and value >= target:
            return spent
    return None


def run(device: str, quick: bool, pruner_name: str = "study") -> Entry:
    study_def = bench_study(quick)
    n_trials, sequences = (6, 1) if quick else (16, 3)
    config = study_def.preset("bench").config
    rows = []
    logging.getLogger("optuna").setLevel(logging.WARNING)
    start = time.perf_counter()
    with scratch("pruning") as tmp, env(KDSWEEP_CACHE=str(tmp / "cache")):
        for seq in range(sequences):
            params = sample_sequence(study_def, n_trials, seed=seq)
            unpruned, curves = run_sweep(study_def, params, optuna.pruners.NopPruner(), tmp, f"none-{seq}")
            pruned, _ = run_sweep(study_def, params, study_def.pruner(config), tmp, f"pruned-{seq}")
            row = {"sequence": seq, **summarise(unpruned, pruned)}
            # The same pruner replayed over the unpruned curves must reproduce the real run.
            row["replay_matches_real_run"] = replay(curves, study_def.pruner(config), f"pruned-{seq}") == pruned
            row["replayed"] = {name: summarise(unpruned, replay(curves, p, f"cand-{seq}"))["ratio"]
                               for name, p in candidates(config.epochs).items()}
            # Kept so other pruners can be replayed later without training again.
            row["curves"] = [[None if v is None else round(v, 4) for v in c] for c in curves]
            row["params"] = params
            rows.append(row)
    ratios = [r["ratio"] for r in rows]
    replayed = {name: [r["replayed"][name] for r in rows] for name in rows[0]["replayed"]}
    complete = [r for r in ratios if r is not None]
    value, std = mean_std(complete) if len(complete) == len(ratios) else (None, None)
    return Entry(
        name="pruning_epoch_savings", value=value, unit="x fewer epochs to within 0.5 pt",
        baseline=1.0, ratio=value, goal=">= 2", device="cpu",
        met=value is not None and value >= 2,
        details={"ratio_std": std, "ratios": ratios, "pruner": type(study_def.pruner(config)).__name__,
                 "trials_per_sequence": n_trials, "epochs_per_trial": config.epochs,
                 "data": f"Fashion-MNIST {config.data.train_subset} train / {config.data.val_size} val, 14 px",
                 "replayed_ratios": replayed, "sequences": rows, "seconds": round(time.perf_counter() - start, 1)},
    )
