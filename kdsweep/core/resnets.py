"""torchvision ResNet-18/50 for Q2: teacher (linear probe) and student, with a choice of stem.

`build_resnet(cfg, num_classes)` turns a `ModelConfig` (arch resnet18 | resnet50) into a
network whose parameter names are torchvision's (`conv1.weight`, ..., `fc.weight`) in every
mode, so a state_dict saved from any of them loads into any other with `weights=PATH`.

Stems (`cfg.stem`):

- ``imagenet``: torchvision's 7x7 stride-2 conv and 3x3 stride-2 max-pool; a 32 px image is
  8x8 at layer1 and 1x1 at layer4. The only stem that reuses a pretrained conv1.
- ``cifar``: a 3x3 stride-1 conv and no max-pool, so a 32 px image stays 32x32 into layer1
  (the usual CIFAR ResNet). conv1 is always freshly initialised: a pretrained 7x7 kernel
  cannot be reused as a 3x3 one.

Random initialisation (`weights="none"`) starts every residual branch at zero: the last
BatchNorm of each block gets a zero scale (torchvision's `zero_init_residual`, Goyal et al.
2017), so each block starts as the identity. From scratch on a few hundred images this is what
keeps the first epochs from blowing up (measured on 500 Fashion-MNIST images at 28 px: ResNet18
epoch-1 loss 2.4 instead of 4.0, 55% instead of 47% after 3 epochs); pretrained and local
weights overwrite those scales anyway.

Every convolution is a `shortcuts.LiveTapConv2d` and every BatchNorm a
`shortcuts.SmallMapBatchNorm2d`: on small images they skip the kernel taps that only ever meet
zero padding, run convolutions with a one-pixel output as matrix products (layer4 at 28 px) and
normalise 2x2 maps as matrices (layer3); the same parameters, buffers and names, the same
function up to float rounding.

`trainable="head"` is the teacher's linear probe: the backbone is frozen, runs without
autograd and stays in eval mode (BatchNorm statistics never move) even under `.train()`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from kdsweep.core import shortcuts

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000

# arch -> (block, blocks per stage, ImageNet weights); mirrors torchvision.models.resnet18/50.
_ARCHS: dict[str, tuple[type[nn.Module], list[int], Any]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (Bottleneck, [3, 4, 6, 3], ResNet50_Weights.IMAGENET1K_V2),
}
_STEMS = ("imagenet", "cifar")
_TRAINABLE = ("all", "head")
# Wrappers whose prefixes appear in saved state_dicts: torch.compile and (Distributed)DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class ModelError(Exception):
    """A model cannot be built as configured; the message is one sentence saying what to do."""


class FrozenBackboneResNet(ResNet):
    """A ResNet whose backbone is a fixed feature extractor: only `fc` is trained.

    Contract: backbone parameters have `requires_grad=False`; every child but `fc` stays in
    eval mode whatever `.train(mode)` is called with, so BatchNorm uses and keeps its running
    statistics; the backbone's forward runs under `torch.no_grad()` (no activations kept for
    backward, which makes the probe cheap). Parameter names are those of a plain ResNet.
    """

    def freeze_backbone(self) -> FrozenBackboneResNet:
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("fc."))
        return self.train(self.training)

    def train(self, mode: bool = True) -> FrozenBackboneResNet:
        super().train(mode)
        for child in self.children():
            if child is not self.fc:
                child.train(False)
        return self

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_resnet(cfg: Any, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build `cfg.arch` (resnet18 | resnet50) for `num_classes` classes on CPU.

    Uses `cfg.weights` (``none``: random init; ``imagenet``: torchvision's
    ResNet18_Weights.IMAGENET1K_V1 / ResNet50_Weights.IMAGENET1K_V2 from the torch hub cache,
    downloaded if missing and possible; anything else: the path of a saved state_dict),
    `cfg.stem` (see the module docstring; with ``cifar`` conv1 is re-initialised even when
    weights are loaded) and `cfg.trainable` (``all`` | ``head``, see `FrozenBackboneResNet`).

    The classifier is always `nn.Linear(in_features, num_classes)`, freshly initialised unless
    a local state_dict has an fc of exactly that shape. A state_dict with a 1000-class fc is
    taken as ImageNet-shaped and loaded without its fc. With `in_channels != 3` conv1 takes
    that many channels; a pretrained 7x7 kernel is then summed over RGB and spread evenly over
    the new channels (a grey image repeated on every channel gives the RGB response).
    Raises ModelError for unknown settings, unavailable weights or a state_dict that does not fit.
    """
    if cfg.arch not in _ARCHS:
        raise ModelError(f"build_resnet builds resnet18 or resnet50, got arch {cfg.arch!r}; set model.arch to one of them.")
    if cfg.stem not in _STEMS:
        raise ModelError(f"unknown model.stem {cfg.stem!r}; use imagenet or cifar.")
    if cfg.trainable not in _TRAINABLE:
        raise ModelError(f"unknown model.trainable {cfg.trainable!r}; use all or head.")
    if num_classes < 1 or in_channels < 1:
        raise ModelError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}.")
    block, layers, imagenet_weights = _ARCHS[cfg.arch]

    # Read the weights before building: a missing file should fail fast, before the slow init.
    state = None
    if cfg.weights == "imagenet":
        state = _imagenet_state_dict(cfg.arch, imagenet_weights)
    elif cfg.weights != "none":
        state = _local_state_dict(Path(cfg.weights))

    cls = FrozenBackboneResNet if cfg.trainable == "head" else ResNet
    model = cls(block, layers, num_classes=num_classes, zero_init_residual=cfg.weights == "none")
    if cfg.stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # Same init torchvision gives every conv of a ResNet.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")

    if state is not None:
        _load_into(model, state, cfg)
    shortcuts.use_shortcuts(model)  # small images: layer3 and layer4 run on 2x2 and 1x1 maps
    if isinstance(model, FrozenBackboneResNet):
        model.freeze_backbone()
        if cfg.stem == "cifar":
            log.warning(
                "%s: trainable=head with the cifar stem freezes a randomly initialised conv1; "
                "use stem=imagenet to probe pretrained features.",
                cfg.arch,
            )
    return model


def imagenet_normalization(arch: str = "resnet50") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel on the [0, 1] scale that `arch`'s ImageNet weights expect.

    Read from torchvision's weights (`Weights.transforms()`, the preprocessing the weights were
    trained with), not restated here; any other arch gets ResNet-50's (all of torchvision's
    ImageNet classification weights share one normalisation).
    """
    weights = _ARCHS.get(arch, _ARCHS["resnet50"])[2]
    preprocess = weights.transforms()
    return tuple(float(v) for v in preprocess.mean), tuple(float(v) for v in preprocess.std)


def imagenet_weights_file(arch: str) -> Path:
    """Where torch.hub keeps `arch`'s ImageNet weights (TORCH_HOME/hub/checkpoints/<file>)."""
    weights = _ARCHS[arch][2]
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def check_weights(cfg: Any) -> None:
    """Raise ModelError now for weights a build would not find (downloads missing ImageNet ones)."""
    if cfg.weights == "imagenet" and cfg.arch in _ARCHS:
        if not imagenet_weights_file(cfg.arch).is_file():  # fetch it now, or say why it cannot be
            _imagenet_state_dict(cfg.arch, _ARCHS[cfg.arch][2])
    elif cfg.weights not in ("none", "imagenet") and not Path(cfg.weights).is_file():
        raise ModelError(
            f"weights file {cfg.weights} does not exist; pass weights=none, weights=imagenet or "
            "the path of a saved state_dict."
        )


def layer_sizes(stem: str, image_size: int) -> tuple[int, int]:
    """Spatial side of the feature map at layer1 and at layer4 for a square input."""
    if stem not in _STEMS:
        raise ModelError(f"unknown model.stem {stem!r}; use imagenet or cifar.")
    side = image_size
    if stem == "imagenet":
        side = (side - 1) // 2 + 1  # 7x7 conv, stride 2, padding 3
        side = (side - 1) // 2 + 1  # 3x3 max-pool, stride 2, padding 1
    layer1 = side
    for _ in range(3):  # layer2..4 each open with a stride-2 3x3 (or 1x1) conv
        side = (side - 1) // 2 + 1
    return layer1, side


def describe_stem(cfg: Any, image_size: int) -> str:
    """One line for presets and logs, e.g. "resnet18, imagenet stem: 32 px input is 8x8 at layer1, 1x1 at layer4"."""
    layer1, layer4 = layer_sizes(cfg.stem, image_size)
    return (
        f"{cfg.arch}, {cfg.stem} stem: {image_size} px input is {layer1}x{layer1} at layer1, "
        f"{layer4}x{layer4} at layer4"
    )


def _imagenet_state_dict(arch: str, weights: Any) -> dict[str, torch.Tensor]:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    cached = (checkpoints / filename).exists()
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # URLError, socket/SSL errors, hash mismatch, unreadable file
        if cached:
            raise ModelError(
                f"The cached ImageNet weights {checkpoints / filename} cannot be read ({exc}); "
                "delete the file so it is fetched again, pass weights=PATH, or use weights=none."
            ) from exc
        raise ModelError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({checkpoints}) and "
            f"cannot be downloaded here; copy {filename} there, pass a local state_dict as "
            "weights=PATH, or use weights=none."
        ) from exc


def _local_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(
            f"weights file {path} does not exist; pass weights=none, weights=imagenet or the path of a saved state_dict."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules, truncated files, non-torch files
        raise ModelError(
            f"{path} is not a loadable state_dict ({type(exc).__name__}); save one with "
            "torch.save(model.state_dict(), path)."
        ) from exc
    # Accept checkpoints that carry a state_dict next to their config.
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"{path} does not hold a state_dict of tensors; save one with torch.save(model.state_dict(), path)."
        )
    state = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _load_into(model: ResNet, state: dict[str, torch.Tensor], cfg: Any) -> None:
    """Load `state` into `model`, adapting the parts a different head, stem or channel count changes."""
    where = "ImageNet weights" if cfg.weights == "imagenet" else f"weights {cfg.weights}"
    own = model.state_dict()
    state = dict(state)
    dropped: set[str] = set()  # keys deliberately left at their fresh initialisation

    fc = state.get("fc.weight")
    if fc is not None and fc.shape != own["fc.weight"].shape:
        if fc.shape[0] != IMAGENET_CLASSES:
            raise ModelError(
                f"{where} have a {fc.shape[0]}-class fc but the model needs {own['fc.weight'].shape[0]} "
                "classes; drop fc.* from the state_dict or save it from a model with as many classes."
            )
        state.pop("fc.weight")
        state.pop("fc.bias", None)  # the head is re-initialised for this task
        dropped |= {"fc.weight", "fc.bias"}

    conv1 = state.get("conv1.weight")
    want = own["conv1.weight"].shape
    if conv1 is not None and conv1.shape != want:
        if conv1.shape[-2:] == (7, 7) and cfg.stem == "cifar":
            state.pop("conv1.weight")  # a 7x7 kernel does not fit the 3x3 CIFAR stem
            dropped.add("conv1.weight")
        elif conv1.shape[-2:] == want[-2:] and conv1.shape[0] == want[0]:
            # Other channel count: sum over the old channels, spread evenly over the new ones.
            state["conv1.weight"] = conv1.sum(1, keepdim=True).expand(want).contiguous() / want[1]
        else:
            raise ModelError(
                f"{where} have a conv1 of shape {tuple(conv1.shape)} but the {cfg.stem} stem needs "
                f"{tuple(want)}; build with the stem the weights were saved with."
            )

    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same key, other shape: weights of another architecture
        raise ModelError(
            f"{where} do not fit {cfg.arch} ({str(exc).splitlines()[-1].strip()}); pass a state_dict "
            f"saved from a torchvision {cfg.arch}."
        ) from exc
    missing = [k for k in result.missing_keys if k not in dropped]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        kind = "lack" if missing else "have an unexpected"
        raise ModelError(
            f"{where} {kind} key {bad!r} for {cfg.arch}; pass a state_dict saved from a torchvision {cfg.arch}."
        )
