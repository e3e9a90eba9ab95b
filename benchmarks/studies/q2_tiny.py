"""A benchmark study: Q2 (its space and pruner) with a preset small enough for a test.

Used by `python -m benchmarks --quick` (teacher_setups) and tests/test_benchmarks.py; the full
benchmark runs the real `q2` study's smoke preset. The `fused_*` presets are q2_fused's
settings (benchmarks/fused.py): the GPU ones train on a random npz given as an override
(`data.dataset`), since throughput does not depend on pixel values.
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
        "fused_cpu": Preset(
            description="q2_fused on a CPU: Fashion-MNIST 300 images at 28 px, 2 epochs of 6 steps",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=200, train_subset=300,
                                channels=3, pad=1),
                model=ModelConfig(arch="resnet18", weights="none", stem="imagenet"),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                kd=KDConfig(teacher=ModelConfig(arch="resnet50", weights="none", stem="imagenet"),
                            teacher_epochs=1, teacher_lr=0.05),
                epochs=2,
                batch_size=50,
            ),
        ),
        "fused_32px": Preset(
            description="q2_fused on a GPU: 32 px, cifar stem, 10k images, 2 epochs",
            config=TrainConfig(
                data=DataConfig(dataset="npz:SET-ME", val_size=1000, train_subset=10_000, pad=2),
                model=ModelConfig(arch="resnet18", weights="none", stem="cifar"),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                kd=KDConfig(teacher=ModelConfig(arch="resnet50", weights="none", stem="cifar"),
                            teacher_epochs=1, teacher_lr=0.05),
                epochs=2,
                batch_size=512,
            ),
        ),
        "fused_224px": Preset(
            description="q2_fused on a GPU: the paper student (32 -> 224 px, ImageNet stem), 5k images",
            config=TrainConfig(
                data=DataConfig(dataset="npz:SET-ME", val_size=500, train_subset=5000, image_size=224, pad=2),
                model=ModelConfig(arch="resnet18", weights="none", stem="imagenet"),
                optim=OptimConfig(lr=0.01, weight_decay=5e-4, warmup=0.05),
                kd=KDConfig(teacher=ModelConfig(arch="resnet50", weights="none", stem="imagenet"),
                            teacher_epochs=1, teacher_lr=0.1),
                epochs=1,
                batch_size=256,
            ),
        ),
    },
)
