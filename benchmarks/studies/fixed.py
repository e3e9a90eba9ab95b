"""A benchmark study: every trial is the same fixed Q1 CNN training, never pruned.

`worker_scaling` runs it through kdsweep's real launcher and workers, so finished trials per
hour measure parallel efficiency and nothing else (no sampler choices, no pruning).
"""

import optuna

from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service.spec import Preset, StudySpec

BASE = TrainConfig(
    data=DataConfig(dataset="fashion-mnist", val_size=1000, train_subset=4000, pad=2),
    model=ModelConfig(arch="cnn", budget=30_000, depth=2, width=16, regularizer="dropout", rate=0.1),
    optim=OptimConfig(lr=0.05, weight_decay=5e-4),
    epochs=2,
    batch_size=128,
)

STUDY = StudySpec(
    name="bench_fixed",
    description="benchmark: identical fixed-config Q1 CNN trials (worker_scaling)",
    space=[],
    pruner=lambda config: optuna.pruners.NopPruner(),
    presets={
        "scaling": Preset(description="Q1 CNN, 4k Fashion-MNIST images, 2 epochs", config=BASE),
        "quick": Preset(
            description="Q1 CNN, 500 Fashion-MNIST images, 1 epoch",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=500, pad=2),
                model=BASE.model, optim=BASE.optim, epochs=1, batch_size=128,
            ),
        ),
        # `--trials-per-device` scaling on a GPU: the Q1 CNN at the paper budget (1M parameters).
        "gpu": Preset(
            description="Q1 CNN at 1M parameters, 20k Fashion-MNIST images, 2 epochs; a GPU",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=5000, train_subset=20_000, pad=2),
                model=ModelConfig(arch="cnn", budget=1_000_000, depth=2, width=64,
                                  regularizer="dropout", rate=0.1),
                optim=BASE.optim, epochs=2, batch_size=512,
            ),
        ),
    },
)

