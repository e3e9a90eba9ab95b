"""What every benchmark entry shares: the result record, timing, scratch folders, data paths."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class Skip(Exception):
    """An entry cannot run here (no GPU, no PostgreSQL, ...); the message says why."""


@dataclass
class Entry:
    """One row of the results: `ratio` is kdsweep's figure relative to its baseline.

    `goal` is a human-readable target such as ">= 1.0"; `met` compares `ratio` (or `value`
    where the goal is on the value itself) with it. Units are spelled out in `unit`.
    """

    name: str
    value: float | None
    unit: str
    baseline: float | None
    ratio: float | None
    goal: str
    device: str
    met: bool | None = None
    wall_s: float | None = None  # seconds this entry took, both sides included
    budget_s: float | None = None  # the time budget the entry's sizes were chosen for
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh folder under $TMPDIR, removed afterwards; never the repository (kdsweep.db etc.)."""
    path = Path(tempfile.mkdtemp(prefix=f"kdsweep-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or unset, with None) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Clock:
    """perf_counter seconds since creation; `cuda_sync` waits for queued GPU work first."""

    def __init__(self, cuda_sync: bool = False) -> None:
        self.cuda_sync = cuda_sync
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            torch.cuda.synchronize()

    def __call__(self) -> float:
        self._sync()
        return time.perf_counter() - self.start


def fmnist_source() -> Path:
    """Folder holding Fashion-MNIST's four IDX .gz files: $KDSWEEP_DATA first, then Debian's."""
    candidates = [Path(p) for p in (os.environ.get("KDSWEEP_DATA"),) if p] + [FMNIST_DEBIAN]
    for folder in candidates:
        if all((folder / f"{n}.gz").is_file() for n in FMNIST_FILES):
            return folder
    raise Skip(
        "Fashion-MNIST's four .gz files are in neither $KDSWEEP_DATA nor "
        f"{FMNIST_DEBIAN} (apt-get install dataset-fashion-mnist)"
    )


def torchvision_fmnist_root(into: Path) -> Path:
    """A torchvision data root with FashionMNIST/raw extracted, as `datasets.FashionMNIST` wants."""
    source = fmnist_source()
    raw = into / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return into


def warm_logit_cache(config) -> None:
    """Fill the trial's teacher-logit cache for every (image, view)."""
    import numpy as np
    import torch

    from kdsweep.core import data, teacher
    from kdsweep.core.devices import resolve_device
    from kdsweep.core.train import eval_batch, resolve

    config = resolve(config)
    splits = data.load_splits(config.data)
    fn, _ = teacher.prepare(config).logits_source(config, splits, resolve_device(config.device))
    views = data.num_views(config.data.pad, config.data.flip)
    pairs = np.arange(len(splits.train_x) * views)
    step = eval_batch(config, resolve_device(config.device))
    for start in range(0, len(pairs), step):
        chunk = pairs[start:start + step]
        idx, view = torch.from_numpy(chunk // views), torch.from_numpy(chunk % views)
        fn(idx, view, None, (idx.numpy(), view.numpy()))


def q2_smoke_nets() -> dict[str, tuple[Any, int, Any]]:
    """The q2 smoke preset's two trained networks: name -> (model config, batch size, training
    config with that network's learning rate)."""
    from kdsweep.core.config import replace
    from kdsweep.service import spec as studies

    cfg = studies.load("q2").preset("smoke").config
    return {
        "student": (cfg.model, cfg.batch_size, cfg),
        "teacher": (cfg.kd.teacher, cfg.kd.teacher_batch_size, replace(cfg, **{"optim.lr": cfg.kd.teacher_lr})),
    }
