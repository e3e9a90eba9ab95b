"""A benchmark study: Q2 (its space and pruner) with a preset small enough for a test.

Used by `python -m benchmarks --quick` (teacher_setups) and tests/test_benchmarks.py; the full
benchmark runs the real `q2` study's smoke preset.
"""

import dataclasses

from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service import spec as studies
from kdsweep.service.spec import Preset

STUDY = dataclasses.replace(
    studies.load("q2"),
    name="q2_tiny",
    description="benchmark: Q2 with a tiny preset (plumbing checks, seconds on a CPU)",
    presets={
        "tiny": Preset(
            description="Fashion-MNIST 200 images at 28 px, ResNet18 student, ResNet50 teacher",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=200, train_subset=200,
                                channels=3, pad=1),
                model=ModelConfig(arch="resnet18", weights="none", stem="imagenet"),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                kd=KDConfig(teacher=ModelConfig(arch="resnet50", weights="none", stem="imagenet"),
                            teacher_epochs=1, teacher_lr=0.05),
                epochs=1,
                batch_size=100,
            ),
        ),
    },
)
