"""Teacher logits cached once per (training image, augmentation view), shared across processes.

A frozen teacher's outputs depend on neither alpha, T nor the student, so every trial of a
study, in every worker process on the host, can reuse them. Views are integer ids (the data
module encodes flip x integer shift); teacher and student see the same view (Beyer et al.
2022), and a finite view set keeps a full cache small (CIFAR-10, 162 views: ~150 MB fp16).

On disk, under `path/`:

- ``logits.f16``: float16 memmap (N, V, C) of raw teacher logits (apply T later).
- ``passes.u1``: uint8 memmap (N, V), how many times the teacher ran for the pair; 0 = missing.
- ``meta.json``: shape, dtype, version; written last, so a half-created cache is rebuilt.
- ``lock``: the `filelock` taken only to fill missing pairs (and once at creation).

One path per (teacher, dataset split, view set): the cache cannot tell teachers apart.

The memory map is the fill and persistence layer. A training loop reads through `lookup`,
which keeps a copy of the filled pairs on the training device and gathers from it there, so a
step whose pairs are all cached makes no host-device copy and no sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

log = logging.getLogger(__name__)

VERSION = 1
_FP16_MAX = float(np.finfo(np.float16).max)

ComputeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LogitCache:
    """Teacher logits per (image index, view id), filled on demand, each pair computed once.

    With `path`, the cache lives in memory-mapped files shared by all processes on the host
    (files that do not match the requested shape, or look corrupt, are deleted and rebuilt with
    a warning). With `path=None` it is an in-memory array for a single process.
    Shapes: `num_images` N training images, `num_views` V view ids, `num_classes` C.
    """

    def __init__(self, path: Path | str | None, num_images: int, num_views: int, num_classes: int):
        if min(num_images, num_views, num_classes) < 1:
            raise ValueError(
                f"num_images, num_views and num_classes must be positive, got {num_images}, {num_views}, {num_classes}."
            )
        self.path = None if path is None else Path(path)
        self.shape = (num_images, num_views, num_classes)
        pairs = num_images * num_views
        # Flat views: pair p = index * V + view, so one fancy index serves a whole batch.
        self._logits: np.ndarray
        self._passes: np.ndarray
        self._lock: Any
        self._mirror: tuple[torch.Tensor, np.ndarray] | None = None  # see _mirror_on
        if self.path is None:
            self._logits = np.zeros((pairs, num_classes), np.float16)
            self._passes = np.zeros(pairs, np.uint8)
            self._lock = contextlib.nullcontext()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.path / "lock")
        with self._lock:  # two workers starting together must not both rebuild
            problem = _check_files(self.path, self.shape)
            if problem:
                if problem != "absent":
                    log.warning("logit cache %s is unusable (%s); rebuilding it empty.", self.path, problem)
                _create_files(self.path, self.shape)
        self._logits = np.memmap(self.path / "logits.f16", np.float16, "r+", shape=(pairs, num_classes))
        self._passes = np.memmap(self.path / "passes.u1", np.uint8, "r+", shape=(pairs,))

    def get(self, indices: torch.Tensor, views: torch.Tensor, compute: ComputeFn) -> torch.Tensor:
        """Teacher logits (B, C) float32 for pairs (indices[i], views[i]), on `indices.device`.

        Pairs not cached yet are computed by `compute(missing_indices, missing_views)` (long
        tensors of length M on `indices.device`, each pair once), which must return (M, C)
        logits for exactly those pairs, in that order. Only a batch with missing pairs takes
        the file lock; under it the missing set is read again, so a pair another process
        filled meanwhile is not recomputed. Raises ValueError for out-of-range ids or a
        `compute` result of the wrong shape or with non-finite values (nothing is cached then).

        Reads the ids back to the host; a training loop, which has them on the host already,
        calls `lookup` instead.
        """
        if indices.ndim != 1 or indices.shape != views.shape:
            raise ValueError(
                f"indices and views must be 1-D of equal length, got {tuple(indices.shape)} and {tuple(views.shape)}."
            )
        host = (indices.detach().cpu().numpy(), views.detach().cpu().numpy())
        return self.lookup(indices, views, compute, host)

    def lookup(self, indices: torch.Tensor, views: torch.Tensor, compute: ComputeFn,
               host: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]) -> torch.Tensor:
        """`get` for a training loop: never reads from the device, so the host never waits on it.

        `host` holds the same ids as `indices` and `views` (on the training device) as CPU
        arrays or tensors; the caller keeps both (sampling on the host, copying once). Missing
        pairs are found on the host; the logits come from a copy of the cache on
        `indices.device` (the "mirror", filled from the memory map as pairs are needed, about
        45 MB for 50 views of 45k CIFAR images), gathered there. A batch whose pairs are all in
        the mirror launches one gather and copies nothing between host and device.
        """
        idx = np.asarray(host[0], dtype=np.int64)
        view = np.asarray(host[1], dtype=np.int64)
        if idx.ndim != 1 or idx.shape != view.shape or idx.shape != tuple(indices.shape):
            raise ValueError(
                f"indices, views and their host copies must be 1-D of equal length, got {tuple(indices.shape)}, "
                f"{idx.shape} and {view.shape}."
            )
        n, v, c = self.shape
        if idx.size and (idx.min() < 0 or idx.max() >= n or view.min() < 0 or view.max() >= v):
            raise ValueError(
                f"image indices must be in [0, {n}) and view ids in [0, {v}); the cache was made for "
                "another dataset or view set, so use another path."
            )
        mirror, present = self._mirror_on(indices.device)
        pairs = idx * v + view
        absent = pairs[~present[pairs]]
        if absent.size:
            absent = np.unique(absent)
            missing = absent[self._passes[absent] == 0]
            if missing.size:
                with self._lock:
                    self._fill(missing, indices.device, compute)
            rows = torch.from_numpy(np.ascontiguousarray(self._logits[absent]))
            mirror[torch.from_numpy(absent).to(mirror.device)] = rows.to(mirror.device)
            present[absent] = True
        return mirror[indices * v + views.to(indices.device)].float()

    def _mirror_on(self, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        """The device copy of the logits and which of its pairs are loaded (a host bool array).

        Made on first use with every pair filled so far, in one copy; one device at a time.
        """
        if self._mirror is None or self._mirror[0].device != device:
            pairs, c = self._logits.shape
            mirror = torch.zeros((pairs, c), dtype=torch.float16, device=device)
            present = np.asarray(self._passes) > 0
            filled = np.flatnonzero(present)
            if filled.size:
                rows = torch.from_numpy(np.ascontiguousarray(self._logits[filled]))
                mirror[torch.from_numpy(filled).to(device)] = rows.to(device)
            self._mirror = (mirror, present)
        return self._mirror

    def stats(self) -> dict[str, float | int]:
        """filled: pairs present; total_passes / max_passes: teacher runs (max_passes <= 1 when
        no pair was computed twice); views_per_image_mean: filled / num_images."""
        passes = np.asarray(self._passes)
        filled = int(np.count_nonzero(passes))
        return {
            "filled": filled,
            "total_passes": int(passes.sum(dtype=np.int64)),
            "max_passes": int(passes.max()) if passes.size else 0,
            "views_per_image_mean": filled / self.shape[0],
        }

    def _fill(self, candidates: np.ndarray, device: torch.device, compute: ComputeFn) -> None:
        # Under the lock: another process may have filled some candidates since we looked.
        todo = candidates[self._passes[candidates] == 0]
        if not todo.size:
            return
        v, c = self.shape[1], self.shape[2]
        idx = torch.from_numpy(todo // v).to(device)
        view = torch.from_numpy(todo % v).to(device)
        logits = compute(idx, view)
        if tuple(logits.shape) != (todo.size, c):
            raise ValueError(
                f"compute returned logits of shape {tuple(logits.shape)} for {todo.size} pairs; it must return ({todo.size}, {c})."
            )
        values = logits.detach().float().cpu().numpy()
        if not np.isfinite(values).all():
            raise ValueError("compute returned non-finite teacher logits; fix the teacher before caching them.")
        self._logits[todo] = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        # Logits reach the file before their pairs are marked present: a crash in between
        # leaves them missing (recomputed), never present with stale values.
        _flush(self._logits)
        self._passes[todo] += 1
        _flush(self._passes)


def _check_files(path: Path, shape: tuple[int, int, int]) -> str:
    """'' when the files under `path` hold a cache of `shape`; otherwise why they cannot be used."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        return "absent"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json: {exc}"
    if not isinstance(meta, dict) or meta.get("version") != VERSION or meta.get("dtype") != "float16":
        return f"meta.json {meta!r} is not version {VERSION} float16"
    if meta.get("shape") != list(shape):
        return f"shape {meta.get('shape')} differs from the requested {list(shape)}"
    n, v, c = shape
    for name, size in (("logits.f16", n * v * c * 2), ("passes.u1", n * v)):
        file = path / name
        actual = file.stat().st_size if file.exists() else None
        if actual != size:
            return f"{name} has {actual} bytes, expected {size}"
    return ""


def _create_files(path: Path, shape: tuple[int, int, int]) -> None:
    for name in ("meta.json", "logits.f16", "passes.u1"):
        (path / name).unlink(missing_ok=True)
    n, v, c = shape
    # Sparse zero-filled files: passes 0 marks every pair missing.
    for name, size in (("logits.f16", n * v * c * 2), ("passes.u1", n * v)):
        with open(path / name, "wb") as f:
            f.truncate(size)
    meta = {"version": VERSION, "shape": list(shape), "dtype": "float16", "passes_dtype": "uint8"}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path / "meta.json")


def _flush(array: np.ndarray) -> None:
    if isinstance(array, np.memmap):
        array.flush()
