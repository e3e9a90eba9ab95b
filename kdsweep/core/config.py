"""Frozen configuration dataclasses: everything one training run needs, resolved.

A `TrainConfig` is the whole contract between a study and the training core: a trial stores
`to_dict(config)` as JSON in its user attributes, `kdsweep best` exports it, and
`from_dict` turns it back into a config that `kdsweep train --config` runs unchanged.
Units are given in the comments; "images" always means training images seen.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one sentence a user can act on."""


@dataclass(frozen=True)
class DataConfig:
    # cifar10 | cifar100 | fashion-mnist | npz:PATH | folder:PATH (class sub-folders of images)
    dataset: str = "cifar10"
    root: str | None = None  # data directory; None: $KDSWEEP_DATA, then ~/.cache/kdsweep/data
    download: bool = False  # let torchvision download the dataset when it is missing
    val_size: int = 5000  # images carved from the training set for validation (pruning, selection)
    split_seed: int = 0  # seed of the train/validation split; fixed for a whole study
    train_subset: int | None = None  # keep this many training images (after the split); None: all
    test_subset: int | None = None  # keep this many test images; None: all
    image_size: int | None = None  # square side the network sees, resized per batch; None: native
    channels: int | None = None  # 3 turns grayscale into RGB for ResNets; None: native
    # Augmentation; None: the dataset's default (`kdsweep.core.data.default_augmentation`: CIFAR
    # and Fashion-MNIST pad 4 with flips, npz:/folder: data no flips and pad <= side/16).
    pad: int | None = None  # random-crop padding in pixels (integer shifts in [-pad, pad]); 0: none
    flip: bool | None = None  # random horizontal flips
    # Input normalisation: dataset (per-channel mean/std of the whole training split, before
    # train_subset, so every subset and the teacher share it) | imagenet (the ImageNet weights'
    # own mean/std, from torchvision's weights metadata) | auto (imagenet when model.weights is
    # imagenet, else dataset). `mean`/`std` (per network input channel, [0, 1] pixel scale)
    # are filled in when a config is resolved; given, they are used as they are.
    normalize: str = "auto"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn"  # mlp | cnn | resnet18 | resnet50
    # -- Q1 (mlp, cnn) --
    budget: int | None = None  # trainable parameters to match; resolves `hidden` / `channels`
    depth: int = 2  # mlp: hidden layers; cnn: conv blocks per stage (3 stages)
    width: int = 32  # cnn: channels of the first stage (sampled); the last stage is solved
    factorized: bool = False  # cnn: 3x1 then 1x3 convolutions instead of 3x3
    regularizer: str = "none"  # after conv layers: none | dropout | spatial_dropout | dropblock
    rate: float = 0.0  # drop probability of the regulariser (cnn) or hidden dropout (mlp)
    block_size: int = 5  # dropblock: requested block side in pixels; adapted per stage
    ramp: bool = True  # dropblock: ramp the rate linearly from 0 over training (Ghiasi et al.)
    hidden: tuple[int, ...] = ()  # mlp hidden widths; filled by the budget solver
    channels: tuple[int, ...] = ()  # cnn stage channels; filled by the budget solver
    block_sizes: tuple[int, ...] = ()  # dropblock block side used per stage; filled by the solver
    # -- Q2 (resnet18, resnet50) --
    weights: str = "none"  # none | imagenet | PATH to a state_dict file
    stem: str = "imagenet"  # imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no max-pool
    trainable: str = "all"  # all | head (linear probe: only the classifier is trained)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.05  # peak learning rate (SGD, per batch of `batch_size`)
    momentum: float = 0.9  # SGD Nesterov momentum
    weight_decay: float = 5e-4  # L2, applied to weights only (not biases or norms)
    label_smoothing: float = 0.0
    warmup: float = 0.1  # fraction of training spent ramping the learning rate up linearly
    schedule: str = "cosine"  # cosine | linear | constant, after the warm-up


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation: L = (1-alpha)*CE(y, s) + alpha*T^2*KL(softmax(t/T) || softmax(s/T))."""

    alpha: float = 0.0  # weight of the soft (teacher) term; 0 is plain cross-entropy
    temperature: float = 4.0  # T, softens both distributions
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet50"))
    teacher_epochs: int = 5  # epochs of the teacher's probe (or fine-tune when weights="none")
    teacher_lr: float = 0.05
    teacher_batch_size: int | None = None  # images per teacher step; None: the student's batch_size
    teacher_image_size: int | None = None  # None: same as the student's data.image_size
    # Training images the teacher learns from, the first of the same training split (the
    # student's subset is their first part; never the validation split). None: the student's.
    teacher_train_subset: int | None = None
    cache_logits: bool = True  # cache teacher logits per (image, augmentation view)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig | None = None  # None: no teacher
    epochs: int = 10
    batch_size: int = 256  # images per step
    eval_batch_size: int = 1024
    seed: int = 0  # model init, batch order, augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads of this process; None: torch's default
    compile: bool = False  # torch.compile the model (CUDA only; reused while shapes agree)
    evaluate_test: bool = False  # also report test accuracy at the end (exported configs only)
    cache_dir: str | None = None  # teacher probes and logit caches; None: $KDSWEEP_CACHE or ~/.cache


# Lowest allowed value of numeric settings (inclusive unless marked), beyond their type;
# an `upper` bound is exclusive. Settings not listed take any finite value of their type.
_RANGES: dict[str, tuple[float, float | None, bool]] = {  # key: (lower, upper, lower inclusive)
    "optim.lr": (0.0, None, False),
    "optim.momentum": (0.0, 1.0, True),
    "optim.weight_decay": (0.0, None, True),
    "optim.label_smoothing": (0.0, 1.0, True),
    "optim.warmup": (0.0, 1.0 + 1e-12, True),
    "kd.teacher_lr": (0.0, None, False),
    "kd.teacher_epochs": (0, None, True),
    "data.train_subset": (1, None, True),
    "data.test_subset": (1, None, True),
    "data.image_size": (1, None, True),
    "data.pad": (0, None, True),
    "model.budget": (1, None, True),
    "model.depth": (1, None, True),
    "model.width": (1, None, True),
    "model.block_size": (1, None, True),
    "eval_batch_size": (1, None, True),
    "threads": (1, None, True),
}


def _check_numbers(config: Any, where: str = "") -> None:
    """Every int setting holds a whole number and every float one a finite number, in range.

    `--set epochs=2.5`, `--set optim.lr=1e400` (inf) or `nan` would otherwise be stored in a
    study and fail every trial (or make two workers disagree about its definition).
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = where + f.name
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # other types are from_dict's and the CLI's to check
        hint = hints[f.name]
        kinds = set(typing.get_args(hint)) or {hint}
        if int in kinds and float not in kinds and not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number, got {value!r}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}.")
        if key in _RANGES:
            low, high, inclusive = _RANGES[key]
            if value < low or (value == low and not inclusive) or (high is not None and value >= high):
                bound = f"{'at least' if inclusive else 'above'} {low}"
                raise ConfigError(f"{key} must be {bound}{f' and below {high:g}' if high else ''}, got {value!r}.")


def validate(config: TrainConfig) -> TrainConfig:
    """Raise ConfigError for values no run could use; return the config unchanged."""
    _check_numbers(config)
    if config.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {config.epochs}.")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {config.batch_size}.")
    if config.data.val_size < 1:
        raise ConfigError(f"data.val_size must be at least 1, got {config.data.val_size}.")
    d = config.data
    if d.normalize not in ("auto", "dataset", "imagenet"):
        raise ConfigError(f"unknown data.normalize {d.normalize!r}; choose auto, dataset or imagenet.")
    if len(d.mean) != len(d.std) or any(s <= 0 for s in d.std):
        raise ConfigError("data.mean and data.std need one value each per channel, std positive.")
    if d.pad is not None and d.pad < 0:
        raise ConfigError(f"data.pad must be 0 or more pixels, got {d.pad}.")
    if config.model.arch not in ("mlp", "cnn", "resnet18", "resnet50"):
        raise ConfigError(
            f"unknown model.arch {config.model.arch!r}; choose mlp, cnn, resnet18 or resnet50."
        )
    if not 0.0 <= config.model.rate < 1.0:
        raise ConfigError(f"model.rate must be in [0, 1), got {config.model.rate}.")
    if config.kd is not None:
        if not 0.0 <= config.kd.alpha <= 1.0:
            raise ConfigError(f"kd.alpha must be in [0, 1], got {config.kd.alpha}.")
        if config.kd.temperature <= 0:
            raise ConfigError(f"kd.temperature must be positive, got {config.kd.temperature}.")
        if config.kd.teacher_epochs < 1:
            raise ConfigError(f"kd.teacher_epochs must be at least 1, got {config.kd.teacher_epochs}.")
        for key in ("teacher_train_subset", "teacher_image_size", "teacher_batch_size"):
            value = getattr(config.kd, key)
            if value is not None and value < 1:
                raise ConfigError(f"kd.{key} must be at least 1 or none, got {value}.")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Rebuild a config dataclass from `to_dict` output (or a user's partial YAML/JSON).

    Missing keys take their defaults; an unknown key raises ConfigError naming the valid ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {where + unknown[0]!r} in {cls.__name__}; valid keys: {', '.join(sorted(names))}."
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}.") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ModelConfig fields each architecture reads; the others mean nothing for it.
_USED = {
    "mlp": {"arch", "budget", "depth", "rate", "hidden"},
    "cnn": {"arch", "budget", "depth", "width", "factorized", "regularizer", "rate", "block_size",
            "ramp", "channels", "block_sizes"},
    "resnet18": {"arch", "weights", "stem", "trainable"},
    "resnet50": {"arch", "weights", "stem", "trainable"},
}


def compact(config: dict[str, Any]) -> dict[str, Any]:
    """`to_dict` output without the model fields its architecture never reads (a ResNet's
    width, block_size, hidden, ...), for exports a person reads.

    A field is left out only while it holds its default, so `from_dict` rebuilds exactly the
    same config: `from_dict(TrainConfig, compact(to_dict(c))) == c`.
    """
    defaults = to_dict(ModelConfig())

    def model(m: dict[str, Any]) -> dict[str, Any]:
        used = _USED.get(m.get("arch", ""), set(m))
        return {k: v for k, v in m.items()
                if k in used or _jsonish(v) != _jsonish(defaults.get(k, object()))}

    out = dict(config)
    if isinstance(out.get("model"), dict):
        out["model"] = model(out["model"])
    if isinstance(out.get("kd"), dict) and isinstance(out["kd"].get("teacher"), dict):
        out["kd"] = {**out["kd"], "teacher": model(out["kd"]["teacher"])}
    return out


def _jsonish(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace that also takes dotted paths: replace(cfg, **{"kd.alpha": 0.5})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        current = getattr(config, head)
        if current is None:
            hint = typing.get_type_hints(type(config))[head]
            current = next(a for a in typing.get_args(hint) if a is not type(None))()
        flat[head] = replace(current, **sub)
    names = {f.name for f in dataclasses.fields(config)}
    for key in flat:
        if key not in names:
            raise ConfigError(
                f"unknown setting {key!r} in {type(config).__name__}; valid: {', '.join(sorted(names))}."
            )
    return dataclasses.replace(config, **flat)


def read_config(path: str | Path) -> TrainConfig:
    """The TrainConfig in a YAML or JSON file: an export of `kdsweep best` (its `config`) or a
    bare config. ConfigError (one sentence) for a file that is not one."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML or JSON: {str(exc).splitlines()[0]}.") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping (a config or an export of `kdsweep best`).")
    return from_dict(TrainConfig, doc.get("config", None) or doc)
