"""Frozen configuration dataclasses: everything one training run needs, resolved.

A `TrainConfig` is the whole contract between a study and the training core: a trial stores
`to_dict(config)` as JSON in its user attributes, `kdsweep best` exports it, and
`from_dict` turns it back into a config that `kdsweep train --config` runs unchanged.
Every setting carries its meaning and unit in its field metadata (`doc`, `unit`; read them
with `describe`); "images" always means training images seen.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one sentence a user can act on."""


_NO_DEFAULT: Any = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, *, doc: str, unit: str = "",
            factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its meaning (`doc`) and unit (`unit`) in its metadata."""
    meta = {"doc": doc, "unit": unit}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """The data: which dataset, how it is split, augmented and normalised."""

    dataset: str = setting("cifar10", doc="cifar10 | cifar100 | fashion-mnist | npz:PATH (arrays x, y) "
                           "| folder:PATH (one sub-folder of images per class)")
    root: str | None = setting(None, unit="path", doc="the data folder; None: $KDSWEEP_DATA, then "
                               "~/.cache/kdsweep/data (Fashion-MNIST: also Debian's read-only copy)")
    download: bool = setting(False, doc="let torchvision download the dataset when it is missing")
    val_size: int = setting(5000, unit="images", doc="carved from the training set for validation "
                            "(pruning, selection)")
    split_seed: int = setting(0, unit="seed", doc="of the train/validation split; fixed for a whole study")
    train_subset: int | None = setting(None, unit="images", doc="training images kept after the "
                                       "split; None: all")
    test_subset: int | None = setting(None, unit="images", doc="test images kept; None: all")
    image_size: int | None = setting(None, unit="pixels", doc="square side the network sees, resized "
                                     "per batch; None: native")
    channels: int | None = setting(None, unit="channels", doc="3 turns grayscale into RGB for "
                                   "ResNets; None: native")
    pad: int | None = setting(None, unit="pixels", doc="random-crop padding: integer shifts in "
                              "[-pad, pad]; 0: none; None: the dataset's default (CIFAR and "
                              "Fashion-MNIST 4; npz:/folder: data at most side/16)")
    flip: bool | None = setting(None, doc="random horizontal flips; None: the dataset's default "
                                "(CIFAR and Fashion-MNIST yes; npz:/folder: data no)")
    normalize: str = setting("auto", doc="dataset (per-channel mean/std of the whole training split, "
                             "before train_subset) | imagenet (the ImageNet weights' own mean/std) "
                             "| auto (imagenet when model.weights is imagenet, else dataset)")
    mean: tuple[float, ...] = setting((), unit="per input channel, [0, 1] pixel scale",
                                      doc="filled in when a config is resolved; given, used as it is")
    std: tuple[float, ...] = setting((), unit="per input channel, [0, 1] pixel scale",
                                     doc="filled in when a config is resolved; given, used as it is")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a Q1 MLP or CNN at a parameter budget, or a Q2 ResNet."""

    arch: str = setting("cnn", doc="mlp | cnn | resnet18 | resnet50")
    budget: int | None = setting(None, unit="trainable parameters", doc="mlp, cnn: the budget to "
                                 "match; resolves `hidden` / `channels`")
    depth: int = setting(2, unit="layers", doc="mlp: hidden layers; cnn: conv blocks per stage "
                         "(3 stages)")
    width: int = setting(32, unit="channels", doc="cnn: of the first stage (sampled); the last "
                         "stage is solved")
    factorized: bool = setting(False, doc="cnn: 3x1 then 1x3 convolutions instead of 3x3")
    regularizer: str = setting("none", doc="cnn, after conv layers: none | dropout | "
                               "spatial_dropout | dropblock")
    rate: float = setting(0.0, unit="probability", doc="drop rate of the regulariser (cnn) or "
                          "hidden dropout (mlp)")
    block_size: int = setting(5, unit="pixels", doc="dropblock: requested block side; adapted "
                              "per stage")
    ramp: bool = setting(True, doc="dropblock: ramp the rate linearly from 0 over training "
                         "(Ghiasi et al.)")
    hidden: tuple[int, ...] = setting((), unit="units per layer", doc="mlp hidden widths; filled "
                                      "by the budget solver")
    channels: tuple[int, ...] = setting((), unit="channels per stage", doc="cnn stage widths; "
                                        "filled by the budget solver")
    block_sizes: tuple[int, ...] = setting((), unit="pixels per stage", doc="dropblock block side "
                                           "used per stage; filled by the solver")
    weights: str = setting("none", doc="resnet: none | imagenet | PATH to a state_dict file")
    stem: str = setting("imagenet", doc="resnet: imagenet (7x7/2 conv + max-pool) | cifar (3x3/1 "
                        "conv, no max-pool)")
    trainable: str = setting("all", doc="resnet: all | head (linear probe: only the classifier "
                             "is trained)")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with Nesterov momentum, a linear warm-up, then the schedule."""

    lr: float = setting(0.05, unit="per step of batch_size images", doc="peak learning rate")
    momentum: float = setting(0.9, unit="fraction", doc="Nesterov momentum")
    weight_decay: float = setting(5e-4, unit="L2 coefficient", doc="applied to weights only "
                                  "(not biases or norms)")
    label_smoothing: float = setting(0.0, unit="probability mass", doc="of the cross-entropy "
                                     "(hard) term")
    warmup: float = setting(0.1, unit="fraction of training", doc="the learning rate ramps up "
                            "linearly")
    schedule: str = setting("cosine", doc="cosine | linear | constant, after the warm-up")


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation: L = (1-alpha)*CE(y, s) + alpha*T^2*KL(softmax(t/T) || softmax(s/T))."""

    alpha: float = setting(0.0, unit="weight in [0, 1]", doc="of the soft (teacher) term; 0 is "
                           "plain cross-entropy")
    temperature: float = setting(4.0, unit="T", doc="softens both distributions")
    teacher: ModelConfig = setting(factory=lambda: ModelConfig(arch="resnet50"), doc="the teacher's "
                                   "network (model keys)")
    teacher_epochs: int = setting(5, unit="epochs", doc="of the teacher's probe (or fine-tune when "
                                  "its weights are none)")
    teacher_lr: float = setting(0.05, unit="per step", doc="the teacher's peak learning rate")
    teacher_batch_size: int | None = setting(None, unit="images per step", doc="None: the "
                                             "student's batch_size")
    teacher_image_size: int | None = setting(None, unit="pixels", doc="None: the student's "
                                             "data.image_size")
    teacher_train_subset: int | None = setting(None, unit="images", doc="the teacher learns from "
                                               "the first of the same training split (never "
                                               "validation); None: the student's")
    cache_logits: bool = setting(True, doc="cache teacher logits per (image, augmentation view)")


@dataclass(frozen=True)
class TrainConfig:
    """One training run, whole: a trial stores it and `kdsweep train --config` runs it."""

    data: DataConfig = setting(factory=DataConfig, doc="data keys")
    model: ModelConfig = setting(factory=ModelConfig, doc="model keys")
    optim: OptimConfig = setting(factory=OptimConfig, doc="optim keys")
    kd: KDConfig | None = setting(None, doc="kd keys; None: no teacher, plain cross-entropy")
    epochs: int = setting(10, unit="epochs", doc="passes over the training images")
    batch_size: int = setting(256, unit="images per step", doc="training batch")
    eval_batch_size: int | None = setting(None, unit="images per forward", doc="evaluation batch; "
                                          "None: 256 on the CPU (its activations stay in cache), "
                                          "1024 on CUDA")
    seed: int = setting(0, unit="seed", doc="model init, batch order, augmentation")
    device: str = setting("auto", doc="auto | cpu | cuda | cuda:N")
    threads: int | None = setting(None, unit="CPU threads", doc="of this process; None: torch's "
                                  "default")
    compile: bool = setting(False, doc="torch.compile the model (CUDA only; reused while shapes "
                            "agree)")
    precision: str = setting("auto", doc="auto | fp32 | bf16: bf16 autocast in training (the "
                             "teacher's too); auto: bf16 on CUDA, fp32 on the CPU "
                             "($KDSWEEP_PRECISION overrides auto); scoring on the CPU is fp32")
    evaluate_test: bool = setting(False, doc="also report test accuracy at the end (exported "
                                  "configs and verification runs)")
    cache_dir: str | None = setting(None, unit="path", doc="teacher probes and logit caches; "
                                    "None: $KDSWEEP_CACHE or ~/.cache/kdsweep")


def describe(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str, str]]:
    """Every setting as (dotted key, type, default, unit, meaning), nested configs flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        sub = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if sub is not None and key != "kd.teacher":
            yield from describe(sub, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        else:
            made = f.default_factory()  # type: ignore[misc]
            default = f"{type(made).__name__}(arch={made.arch!r})" if hasattr(made, "arch") else repr(made)
        name = hint.__name__ if isinstance(hint, type) else str(hint)
        yield key, name, default, f.metadata.get("unit", ""), f.metadata.get("doc", "")


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
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown precision {config.precision!r}; choose auto, fp32 or bf16.")
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
