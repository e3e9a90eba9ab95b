"""A plain Optuna sweep of Q1's question, written the way optuna-examples' pytorch_simple is, to
compare with `kdsweep launch q1 --preset smoke` on the same data and trial budget.

    python -m benchmarks.plain_optuna --n-trials 50 --workers 2 --storage sqlite:////tmp/plain.db

TPE sampler, median pruner (5 start-up trials, as Optuna's default), Adam, its own small MLP
and CNN (no parameter budget: a family, a width and a dropout are sampled), trained on exactly
the smoke preset's training and validation images (`kdsweep.core.data.load_splits` of the
preset's DataConfig, only to be sure of the same split; no augmentation, as that preset). Each
trial reports validation accuracy after every epoch and returns the last one, over the preset's
epochs. `--workers` processes share one SQLite storage, each one thread. It prints the wall
time, the best value and its parameters.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time

import click
import optuna
import torch
import torch.nn.functional as F
from torch import nn

from kdsweep.core import data
from kdsweep.service import spec as studies


def build(trial: optuna.Trial, in_shape: tuple[int, int, int], classes: int) -> nn.Module:
    family = trial.suggest_categorical("family", ["mlp", "cnn"])
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    c, h, w = in_shape
    if family == "mlp":
        hidden = trial.suggest_categorical("hidden", [32, 64, 128])
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))
    width = trial.suggest_categorical("width", [8, 16, 32])
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(dropout), nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), classes))


def objective(trial: optuna.Trial, splits: data.Splits, epochs: int, batch_size: int) -> float:
    torch.manual_seed(trial.number)
    mean, std = torch.tensor(splits.mean).view(1, -1, 1, 1), torch.tensor(splits.std).view(1, -1, 1, 1)
    train_x = (splits.train_x.float() / 255 - mean) / std
    val_x = (splits.val_x.float() / 255 - mean) / std
    model = build(trial, tuple(train_x.shape[1:]), int(splits.train_y.max()) + 1)
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_x)).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(train_x[idx]), splits.train_y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in
                      zip(val_x.split(1024), splits.val_y.split(1024), strict=True)) / len(val_x)
        trial.report(acc, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return acc


def _worker(storage: str, name: str, n_trials: int, epochs: int, batch_size: int, preset: str) -> None:
    torch.set_num_threads(1)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    splits = data.load_splits(studies.load("q1").base_config(preset).data)
    study = optuna.load_study(study_name=name, storage=storage)
    study.optimize(lambda t: objective(t, splits, epochs, batch_size),
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials)])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n-trials", type=click.IntRange(1), default=50, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True)
@click.option("--storage", required=True, help="Optuna storage URL (a fresh SQLite file).")
@click.option("--preset", default="smoke", show_default=True, help="q1 preset whose data and epochs are used.")
@click.option("--seed", type=int, default=0, show_default=True, help="TPE seed.")
def main(n_trials: int, workers: int, storage: str, preset: str, seed: int) -> None:
    """Run the plain sweep and print its wall time and best value."""
    base = studies.load("q1").base_config(preset)
    name = f"plain-q1-{preset}"
    start = time.perf_counter()
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(storage, name, n_trials, base.epochs, base.batch_size, preset))
             for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    states = [t.state.name for t in study.get_trials()]
    out = {"wall_s": round(wall, 1), "best": study.best_value, "params": study.best_params,
           "trials": len(states), "pruned": states.count("PRUNED"), "complete": states.count("COMPLETE")}
    click.echo(json.dumps(out))
    sys.exit(0)


if __name__ == "__main__":
    main()
