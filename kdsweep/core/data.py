"""Datasets decoded once into uint8 tensors, fixed train/val/test splits, and whole-batch ops.

`load_splits(cfg)` turns a `DataConfig` into a `Splits`: uint8 N×C×H×W tensors on the CPU plus
int64 labels, decoded once per process. Training moves them to its device and then works on
whole batches: `batch_indices` picks rows, `sample_views` / `apply_views` crop and flip, and
`to_input` scales, normalises, resizes and widens channels. Nothing here loops over samples.

Augmentation is a finite set of *views* (flip × integer shifts in [-pad, pad]), so a frozen
teacher's logits can be cached per (image, view) and the student sees exactly the view the
teacher saw.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdsweep.core.config import DataConfig
from kdsweep.core.data_root import (  # noqa: F401  (kdsweep.core.data.DataError and check_root stay importable)
    DEBIAN_FASHION_MNIST,
    DataError,
    DataFolderError,
    check_root,
    given_root,
    none_of_its_files,
    resolve_root,
)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# Part of every Splits.key: bump it when the split procedure changes so teacher caches follow.
SPLIT_VERSION = 1

_CIFAR = {  # name -> (title, torchvision class, folder torchvision extracts into)
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python"),
}
_FMNIST_CLASSES = (  # torchvision.datasets.FashionMNIST.classes, without importing torchvision
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_FILES = (  # (images, labels) of train, then test, as torchvision's raw folder names them
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
_VALID_FORMS = (
    "cifar10, cifar100, fashion-mnist, npz:PATH (a .npz file with arrays x and y) "
    "or folder:PATH (a directory with one sub-folder of images per class)"
)


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


@dataclass
class _Source:
    """A decoded dataset before splitting; test_x/test_y are None when it ships no test set."""

    spec: str  # canonical description with the absolute path the data came from
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: tuple[str, ...]
    files: list[Path]  # source files, for the cheap identity in Splits.key


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
            if kind in _CIFAR:
                source = _load_cifar(kind, path, cfg.download, given_root(cfg))
            elif kind == "fashion-mnist":
                source = _load_fashion_mnist(path, cfg.download, given_root(cfg))
            elif kind == "npz":
                source = _load_npz(path)
            else:
                source = _load_folder(path)
            splits = _CACHE[cache_key] = _split(source, cfg, names or {})
    return splits


def _parse_dataset(cfg: DataConfig) -> tuple[str, Path]:
    """(kind, absolute path): the data root for named datasets, else the file or directory."""
    name = cfg.dataset.strip()
    if name.lower() in (*_CIFAR, "fashion-mnist"):
        check_root(cfg.root or os.environ.get("KDSWEEP_DATA"), cfg.download)
        return name.lower(), resolve_root(cfg)
    for prefix in ("npz:", "folder:"):
        if name.startswith(prefix) and name[len(prefix) :].strip():
            return prefix[:-1], Path(name[len(prefix) :].strip()).expanduser().resolve()
    if name and Path(name).expanduser().is_dir():
        return "folder", Path(name).expanduser().resolve()
    raise DataError(f"unknown dataset {cfg.dataset!r}; use {_VALID_FORMS}.")


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


# -- sources -----------------------------------------------------------------------------------


def _short(error: BaseException) -> str:
    """The first sentence of an error, to quote inside our own one-sentence messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". ")[0].rstrip(".")[:200]
    return text or type(error).__name__


def _nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def _load_cifar(name: str, root: Path, download: bool, given: bool = False) -> _Source:
    from torchvision import datasets

    title, cls_name, folder = _CIFAR[name]
    ways_out = (
        f"pass --data DIR (or set KDSWEEP_DATA) to a folder that holds {folder}, "
        "or add --download on a machine with internet"
    )
    cls = getattr(datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as error:  # torchvision raises RuntimeError, downloads any OSError
        if download:
            raise DataError(
                f"downloading {title} into {root} failed ({_short(error)}); {ways_out}."
            ) from error
        if (root / folder).exists():
            raise DataError(
                f"{title} in {root / folder} is incomplete or corrupted and downloading is off; "
                f"{ways_out}."
            ) from error
        if given:
            raise none_of_its_files(title, root, folder) from None
        raise DataError(f"{title} is not in {root} and downloading is off; {ways_out}.") from error
    return _Source(
        spec=f"{name}:{root}",
        train_x=_nhwc_to_nchw(train.data),
        train_y=torch.as_tensor(train.targets, dtype=torch.int64),
        test_x=_nhwc_to_nchw(test.data),
        test_y=torch.as_tensor(test.targets, dtype=torch.int64),
        classes=tuple(train.classes),
        files=sorted(p for p in (root / folder).iterdir() if p.is_file()),
    )


def _read_idx_gz(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes (the MNIST format) without writing anything."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(
            f"cannot read {path} ({_short(error)}); replace it with the original file."
        ) from error
    # Header: two zero bytes, type code 0x08 (unsigned byte), ndim, then ndim big-endian uint32.
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08 or len(data) < 4 + 4 * data[3]:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes; replace it with the original file."
        )
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(
            f"{path} holds {body.size} values where its header promises {math.prod(dims)}; "
            "replace it with the original file."
        )
    return body.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


def _load_fashion_mnist(root: Path, download: bool, given: bool = False) -> _Source:
    """Fashion-MNIST from torchvision's raw folder or the four IDX .gz files; Debian's copy
    stands in only for the default folder, never for one the user gave (`given`)."""
    classes = _FMNIST_CLASSES
    raw = root / "FashionMNIST" / "raw"
    names = [n for pair in _FMNIST_FILES for n in pair]
    use_torchvision = all((raw / n).is_file() for n in names)
    if not use_torchvision:
        folders = (root, raw) if given else (root, raw, DEBIAN_FASHION_MNIST)
        if given and not download and not any((f / f"{n}.gz").is_file() for f in folders for n in names):
            raise none_of_its_files("Fashion-MNIST", root, "its four IDX .gz files or FashionMNIST/raw")
        for folder in folders:
            files = [folder / f"{n}.gz" for n in names]
            if all(f.is_file() for f in files):
                arrays = [_read_idx_gz(f) for f in files]
                sets = []
                for images, labels in (arrays[:2], arrays[2:]):
                    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                        raise DataError(
                            f"the Fashion-MNIST files in {folder} do not match (images "
                            f"{images.shape}, labels {labels.shape}); "
                            "replace them with the originals."
                        )
                    sets.append(
                        (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())
                    )
                (train_x, train_y), (test_x, test_y) = sets
                return _Source(
                    f"fashion-mnist:{folder}", train_x, train_y, test_x, test_y, classes, files
                )
        if not download:
            raise DataError(
                f"Fashion-MNIST is in neither {root} nor {DEBIAN_FASHION_MNIST}; run "
                "`apt-get install dataset-fashion-mnist`, pass --data DIR (or set KDSWEEP_DATA) "
                "to a folder that holds its four .gz files, "
                "or add --download on a machine with internet."
            )
    from torchvision import datasets

    try:
        train = datasets.FashionMNIST(str(root), train=True, download=download)
        test = datasets.FashionMNIST(str(root), train=False, download=download)
    except Exception as error:
        raise DataError(
            f"downloading Fashion-MNIST into {root} failed ({_short(error)}); run "
            "`apt-get install dataset-fashion-mnist` or pass --data DIR (or set KDSWEEP_DATA) "
            "to a folder that holds its four .gz files."
        ) from error
    return _Source(
        spec=f"fashion-mnist:{raw}",
        train_x=train.data.unsqueeze(1).contiguous(),
        train_y=train.targets.long(),
        test_x=test.data.unsqueeze(1).contiguous(),
        test_y=test.targets.long(),
        classes=classes,
        files=[raw / n for n in names],
    )


def _npz_images(path: Path, name: str, x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {name} has dtype {x.dtype}; save pixels as uint8 (0 to 255).")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: {name} has shape {x.shape}; save images as N×H×W or N×H×W×C with C = 1 or 3 "
            "(channels last)."
        )
    return _nhwc_to_nchw(x)


def _npz_labels(path: Path, name: str, y: np.ndarray, n: int, classes: int | None) -> torch.Tensor:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: {name} has dtype {y.dtype} and shape {y.shape}; "
            "save labels as a 1-D integer array."
        )
    if len(y) != n:
        raise DataError(
            f"{path}: there are {n} images but {len(y)} labels in {name}; save one label per image."
        )
    if len(y) and (y.min() < 0 or (classes is not None and y.max() >= classes)):
        raise DataError(
            f"{path}: {name} holds labels from {y.min()} to {y.max()}; use 0 to "
            f"{'number of classes - 1' if classes is None else classes - 1}."
        )
    return torch.from_numpy(y.astype(np.int64))


def _load_npz(path: Path) -> _Source:
    how = "save it with numpy.savez(path, x=images, y=labels)"
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass npz:PATH with the path of a .npz file.")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile, pickle and format errors all mean "not a usable npz"
        raise DataError(
            f"cannot read {path} as a .npz archive ({_short(error)}); {how}."
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not a .npz archive; {how}.")
    with archive:
        for name in ("x", "y"):
            if name not in archive.files:
                raise DataError(
                    f"{path} has no array {name!r} "
                    f"(it has {', '.join(archive.files) or 'none'}); {how}."
                )
        if ("x_test" in archive.files) != ("y_test" in archive.files):
            raise DataError(f"{path} has only one of x_test and y_test; save both or neither.")
        try:
            arrays = {
                k: archive[k]
                for k in ("x", "y", "x_test", "y_test", "classes")
                if k in archive.files
            }
        except Exception as error:
            raise DataError(
                f"cannot read the arrays in {path} ({_short(error)}); {how}."
            ) from error
    classes: tuple[str, ...] | None = None
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(
                f"{path}: classes must be a 1-D array of strings, got {names.dtype} {names.shape}."
            )
        classes = tuple(str(c) for c in names.tolist())
    train_x = _npz_images(path, "x", arrays["x"])
    n_classes = len(classes) if classes is not None else None
    train_y = _npz_labels(path, "y", arrays["y"], len(train_x), n_classes)
    test_x = test_y = None
    if "x_test" in arrays:
        test_x = _npz_images(path, "x_test", arrays["x_test"])
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(
                f"{path}: x_test images are {tuple(test_x.shape[1:])} (C, H, W) but x images are "
                f"{tuple(train_x.shape[1:])}; save both at one size."
            )
        test_y = _npz_labels(path, "y_test", arrays["y_test"], len(test_x), n_classes)
    if classes is None:
        top = max(int(t.max()) if len(t) else -1 for t in (train_y, test_y) if t is not None)
        classes = tuple(str(i) for i in range(top + 1))
    return _Source(f"npz:{path}", train_x, train_y, test_x, test_y, classes, [path])


def _image_files(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    return [
        (p, label)
        for label, name in enumerate(classes)
        if (folder / name).is_dir()
        for p in sorted((folder / name).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]


def _decode(items: list[tuple[Path, int]], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from kdsweep.core.progress import track

    pixels = []
    for path, _ in track(items, len(items), "decoding images", "image"):
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert(mode)))
    x = np.stack(pixels)
    x = x[..., None] if x.ndim == 3 else x
    return _nhwc_to_nchw(x), torch.tensor([label for _, label in items], dtype=torch.int64)


def _load_folder(path: Path) -> _Source:
    from PIL import Image

    if not path.is_dir():
        raise DataError(
            f"{path} is not a directory; pass folder:PATH with a directory of class sub-folders."
        )
    has_split = (path / "train").is_dir()
    train_dir = path / "train" if has_split else path
    classes = tuple(
        sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    train = _image_files(train_dir, classes)
    if not train:
        raise DataError(
            f"{train_dir} holds no images in class sub-folders; put images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) in one sub-folder per class."
        )
    test: list[tuple[Path, int]] | None = None
    if has_split and (path / "test").is_dir():
        extra = sorted(
            p.name
            for p in (path / "test").iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in classes
        )
        if extra:
            raise DataError(
                f"{path / 'test' / extra[0]} is a class missing from {train_dir}; "
                "give train/ and test/ the same class folders."
            )
        test = _image_files(path / "test", classes)
    # Headers only (PIL opens lazily): sizes and modes are known before anything is decoded.
    size, first, modes = None, None, set()
    for file, _ in train + (test or []):
        try:
            with Image.open(file) as image:
                modes.add(image.mode)
                if size is None:
                    size, first = image.size, file
                elif image.size != size:
                    raise DataError(
                        f"{file} is {image.size[0]}×{image.size[1]} pixels but {first} is "
                        f"{size[0]}×{size[1]}; resize all images to one size first."
                    )
        except (OSError, ValueError) as error:
            raise DataError(
                f"cannot decode {file} ({_short(error)}); remove or replace it."
            ) from error
    mode = "L" if modes <= {"1", "L"} else "RGB"
    try:
        train_x, train_y = _decode(train, mode)
        test_x, test_y = _decode(test, mode) if test else (None, None)
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot decode an image under {path} ({_short(error)}); remove or replace it."
        ) from error
    files = [p for p, _ in train + (test or [])]
    return _Source(f"folder:{path}", train_x, train_y, test_x, test_y, classes, files)


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


def _split(source: _Source, cfg: DataConfig, names: dict[str, str]) -> Splits:
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
    if name.lower() in (*_CIFAR, "fashion-mnist"):
        return name.lower()
    return "npz" if name.startswith("npz:") else "folder"


def default_augmentation(dataset: str, in_shape: Sequence[int]) -> tuple[int, bool]:
    """(pad, flip) a dataset gets when its config leaves them unset.

    CIFAR and Fashion-MNIST: shifts of up to 4 px and horizontal flips (photos and clothes
    keep their meaning mirrored). npz:/folder: data can be anything (a mirrored digit is
    another digit, a 2 px shift moves an 8x8 digit by a quarter of its side): no flips, and
    shifts of at most side/16 each way (a range of 1/8 of the smaller side; none below 16 px).
    """
    if dataset_kind(dataset) in (*_CIFAR, "fashion-mnist"):
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
