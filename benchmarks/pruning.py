"""`pruning_epoch_savings`: time to accuracy with and without the Q1 study's pruner.

A Q1-style sweep on a real data subset (Fashion-MNIST at 14x14 px, 5k validation images, 9
epochs per trial), restricted to the MLP family so it stays affordable on a CPU. For each of
several sequences, N configurations are sampled once (random sampler, one seed per sequence)
and enqueued in two studies that differ only in their pruner: `studies/q1.py`'s own, and none.
Both run in order through kdsweep's real objective (`kdsweep.objective.Objective` -> `train()`
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
from typing import Any

import optuna

from benchmarks.common import Entry, env, mean_std, scratch
from kdsweep import space as sp
from kdsweep import studies
from kdsweep.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.objective import Objective
from kdsweep.studies import Preset

EPOCHS = 9
MARGIN = 0.005  # 0.5 points of accuracy


def bench_study(quick: bool) -> studies.Study:
    """Q1's study (its space, sampler and pruner) with an affordable MLP-only preset."""
    q1 = studies.load("q1")
    config = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=5000 if not quick else 1000,
                        train_subset=6000 if not quick else 1000, image_size=14, pad=1),
        model=ModelConfig(arch="mlp", budget=30_000, depth=2),
        optim=OptimConfig(lr=0.05, weight_decay=5e-4),
        epochs=EPOCHS if not quick else 3,
        batch_size=128,
    )
    preset = Preset(
        description="benchmark: Q1 MLP family, Fashion-MNIST 14 px, 9 epochs",
        config=config,
        space={"model.family": {"choices": ["mlp"]}, "optim.lr": {"low": 1e-3, "high": 1.0}},
    )
    return dataclasses.replace(q1, presets={"bench": preset})


def sample_sequence(study_def: studies.Study, n: int, seed: int) -> list[dict[str, Any]]:
    """n parameter sets drawn once from the study's space (random sampler, fixed seed)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = study_def.space_for("bench")
    return [sp.sample(probe.ask(), space) for _ in range(n)]


def run_sweep(study_def: studies.Study, params: list[dict[str, Any]], pruner: optuna.pruners.BasePruner,
              tmp, name: str) -> list[tuple[int, float | None]]:
    """(epochs run, final value or None if pruned) per trial, in order."""
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for p in params:
        study.enqueue_trial(p)
    objective = Objective(study_def, "bench", {"device": "cpu"}, tmp / name, tensorboard=None,
                          keep_weights=0)
    study.optimize(objective, n_trials=len(params))
    out = []
    for t in study.trials:
        epochs = len(t.intermediate_values)
        out.append((epochs, t.value if t.state == optuna.trial.TrialState.COMPLETE else None))
    return out


def epochs_to(trials: list[tuple[int, float | None]], target: float) -> int | None:
    spent = 0
    for epochs, value in trials:
        spent += epochs
        if value is not None and value >= target:
            return spent
    return None


def run(device: str, quick: bool, pruner_name: str = "study") -> Entry:
    study_def = bench_study(quick)
    n_trials, sequences = (6, 1) if quick else (24, 3)
    config = study_def.preset("bench").config
    rows = []
    logging.getLogger("optuna").setLevel(logging.WARNING)
    start = time.perf_counter()
    with scratch("pruning") as tmp, env(KDSWEEP_CACHE=str(tmp / "cache")):
        for seq in range(sequences):
            params = sample_sequence(study_def, n_trials, seed=seq)
            unpruned = run_sweep(study_def, params, optuna.pruners.NopPruner(), tmp, f"none-{seq}")
            pruned = run_sweep(study_def, params, study_def.pruner(config), tmp, f"pruned-{seq}")
            best_none = max(v for _, v in unpruned if v is not None)
            finished = [v for _, v in pruned if v is not None]
            target = best_none - MARGIN
            e_none = epochs_to(unpruned, target)
            e_pruned = epochs_to(pruned, target)
            rows.append({
                "sequence": seq, "best_unpruned": best_none,
                "best_pruned": max(finished) if finished else None,
                "epochs_unpruned": sum(e for e, _ in unpruned),
                "epochs_pruned": sum(e for e, _ in pruned),
                "epochs_to_target_unpruned": e_none, "epochs_to_target_pruned": e_pruned,
                "ratio": None if e_pruned is None else e_none / e_pruned,
            })
    ratios = [r["ratio"] for r in rows]
    complete = [r for r in ratios if r is not None]
    value, std = mean_std(complete) if len(complete) == len(ratios) else (None, None)
    return Entry(
        name="pruning_epoch_savings", value=value, unit="x fewer epochs to within 0.5 pt",
        baseline=1.0, ratio=value, goal=">= 2", device="cpu",
        met=value is not None and value >= 2,
        details={"ratio_std": std, "ratios": ratios, "pruner": type(study_def.pruner(config)).__name__,
                 "trials_per_sequence": n_trials, "epochs_per_trial": config.epochs,
                 "data": f"Fashion-MNIST {config.data.train_subset} train / {config.data.val_size} val, 14 px",
                 "sequences": rows, "seconds": round(time.perf_counter() - start, 1)},
    )
