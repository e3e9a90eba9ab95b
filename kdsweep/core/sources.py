"""Datasets read from disk in their own formats, decoded once into uint8 tensors.

CIFAR-10/100 through torchvision's dataset classes (downloaded when asked, else found under the
data root), Fashion-MNIST from its four IDX files (torchvision's raw folder, or Debian's
`dataset-fashion-mnist` when no folder was given), `npz:` files and `folder:` trees of images.
Each loader returns a `Source`; `kdsweep.core.data` splits it. Errors are one `DataError`
sentence saying what to do.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdsweep.core.data_root import (
    DEBIAN_FASHION_MNIST,
    DataError,
    none_of_its_files,
)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

CIFAR = {  # name -> (title, torchvision class, folder torchvision extracts into)
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
VALID_FORMS = (
    "cifar10, cifar100, fashion-mnist, npz:PATH (a .npz file with arrays x and y) "
    "or folder:PATH (a directory with one sub-folder of images per class)"
)


@dataclass
class Source:
    """A decoded dataset before splitting; test_x/test_y are None when it ships no test set."""

    spec: str  # canonical description with the absolute path the data came from
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: tuple[str, ...]
    files: list[Path]  # source files, for the cheap identity in Splits.key




def _short(error: BaseException) -> str:
    """The first sentence of an error, to quote inside our own one-sentence messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". ")[0].rstrip(".")[:200]
    return text or type(error).__name__


def _nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def load_cifar(name: str, root: Path, download: bool, given: bool = False) -> Source:
    from torchvision import datasets

    title, cls_name, folder = CIFAR[name]
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
    return Source(
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


def load_fashion_mnist(root: Path, download: bool, given: bool = False) -> Source:
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
                return Source(
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
    return Source(
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


def load_npz(path: Path) -> Source:
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
    return Source(f"npz:{path}", train_x, train_y, test_x, test_y, classes, [path])


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


def load_folder(path: Path) -> Source:
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
    return Source(f"folder:{path}", train_x, train_y, test_x, test_y, classes, files)
