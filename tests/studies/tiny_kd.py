"""tiny_kd: the fused-worker tests' own Q2-like study (alpha and T only), MLP student and teacher.

A Q2 study in shape (the same space and what may differ between trials) on a real
Fashion-MNIST subset, with models small enough that a trial takes seconds on one CPU thread;
`slow` is slow enough per epoch that a test can kill a worker mid-trial. The data come from
Debian's dataset-fashion-mnist.
"""

import optuna

from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service.space import Float
from kdsweep.service.spec import Preset, StudySpec

SPACE = [Float("kd.alpha", 0.0, 1.0), Float("kd.temperature", 1.0, 20.0)]


def pruner(config: TrainConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()  # the tests count trials


def sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _config(epochs: int, images: int) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=images, pad=0, flip=False),
        model=ModelConfig(arch="mlp", hidden=(256,)),
        optim=OptimConfig(lr=0.05, weight_decay=0.0),
        kd=KDConfig(teacher=ModelConfig(arch="mlp", hidden=(64,)), teacher_epochs=1),
        epochs=epochs,
        batch_size=16,
    )


STUDY = StudySpec(
    name="tiny_kd",
    sampler=sampler,
    description="fused-worker test study: KD between small MLPs, Fashion-MNIST subset",
    space=SPACE,
    pruner=pruner,
    presets={
        "slow": Preset(description="6 epochs of 2k images: long enough to kill a worker mid-trial",
                       config=_config(6, 2000)),
        "quick": Preset(description="2 epochs of 1k images", config=_config(2, 1000)),
    },
)
