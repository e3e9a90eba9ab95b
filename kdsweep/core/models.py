"""Q1 models: an MLP and a small CNN built from a `ModelConfig`, plus the helpers a training loop needs.

`build_model(cfg, in_shape, num_classes)` is the only constructor the rest of kdsweep calls. For
`arch` mlp/cnn with `cfg.budget` set and no widths yet, it first asks `kdsweep.core.budget.resolve` for
the widths that match the budget; ResNets are delegated to `kdsweep.core.resnets.build_resnet`.

MLP: flatten -> [Linear -> ReLU -> Dropout(rate)] per hidden width -> Linear(num_classes).

CNN: three stages at full, 1/2 and 1/4 resolution (MaxPool2d(2) between stages, skipped when the
map is already 1 px wide). Stage s holds `depth` conv blocks with `channels[s]` outputs, each
conv -> BatchNorm2d -> ReLU -> regulariser. Global average pooling then feeds ONE small
Linear(channels[-1], num_classes), so the CNN's parameters sit in its convolutions rather than in
a big fully connected layer. `channels` is (c1, c2, c3), or (c1, c2, c3, c_out) when the budget
solver gave the last conv of the last stage its own output width to land on the budget exactly.

With `factorized=True` every 3x3 conv becomes a 3x1 conv -> BN -> ReLU -> 1x3 conv (the same 3x3
receptive field with 3*cin*cout + 3*cout*cout weights instead of 9*cin*cout). The nonlinearity in
between follows Szegedy et al. 2016, who found linear intermediate activations always worse. The
network's very first conv stays 3x3: it sees raw pixels with only 1-3 input channels, so
factorizing it saves almost nothing and the paper reports that factorizing early layers hurts.

DropBlock is torchvision's `DropBlock2d`. It clips the block to the map and then rejects an even
size, so each stage uses `cfg.block_sizes[s]`: the largest odd size <= min(block_size, map side),
computed by `dropblock_sizes` (the budget resolver records them in the config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import DropBlock2d

from kdsweep.core.config import ConfigError, ModelConfig

REGULARIZERS = ("none", "dropout", "spatial_dropout", "dropblock")
NUM_STAGES = 3
DEFAULT_MLP_WIDTH = 256  # hidden width used when there is neither a budget nor `hidden`
_DROPBLOCK_CACHE = "_kdsweep_dropblocks"  # attribute where set_progress caches its module list


def stage_plan(in_shape: Sequence[int]) -> tuple[tuple[bool, int], ...]:
    """Per CNN stage: (max-pool before it?, smaller side of its feature map in pixels).

    A stage halves the map of the previous one unless that map is under 2 px, where a pool
    would produce an empty map.
    """
    side = min(int(in_shape[1]), int(in_shape[2]))
    plan = [(False, side)]
    for _ in range(NUM_STAGES - 1):
        pool = side >= 2
        if pool:
            side //= 2
        plan.append((pool, side))
    return tuple(plan)


def dropblock_sizes(block_size: int, in_shape: Sequence[int]) -> tuple[int, ...]:
    """Block side per stage: the largest odd size <= min(block_size, the stage's map side).

    >>> dropblock_sizes(7, (3, 32, 32)), dropblock_sizes(7, (3, 8, 8))
    ((7, 7, 7), (7, 3, 1))
    """
    sizes = []
    for _, side in stage_plan(in_shape):
        size = max(1, min(block_size, side))
        sizes.append(size if size % 2 else size - 1)
    return tuple(sizes)


class MLP(nn.Module):
    """flatten -> hidden layers (`body`) -> `head`; `param_split` counts `body` as "conv"."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, rate: float = 0.0
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if rate > 0:
                layers.append(nn.Dropout(rate))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _conv_block(
    cin: int, cout: int, factorized: bool, regularizer: nn.Module | None
) -> nn.Sequential:
    # bias=False everywhere: each conv is followed by BatchNorm, whose shift makes a bias redundant.
    if factorized:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, (1, 3), padding=(0, 1), bias=False),
        ]
    else:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if regularizer is not None:
        layers.append(regularizer)
    return nn.Sequential(*layers)


def _regularizer(name: str, rate: float, block_size: int) -> nn.Module | None:
    if name == "none" or rate == 0:
        return None
    if name == "dropout":
        return nn.Dropout(rate)
    if name == "spatial_dropout":
        return nn.Dropout2d(rate)
    if name == "dropblock":
        return DropBlock2d(p=rate, block_size=block_size)
    raise ConfigError(f"unknown model.regularizer {name!r}; choose {', '.join(REGULARIZERS)}.")


class CNN(nn.Module):
    """Three conv stages (`features`), global average pooling and one small linear `head`.

    `channels` is (c1, c2, c3) or (c1, c2, c3, c_out); `block_sizes` is needed for dropblock only.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        channels: Sequence[int],
        num_classes: int,
        *,
        depth: int = 2,
        factorized: bool = False,
        regularizer: str = "none",
        rate: float = 0.0,
        block_sizes: Sequence[int] = (),
    ):
        super().__init__()
        if len(channels) not in (NUM_STAGES, NUM_STAGES + 1):
            raise ConfigError(f"cnn channels must have 3 or 4 entries, got {tuple(channels)}.")
        if regularizer == "dropblock" and len(block_sizes) != NUM_STAGES:
            raise ConfigError(
                f"dropblock needs 3 block sizes (one per stage), got {tuple(block_sizes)}."
            )
        stages: list[nn.Module] = []
        cin = int(in_shape[0])
        first = True
        for s, (pool, _side) in enumerate(stage_plan(in_shape)):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
            for b in range(depth):
                cout = channels[s]
                if s == NUM_STAGES - 1 and b == depth - 1:
                    cout = channels[-1]  # the solver's fine-tuned output width, when there is one
                reg = _regularizer(regularizer, rate, block_sizes[s] if block_sizes else 1)
                layers.append(_conv_block(cin, cout, factorized and not first, reg))
                cin, first = cout, False
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))


def check(cfg: ModelConfig, in_shape: Sequence[int], num_classes: int) -> None:
    """Raise ConfigError for Q1 settings no model can be built from (one sentence each)."""
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ConfigError(
            f"in_shape must be (channels, height, width) of positive sizes, got {tuple(in_shape)}."
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}.")
    if cfg.depth < 1:
        raise ConfigError(f"model.depth must be at least 1, got {cfg.depth}.")
    if cfg.arch == "cnn" and cfg.width < 1:
        raise ConfigError(f"model.width must be at least 1, got {cfg.width}.")
    if cfg.regularizer not in REGULARIZERS:
        raise ConfigError(
            f"unknown model.regularizer {cfg.regularizer!r}; choose {', '.join(REGULARIZERS)}."
        )
    if not 0.0 <= cfg.rate < 1.0:
        raise ConfigError(f"model.rate must be in [0, 1), got {cfg.rate}.")
    if cfg.block_size < 1:
        raise ConfigError(f"model.block_size must be at least 1, got {cfg.block_size}.")


def complete(cfg: ModelConfig, in_shape: Sequence[int], num_classes: int) -> ModelConfig:
    """The config `build_model` actually builds: widths defaulted, block sizes set.

    Given widths are kept as they are, so a stored resolved config rebuilds the same model. A
    budget is solved before a model is built (`kdsweep.core.budget.resolve`, which
    `kdsweep.core.train.resolve` calls): the solver builds models to count them, so this module
    never calls it.
    """
    widths = cfg.hidden if cfg.arch == "mlp" else cfg.channels
    if not widths and cfg.budget is not None:
        raise ConfigError(
            f"model.budget={cfg.budget} is set but its widths are not solved; resolve the config "
            "first (kdsweep.core.budget.resolve or kdsweep.core.train.resolve)."
        )
    if cfg.arch == "mlp":
        if not cfg.hidden:
            cfg = dataclasses.replace(cfg, hidden=(DEFAULT_MLP_WIDTH,) * cfg.depth)
        return cfg
    if not cfg.channels:
        cfg = dataclasses.replace(cfg, channels=(cfg.width, 2 * cfg.width, 4 * cfg.width))
    if cfg.regularizer == "dropblock" and not cfg.block_sizes:
        cfg = dataclasses.replace(cfg, block_sizes=dropblock_sizes(cfg.block_size, in_shape))
    return cfg


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the network `cfg` describes for inputs of shape `in_shape` (C, H, W).

    Builds on the current default device, so `with torch.device("meta"):` gives a free model for
    counting. Raises ConfigError for invalid settings and budget.BudgetError for a budget the
    chosen width cannot meet.
    """
    if cfg.arch in ("resnet18", "resnet50"):
        from kdsweep.core.resnets import (
            build_resnet,  # lazy: Q1 runs never need torchvision's ResNets
        )

        return build_resnet(cfg, num_classes, in_shape[0])
    if cfg.arch not in ("mlp", "cnn"):
        raise ConfigError(
            f"unknown model.arch {cfg.arch!r}; choose mlp, cnn, resnet18 or resnet50."
        )
    check(cfg, in_shape, num_classes)
    cfg = complete(cfg, in_shape, num_classes)
    if cfg.arch == "mlp":
        return MLP(math.prod(in_shape), cfg.hidden, num_classes, cfg.rate)
    return CNN(
        in_shape,
        cfg.channels,
        num_classes,
        depth=cfg.depth,
        factorized=cfg.factorized,
        regularizer=cfg.regularizer,
        rate=cfg.rate,
        block_sizes=cfg.block_sizes,
    )


def set_progress(model: nn.Module, progress: float, cfg: ModelConfig) -> None:
    """Set the DropBlock rate for training progress in [0, 1]; call it every step.

    With dropblock and `ramp=True` each DropBlock2d gets p = rate * progress (Ghiasi et al. ramp
    the rate linearly from 0; a fixed rate "does not work well"); otherwise p = rate. A no-op for
    models without DropBlock2d. The module list is found once and cached on the model.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}.")
    blocks = model.__dict__.get(_DROPBLOCK_CACHE)
    if blocks is None:
        blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
        # a plain list in __dict__: not a registered submodule, so state_dict is unaffected
        model.__dict__[_DROPBLOCK_CACHE] = blocks
    p = cfg.rate * progress if cfg.ramp else cfg.rate
    for block in blocks:
        block.p = p


def param_split(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: {"conv": body, "head": final classifier, "total": both}.

    The head is `model.head` when the model has one (MLP, CNN), else its last nn.Linear
    (torchvision ResNets' `fc`); "conv" is everything else (convs and BN, or the MLP's hidden
    layers).
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_head = 0 if head is None else sum(p.numel() for p in head.parameters() if p.requires_grad)
    return {"conv": total - n_head, "head": n_head, "total": total}
