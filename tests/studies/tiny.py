"""tiny: the fault tests' own study, a small MLP on a real Fashion-MNIST subset.

Small enough that a trial takes a couple of seconds on one CPU thread; the `slow` preset is
slow enough per epoch (a few tenths of a second) that a test can kill a worker between two
epochs. Not a study to learn anything from: the tests only check what the sweep machinery
does with its trials.
The data come from Debian's dataset-fashion-mnist (found without --data).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service.space import Float, Int
from kdsweep.service.spec import Preset, StudySpec

if TYPE_CHECKING:  # imported where used: a usage error answers before Optuna loads
    import optuna

SPACE = [
    Float("optim.lr", 0.01, 0.3, log=True),
    Int("mlp.depth", 1, 2, target="model.depth"),
    Float("mlp.dropout", 0.0, 0.3, target="model.rate"),
]

DATA = DataConfig(dataset="fashion-mnist", val_size=500, train_subset=2000, test_subset=500,
                  pad=0, flip=False)


def pruner(config: TrainConfig) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()  # fault tests count trials; pruning would only blur that


def _config(epochs: int) -> TrainConfig:
    return TrainConfig(
        data=DATA,
        model=ModelConfig(arch="mlp", hidden=(128,)),
        optim=OptimConfig(lr=0.05, weight_decay=0.0),
        epochs=epochs,
        batch_size=64,
    )


def sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    # Random, not TPE: the crowded-SQLite test runs 200 trials and TPE's cost grows with them.
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


STUDY = StudySpec(
    name="tiny",
    sampler=sampler,
    description="fault-test study: 128-unit MLP, 2k Fashion-MNIST images",
    space=SPACE,
    pruner=pruner,
    presets={
        # ~0.3 s per epoch on one thread of a fast 2-core machine (a plain 2k-image MLP epoch
        # takes 0.03 s there, and one worker could finish the study before the other started).
        "slow": Preset(description="6 slow epochs: long enough to kill a worker mid-trial",
                       config=dataclasses.replace(_config(6), batch_size=16,
                                                  data=dataclasses.replace(DATA, train_subset=6000),
                                                  model=ModelConfig(arch="mlp", hidden=(512,)))),
        "quick": Preset(description="2 epochs", config=_config(2)),
        # lr up to 1e4 lets a test enqueue a point whose loss becomes inf/NaN.
        "faults": Preset(description="2 epochs, lr space wide enough to diverge", config=_config(2),
                         space={"optim.lr": {"low": 0.01, "high": 1e4}}),
    },
)
