"""Q2: Hinton knowledge distillation, ResNet50 teacher -> ResNet18 student; sweep alpha and T.

Loss: (1-alpha)*CE(y, s) + alpha*T^2*KL(softmax(t/T) || softmax(s/T)); alpha weights the
teacher's soft term, as in the assignment. The assignment reported alpha=0.9, T=10 as best;
`kdsweep enqueue q2 --baselines` adds that point (and plain cross-entropy, alpha=0) to a study
as a baseline to compare against, never as an assumed answer.

Input size and stem, per preset (compare results only like with like):
* paper: CIFAR-10 resized 32 -> 224 px per batch on the device, torchvision's ImageNet stem and
  ImageNet weights for both networks; the teacher is a linear probe (only fc trained).
* smoke: Fashion-MNIST at its native 28 px with the ImageNet stem (7x7/2 conv + max-pool: 7x7
  at layer1) and no pretrained weights, which cannot be had offline; the teacher is therefore
  fully fine-tuned rather than probed, for more epochs than a student gets.
"""

import optuna

from kdsweep.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.space import Float
from kdsweep.studies import Preset, Study

SPACE = [
    Float("kd.alpha", 0.0, 1.0),
    Float("kd.temperature", 1.0, 20.0),
]


def pruner(config: TrainConfig) -> optuna.pruners.BasePruner:
    # Hyperband: high-T, high-alpha students learn from soft targets that say little early on,
    # so a single early cut (median) would favour low alpha; brackets give late starters a chance.
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs, reduction_factor=3)


STUDY = Study(
    name="q2",
    description="Knowledge distillation ResNet50 -> ResNet18: alpha and temperature",
    space=SPACE,
    pruner=pruner,
    baselines=[
        {"kd.alpha": 0.9, "kd.temperature": 10.0},  # the assignment's reported best
        {"kd.alpha": 0.0, "kd.temperature": 1.0},  # the student trained alone (plain CE)
    ],
    presets={
        "paper": Preset(
            description="CIFAR-10 at 224 px, ImageNet weights, probed ResNet50 teacher; a GPU",
            config=TrainConfig(
                # pad 2: 50 views per image, so cached teacher logits are reused across trials
                data=DataConfig(dataset="cifar10", val_size=5000, image_size=224, pad=2),
                model=ModelConfig(arch="resnet18", weights="imagenet", stem="imagenet"),
                optim=OptimConfig(lr=0.01, weight_decay=5e-4, warmup=0.05),
                kd=KDConfig(
                    teacher=ModelConfig(arch="resnet50", weights="imagenet", stem="imagenet"),
                    teacher_epochs=5, teacher_lr=0.1,
                ),
                epochs=10,
                batch_size=256,
            ),
            needs_gpu=True,
        ),
        "smoke": Preset(
            description="Fashion-MNIST subset at 28 px, random init, fine-tuned teacher; minutes on CPU",
            config=TrainConfig(
                data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=1000, channels=3, pad=2),
                model=ModelConfig(arch="resnet18", weights="none", stem="imagenet"),
                optim=OptimConfig(lr=0.05, weight_decay=5e-4),
                kd=KDConfig(
                    teacher=ModelConfig(arch="resnet50", weights="none", stem="imagenet"),
                    teacher_epochs=8, teacher_lr=0.05,
                ),
                epochs=3,
                batch_size=100,
            ),
        ),
    },
)
