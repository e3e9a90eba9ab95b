"""Datasets decoded once into uint8 tensors, fixed train/val/test splits, and whole-batch ops.

`load_splits(cfg)` turns a `DataConfig` into a `Splits`: uint8 N×C×H×W tensors on the CPU plus
int64 labels, decoded once per process (the files are read by `kdsweep.core.sources`). Training moves them to its device and then works on
whole batches: `batch_indices` picks rows, `sample_views` / `apply_views` crop and flip, and
`to_input` scales, normalises, resizes and widens channels. Nothing here loops over samples.

Augmentation is a finite set of *views* (flip × integer shifts in [-pad, pad]), so a frozen
teacher's logits can be cached per (image, view) and the student sees exactly the view the
teacher saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdsweep.core.config import DataConfig
from kdsweep.core.data_root import (  # noqa: F401  (kdsweep.core.data.DataError and check_root stay importable)
    DataError,
    DataFolderError,
    check_root,
    given_root,
    resolve_root,
)
from kdsweep.core.sources import (
    CIFAR,
    VALID_FORMS,
    Source,
    load_cifar,
    load_fashion_mnist,
    load_folder,
    load_npz,
)

# Part of every Splits.key: bump it when the split procedure changes so teacher caches follow.
SPLIT_VERSION = 1



@dataclass(frozen=True, eq=False)
class Splits:
    """Train/validation/test images of one dataset, decoded once and shared within a process.

    x tensors are uint8, N×C×H×W, contiguous, on the CPU; y tensors are int64. `mean`/`std`
    are per native channel on the [0, 1] pixel scale, computed on the whole training split
    before `train_subset` (so every subset of one split, the teacher's included, shares them).
    `key` is a short hash of everything that defines these splits (see `load_splits`);
    `source` names the data actually read (kind and absolute path); `train_available` is the
    size of the training split before `train_subset`. The object is cached and shared: never
    modify its tensors in place.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: str
    source: str = ""
    train_available: int = 0

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Native (C, H, W) of every image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Splits(train={len(self.train_y)}, val={len(self.val_y)}, test={len(self.test_y)}, "
            f"in_shape={self.in_shape}, classes={self.num_classes}, key={self.key!r})"
        )


_CACHE: dict[tuple[object, ...], Splits] = {}
_CACHE_LOCK = threading.Lock()  # Optuna's n_jobs runs trials in threads: decode once, not n times


def clear_cache() -> None:
    """Forget every `Splits` loaded in this process (frees their memory once unreferenced)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_splits(cfg: DataConfig, names: dict[str, str] | None = None) -> Splits:
    """Load `cfg.dataset`, split it, and cache the result in this process.

    Sources: ``cifar10``/``cifar100`` (torchvision, under the data root), ``fashion-mnist``
    (torchvision's extracted files under ``<root>/FashionMNIST/raw``, else the four IDX ``.gz``
    files in the root or in Debian's read-only ``/usr/share/datasets/fashion-mnist``),
    ``npz:PATH`` (arrays ``x``, ``y``, optional ``x_test``/``y_test``/``classes``) and
    ``folder:PATH`` or a plain directory (one sub-folder of images per class, or ``train/`` and
    ``test/`` holding such sub-folders).

    Splitting: a permutation of the training set seeded by `split_seed` (NumPy's legacy
    RandomState, whose stream never changes) sends the first `val_size` images to validation;
    when the source has no test set the next `val_size` images become the test set; the rest
    is the training set, of which `train_subset` keeps the first N in that shuffled order (so a
    smaller subset is a prefix of a larger one). `test_subset` keeps the first N test images.

    The cache key is (dataset with resolved path, data root, val_size, split_seed,
    train_subset, test_subset): image_size, channels, pad and flip act per batch and share
    one `Splits`. Files changed on disk after the first load are not noticed in-process.

    Raises DataError (one sentence saying what to do) for missing, unreadable or malformed
    data and for sizes the data cannot satisfy; `names` renames the settings such a message
    names (e.g. {"train_subset": "kd.teacher_train_subset"} for the teacher's data).
    """
    kind, path = _parse_dataset(cfg)
    cache_key = (kind, str(path), cfg.val_size, cfg.split_seed, cfg.train_subset, cfg.test_subset)
    with _CACHE_LOCK:
        splits = _CACHE.get(cache_key)
        if splits is None:
            if kind in CIFAR:
                source = load_cifar(kind, path, cfg.download, given_root(cfg))
            elif kind == "fashion-mnist":
                source = load_fashion_mnist(path, cfg.download, given_root(cfg))
            elif kind == "npz":
                source = load_npz(path)
            else:
                source = load_folder(path)
            splits = _CACHE[cache_key] = _split(source, cfg, names or {})
    return splits


def _parse_dataset(cfg: DataConfig) -> tuple[str, Path]:
    """(kind, absolute path): the data root for named datasets, else the file or directory."""
    name = cfg.dataset.strip()
    if name.lower() in (*CIFAR, "fashion-mnist"):
        check_root(cfg.root or os.environ.get("KDSWEEP_DATA"), cfg.download)
        return name.lower(), resolve_root(cfg)
    for prefix in ("npz:", "folder:"):
        if name.startswith(prefix) and name[len(prefix) :].strip():
            return prefix[:-1], Path(name[len(prefix) :].strip()).expanduser().resolve()
    if name and Path(name).expanduser().is_dir():
        return "folder", Path(name).expanduser().resolve()
    raise DataError(f"unknown dataset {cfg.dataset!r}; use {VALID_FORMS}.")


# Native (C, H, W) and class count of the named datasets: what a model is built for, known
# without the files (`kdsweep launch --dry-run` needs no data).
KNOWN_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "fashion-mnist": ((1, 28, 28), 10),
}


@dataclass(frozen=True)
class Shape:
    """What building a model needs of a dataset: its native image shape and class count."""

    in_shape: tuple[int, int, int]
    num_classes: int


def shape_of(cfg: DataConfig) -> Shape:
    """The dataset's image shape and class count: from KNOWN_SHAPES for named datasets (no file
    is read), else from the data itself (npz and folders are loaded)."""
    name = cfg.dataset.strip().lower()
    if name in KNOWN_SHAPES:
        return Shape(*KNOWN_SHAPES[name])
    splits = load_splits(cfg)
    return Shape(splits.in_shape, splits.num_classes)


# -- splitting ---------------------------------------------------------------------------------


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std on the [0, 1] scale, from 256-bin histograms.

    Counting uint8 values avoids a float copy of the whole training set.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        stds.append(max(math.sqrt(var), 1 / 255))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def _first(n_available: int, keep: int | None, what: str, spec: str) -> int:
    if keep is None:
        return n_available
    if not 1 <= keep <= n_available:
        raise DataError(
            f"{what}={keep} but {spec} leaves {n_available} images for it; "
            f"choose a value from 1 to {n_available} or none."
        )
    return keep


def _split(source: Source, cfg: DataConfig, names: dict[str, str]) -> Splits:
    n = len(source.train_y)
    carve = source.test_x is None
    held_out = cfg.val_size * (2 if carve else 1)
    if cfg.val_size < 1:
        raise DataError(f"data.val_size must be at least 1, got {cfg.val_size}.")
    if held_out >= n:
        extra = " (and as many again for the test split it lacks)" if carve else ""
        raise DataError(
            f"{source.spec} has {n} training images, too few to hold out "
            f"data.val_size={cfg.val_size}{extra}; choose a val_size from 1 to "
            f"{max((n - 1) // (2 if carve else 1), 1)}."
        )
    perm = torch.from_numpy(np.random.RandomState(cfg.split_seed).permutation(n))
    val_idx = perm[: cfg.val_size]
    if carve:
        test_idx, train_idx = perm[cfg.val_size : held_out], perm[held_out:]
        test_x, test_y = source.train_x[test_idx], source.train_y[test_idx]
    else:
        train_idx = perm[cfg.val_size :]
        test_x, test_y = source.test_x, source.test_y
    available = len(train_idx)
    mean, std = _channel_stats(source.train_x[train_idx])  # the whole split: one per split
    name = {k: names.get(k, f"data.{k}") for k in ("train_subset", "test_subset")}
    train_idx = train_idx[: _first(available, cfg.train_subset, name["train_subset"], source.spec)]
    n_test = _first(len(test_y), cfg.test_subset, name["test_subset"], source.spec)
    train_x = source.train_x[train_idx]
    identity = {
        "version": SPLIT_VERSION,
        "dataset": source.spec,
        "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source.files],
        "val_size": cfg.val_size,
        "split_seed": cfg.split_seed,
        "train_subset": cfg.train_subset,
        "test_subset": cfg.test_subset,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Splits(
        train_x=train_x,
        train_y=source.train_y[train_idx],
        val_x=source.train_x[val_idx],
        val_y=source.train_y[val_idx],
        test_x=test_x[:n_test].contiguous(),
        test_y=test_y[:n_test].contiguous(),
        classes=source.classes,
        mean=mean,
        std=std,
        key=key,
        source=source.spec,
        train_available=available,
    )


# -- what a run does with the data --------------------------------------------------------------


def dataset_kind(dataset: str) -> str:
    """cifar10 | cifar100 | fashion-mnist | npz | folder, without loading anything."""
    name = dataset.strip()
    if name.lower() in (*CIFAR, "fashion-mnist"):
        return name.lower()
    return "npz" if name.startswith("npz:") else "folder"


def default_augmentation(dataset: str, in_shape: Sequence[int]) -> tuple[int, bool]:
    """(pad, flip) a dataset gets when its config leaves them unset.

    CIFAR and Fashion-MNIST: shifts of up to 4 px and horizontal flips (photos and clothes
    keep their meaning mirrored). npz:/folder: data can be anything (a mirrored digit is
    another digit, a 2 px shift moves an 8x8 digit by a quarter of its side): no flips, and
    shifts of at most side/16 each way (a range of 1/8 of the smaller side; none below 16 px).
    """
    if dataset_kind(dataset) in (*CIFAR, "fashion-mnist"):
        return 4, True
    side = min(int(in_shape[-2]), int(in_shape[-1]))
    return min(4, side // 16), False


def with_augmentation(cfg: DataConfig, splits: Splits | Shape) -> DataConfig:
    """`cfg` with `pad` and `flip` set: the given values, else the dataset's defaults."""
    pad, flip = default_augmentation(cfg.dataset, splits.in_shape)
    return dataclasses.replace(
        cfg, pad=pad if cfg.pad is None else cfg.pad, flip=flip if cfg.flip is None else cfg.flip
    )


def describe_augmentation(pad: int, flip: bool) -> str:
    if not pad and not flip:
        return "none"
    parts = [f"shifts up to {pad} px" if pad else "no shifts", "horizontal flips" if flip else "no flips"]
    return f"{', '.join(parts)} ({num_views(pad, flip)} views)"


def describe(cfg: DataConfig, splits: Splits, in_shape: Sequence[int]) -> str:
    """One line: the data read, what the network sees, split sizes, augmentation, normalisation.

    `cfg` should be resolved (pad, flip, mean, std set; see kdsweep.core.train.resolve).
    """
    c, h, w = (int(v) for v in in_shape)
    norm = cfg.normalize
    if cfg.mean:
        norm += " mean " + "/".join(f"{v:.3f}" for v in cfg.mean)
        norm += " std " + "/".join(f"{v:.3f}" for v in cfg.std)
    return (
        f"{splits.source}: {splits.num_classes} classes, network input {c}x{h}x{w} "
        f"(native {'x'.join(str(v) for v in splits.in_shape)}); train {len(splits.train_y)} "
        f"(of {splits.train_available}), val {len(splits.val_y)}, test {len(splits.test_y)}; "
        f"augmentation {describe_augmentation(cfg.pad or 0, bool(cfg.flip))}; normalisation {norm}"
    )


# -- batch ops ---------------------------------------------------------------------------------


def num_views(pad: int, flip: bool) -> int:
    """How many distinct augmented views exist: (2 if flip else 1) * (2*pad+1)**2.

    View id v encodes (flip, dy, dx) with s = 2*pad+1: flip = v // s², dy = (v // s) % s - pad,
    dx = v % s - pad.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    return (2 if flip else 1) * (2 * pad + 1) ** 2


def identity_view(pad: int, flip: bool) -> int:
    """The id of the unaugmented view (no flip, dy = dx = 0); `flip` does not change it."""
    num_views(pad, flip)  # validates pad
    return pad * (2 * pad + 1) + pad


def sample_views(n: int, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """n int64 view ids drawn uniformly from range(num_views(pad, flip)), on generator's device."""
    return torch.randint(
        num_views(pad, flip), (n,), generator=generator, device=generator.device, dtype=torch.int64
    )


def apply_views(x: torch.Tensor, views: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop-with-zero-padding then optional horizontal flip, per sample, in one gather.

    x: B×C×H×W (uint8, any device); views: B view ids made with the same `pad` (see
    `num_views`). Output pixel (i, j) is the zero-padded input at (i+pad+dy, j'+pad+dx), where
    j' = j, or W-1-j when the view's flip bit is set. Returns a new contiguous B×C×H×W tensor.
    """
    if x.dim() != 4 or views.shape != (x.shape[0],):
        raise ValueError(
            f"need x of B×C×H×W and views of B, got {tuple(x.shape)} and {tuple(views.shape)}"
        )
    b, c, h, w = x.shape
    s = 2 * pad + 1
    views = views.to(device=x.device, dtype=torch.int64)
    flipped = (views // (s * s)).bool()
    dy = (views // s) % s  # already offset by +pad, i.e. the row of the crop in padded space
    dx = views % s
    rows = dy[:, None] + torch.arange(h, device=x.device)  # B×H
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flipped[:, None], w - 1 - cols, cols) + dx[:, None]  # B×W
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def to_input(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    channels: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Turn a uint8 B×C×H×W batch into network input on x's device.

    Scales to [0, 1], normalises with the per-channel `mean`/`std`, resizes to
    image_size×image_size (bilinear, align_corners=False) when that differs from H×W, and
    repeats a single channel to 3 when `channels` is 3. `mean`/`std` have one value per native
    channel, or, for grey images made RGB, one per RGB channel (ImageNet's: the grey value is
    repeated first, then normalised as the weights expect). Arithmetic runs in float32 and the
    result is cast to `dtype`; `channels_last` returns that memory format.
    """
    rgb_stats = x.dim() == 4 and x.shape[1] == 1 and channels == 3 and len(mean) == len(std) == 3
    if rgb_stats:
        x = x.expand(-1, 3, -1, -1)  # uint8 view; the float arithmetic below materialises it
    if x.dim() != 4 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"need x of B×C×H×W with one mean and std per channel, got {tuple(x.shape)}, "
            f"{len(mean)} means and {len(std)} stds"
        )
    native = x.shape[1]
    if channels not in (None, native) and not (channels == 3 and native == 1):
        raise DataError(
            f"channels={channels} cannot be made from {native}-channel images; use 3 or none."
        )
    shape = (1, native, 1, 1)
    # as_tensor: mean/std already on the device (train's) are used as they are, no copy or sync
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    out = (x.float() / 255 - m) / s
    if image_size is not None and (out.shape[-2], out.shape[-1]) != (image_size, image_size):
        # Bilinear weights sum to 1, so resizing after normalising equals resizing before.
        out = F.interpolate(
            out, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    if channels == 3 and native == 1:
        out = out.expand(-1, 3, -1, -1)  # a view; the copy below materialises it
    out = out.to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=memory_format)


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield int64 index batches covering range(n) once, on the generator's device (CPU if None).

    With `shuffle` the order is a permutation drawn from `generator` (torch's global RNG if
    None); without it, 0..n-1 in order. The last batch is shorter unless `drop_last` drops it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = generator.device if generator is not None else torch.device("cpu")
    if shuffle:
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
