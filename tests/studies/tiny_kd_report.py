"""tiny_kd_report: tiny_kd's recipe with a median pruner, for the q2 report figures of the manual.

The alpha x T contour of docs/img/report-kd-contour-tiny.png shows pruned trials and the
alpha=0 reference run, so the study it is drawn from must prune (tiny_kd does not: its tests
count trials). The data come from Debian's dataset-fashion-mnist.
"""

import optuna

from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service.space import Float
from kdsweep.service.spec import Preset, StudySpec


def pruner(config: TrainConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)


def sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


STUDY = StudySpec(
    name="tiny_kd_report",
    sampler=sampler,
    description="report figures of the manual: KD between small MLPs, Fashion-MNIST subset, median pruner",
    space=[Float("kd.alpha", 0.0, 1.0), Float("kd.temperature", 1.0, 20.0)],
    pruner=pruner,
    presets={
        "quick": Preset(description="3 epochs of 1k images", config=TrainConfig(
            data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=1000, pad=0, flip=False),
            model=ModelConfig(arch="mlp", hidden=(256,)),
            optim=OptimConfig(lr=0.05, weight_decay=0.0),
            kd=KDConfig(teacher=ModelConfig(arch="mlp", hidden=(64,)), teacher_epochs=1),
            epochs=3,
            batch_size=16,
        )),
    },
)
