"""Where the named datasets' files are looked for, and the checks a user's data folder gets.

Light on purpose (no torch, no NumPy): the command line checks --data with it before it
imports anything heavy, so a wrong folder is answered at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdsweep.core.config import DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(Exception):
    """The data cannot be loaded as configured; the message is one sentence saying what to do."""


class DataFolderError(DataError):
    """A data folder the user gave cannot serve the dataset: a usage error (exit 2), since
    another folder (Debian's Fashion-MNIST) silently standing in for it would be worse."""


def resolve_root(cfg: DataConfig) -> Path:
    """The data directory: `cfg.root`, else $KDSWEEP_DATA, else ~/.cache/kdsweep/data (absolute)."""
    root = cfg.root or os.environ.get("KDSWEEP_DATA") or "~/.cache/kdsweep/data"
    return Path(root).expanduser().resolve()


def given_root(cfg: DataConfig) -> bool:
    """Whether the user chose the data folder (--data, $KDSWEEP_DATA) rather than the default."""
    return bool(cfg.root or os.environ.get("KDSWEEP_DATA"))


def check_root(root: str | None, download: bool = False) -> None:
    """Refuse a data folder given by a user (--data, $KDSWEEP_DATA) that cannot be one.

    A dataset spec (npz:PATH, folder:PATH) given as the folder, or a folder that does not
    exist (unless torchvision may create it to download into), raises DataFolderError:
    otherwise a named dataset would silently be looked for elsewhere (Debian's Fashion-MNIST).
    """
    if not root:
        return
    for prefix in ("npz:", "folder:"):
        if root.startswith(prefix):
            raise DataFolderError(
                f"{root!r} is a dataset, not a data folder; pass it as --dataset {root} "
                "(env KDSWEEP_DATASET) and keep --data for the folder that holds downloaded datasets."
            )
    path = Path(root).expanduser()
    if not download and not path.is_dir():
        raise DataFolderError(
            f"the data folder {path} does not exist; pass --data DIR with an existing folder "
            "(or none, for the default), or add --download to create it."
        )


def none_of_its_files(title: str, root: Path, wanted: str) -> DataFolderError:
    """The error for a folder the user gave that exists but holds none of the dataset's files."""
    return DataFolderError(
        f"the data folder {root} holds none of {title}'s files ({wanted}); pass --data DIR with "
        "a folder that does, drop --data (and KDSWEEP_DATA) for the default, or add --download."
    )
