"""Q1: an MLP and a CNN at the same trainable-parameter count, and what regularises the CNN.

Sampled: the family, the CNN's first-stage width, factorized kernels, the regulariser after
conv layers with its rate and (for DropBlock) its block size, the learning rate. Computed, not
sampled: the free width of each model so it meets the preset's parameter budget (see
kdsweep/budget.py); widths that cannot meet a preset's budget are left out of its space.
"""

import optuna

from kdsweep.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.space import Categorical, Float
from kdsweep.studies import Preset, Study

CNN = {"model.family": ["cnn"]}
REGULARISED = {"reg.kind": ["dropout", "spatial_dropout", "dropblock"]}

SPACE = [
    Categorical("model.family", ["mlp", "cnn"], target="model.arch"),
    Float("optim.lr", 0.01, 0.4, log=True),
    Float("mlp.dropout", 0.0, 0.5, target="model.rate", when={"model.family": ["mlp"]}),
    Categorical("cnn.width", [16, 32, 48, 64], target="model.width", when=CNN),
    Categorical("cnn.factorized", [False, True], target="model.factorized", when=CNN),
    Categorical("reg.kind", ["none", "dropout", "spatial_dropout", "dropblock"],
                target="model.regularizer", when=CNN),
    Float("reg.rate", 0.05, 0.5, target="model.rate", when={**CNN, **REGULARISED}),
    Categorical("dropblock.size", [3, 5, 7], target="model.block_size",
                when={**CNN, "reg.kind": ["dropblock"]}),
]


def pruner(config: TrainConfig) -> optuna.pruners.BasePruner:
    # Hyperband, not median: DropBlock's ramp and strong dropout start slow and overtake later,
    # and median pruning (one bracket, one early rung) kills them. Hyperband's brackets give
    # some trials a late first rung; in our Fashion-MNIST measurement it kept the best trial
    # while median and successive halving lost it.
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs, reduction_factor=3)


STUDY = Study(
    name="q1",
    description="MLP vs CNN at a matched parameter budget; dropout, spatial dropout, DropBlock, factorized kernels",
    space=SPACE,
    pruner=pruner,
    presets={
        "paper": Preset(
            description="CIFAR-10, 1M parameters, 30 epochs; a GPU",
            config=TrainConfig(
                data=DataConfig(dataset="cifar10", val_size=5000),
                model=ModelConfig(arch="cnn", budget=1_000_000, depth=2),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                epochs=30,
                batch_size=512,
            ),
            needs_gpu=True,
        ),
        "smoke": Preset(
            description="Fashion-MNIST subset, 30k parameters, 4 epochs; minutes on 2 CPU cores",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=1000, train_subset=3000, pad=2),
                model=ModelConfig(arch="cnn", budget=30_000, depth=2),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                epochs=4,
                batch_size=128,
            ),
            space={"cnn.width": {"choices": [8, 12, 16]}},
        ),
    },
)
