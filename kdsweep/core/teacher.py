"""The Q2 teacher: trained once per content key, cached on disk, and its logits cached per view.

The teacher is a `TrainConfig` of its own, trained by the same `train()` as every student:
with pretrained weights it is a linear probe (frozen backbone, only the classifier trained);
with `weights="none"` there is nothing worth probing, so the whole network is fine-tuned
instead (so offline runs still distil from a teacher that knows the task). It trains on the
training split only — never the validation split that selects students — and is keyed by
everything that defines it, so every trial and every worker on a host reuses one file, built
under a file lock so concurrent workers do not race to train it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import nn

from kdsweep.core import data, models, progress, shortcuts
from kdsweep.core.config import ConfigError, OptimConfig, TrainConfig, to_dict
from kdsweep.core.devices import autocast, cpu_cores, resolve_device, resolve_precision
from kdsweep.core.logit_cache import LogitCache
from kdsweep.core.train import (
    cache_root,
    eval_batch,
    input_shape,
    resolve_data,
    train,
    with_precision,
)

log = logging.getLogger("kdsweep.core.teacher")

# Teachers already loaded in this process, by content key: trials in one worker share them.
_LOADED: dict[tuple[str, str], tuple[nn.Module, dict[str, Any]]] = {}
# Evaluation copies (`shortcuts.for_inference`) of the teachers above, made once per teacher.
_FOLDED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
# Logit caches opened in this process, by path: a worker's next trial reuses the device copy.
_CACHES: dict[tuple[str, tuple[int, int, int]], LogitCache] = {}

TeacherFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Teacher:
    """A prepared teacher: trained (once per content key) and cached; `train(teacher=...)` takes it."""

    info: dict[str, Any]  # content key, validation accuracy, mode, arch

    def logits_source(self, config: TrainConfig, splits: data.Splits, device: torch.device
                      ) -> tuple[TeacherFn, dict[str, Any]]:
        """See the module function `logits_source` (`fn(indices, views, x, host=None)`); refuses a config of another teacher."""
        fn, info = logits_source(config, splits, device)
        if info["key"] != self.info["key"]:
            raise ConfigError("the teacher passed to train() was prepared for other kd settings; "
                              "prepare it from the same config.")
        return fn, info


def prepare(config: TrainConfig) -> Teacher | None:
    """Train (once per content key, under a file lock) or load the teacher `config` distils from.

    None when it needs none (no `kd`, or α = 0). This is the step that can take minutes: on the
    CPU it uses every core while the other workers of the host wait on the lock.
    """
    if config.kd is None or config.kd.alpha <= 0:
        return None
    splits = data.load_splits(config.data)
    _, info = load_teacher(config, splits, resolve_device(config.device))
    return Teacher(info)


def teacher_config(config: TrainConfig) -> TrainConfig:
    """The teacher's own training config, derived from a student config with `kd` set.

    Its inputs are normalised as its own weights expect (ImageNet's mean/std for ImageNet
    weights, else the training split's statistics), whatever the student uses, and with that
    one normalisation wherever it is applied: training, its validation, the student's logits.
    The student's augmentation is kept (the teacher sees the student's views).
    """
    kd = config.kd
    if kd is None:
        raise ValueError("teacher_config needs a config with kd settings.")
    probe = kd.teacher.weights != "none"
    return TrainConfig(
        data=dataclasses.replace(
            config.data,
            image_size=kd.teacher_image_size or config.data.image_size,
            train_subset=kd.teacher_train_subset or config.data.train_subset,
            normalize="imagenet" if kd.teacher.weights == "imagenet" else "dataset",
            mean=(),
            std=(),
        ),
        model=dataclasses.replace(kd.teacher, trainable="head" if probe else "all"),
        optim=OptimConfig(lr=kd.teacher_lr, weight_decay=0.0 if probe else 5e-4),
        epochs=kd.teacher_epochs,
        batch_size=kd.teacher_batch_size or config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.data.split_seed,  # one teacher per split, whatever the student's seed
        device=config.device,
        precision=config.precision,
        threads=config.threads,
        cache_dir=config.cache_dir,
    )


def teacher_key(tconfig: TrainConfig, splits: data.Splits) -> str:
    """Content key: the teacher's settings (not where or how fast it runs) and the data's key."""
    spec = to_dict(tconfig)
    for volatile in ("device", "threads", "compile", "eval_batch_size", "cache_dir", "evaluate_test"):
        spec.pop(volatile)
    weights = tconfig.model.weights
    if weights not in ("none", "imagenet"):
        stat = Path(weights).stat()
        spec["weights_file"] = [stat.st_size, stat.st_mtime_ns]
    blob = json.dumps([spec, splits.key], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_teacher(
    config: TrainConfig, splits: data.Splits, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen, eval-mode teacher for `config`, trained now only if no cache holds it."""
    tconfig = resolve_data(teacher_config(config), splits)
    # The precision it trains in is part of what defines it: "auto" keyed as it resolves here.
    tconfig = with_precision(tconfig, device)
    key = teacher_key(tconfig, splits)
    if (key, str(device)) in _LOADED:
        return _LOADED[(key, str(device))]
    folder = cache_root(config) / "teachers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    mode = "linear probe" if tconfig.model.trainable == "head" else "full fine-tune (no pretrained weights)"
    with _waiting_for(folder, key), progress.trial_tag(None, "teacher"):
        stored = _read(path)
        if stored is None:
            log.info("training the teacher %s once (%s, %s, %d epochs); the other workers wait for it",
                     key, tconfig.model.arch, mode, tconfig.epochs)
            t0 = time.perf_counter()
            progress_file = folder / f"{key}.progress.json"
            started = time.time()
            progress.write_build_progress(progress_file, 0, tconfig.epochs, started)

            def report(epoch: int, metrics: dict[str, float]) -> None:
                progress.write_build_progress(progress_file, epoch, tconfig.epochs, started)

            try:
                result = _train_on_all_cores(train, tconfig, device, report)
            finally:
                progress_file.unlink(missing_ok=True)
            stored = {
                "state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
                "val_acc": result.final_val_acc,  # the weights stored are the final ones
                "seconds": time.perf_counter() - t0,
            }
            torch.save(stored, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            # One line per training run, so benchmarks and users can see it ran once.
            with open(folder / f"{key}.runs", "a") as f:
                f.write(f"{time.time():.0f} {stored['seconds']:.1f}s val_acc={stored['val_acc']:.4f}\n")
    shape = input_shape(tconfig, splits)
    model = models.build_model(_no_download(tconfig.model), shape, splits.num_classes)
    model.load_state_dict(stored["state_dict"])
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    info = {"key": key, "val_acc": float(stored["val_acc"]), "mode": mode, "arch": tconfig.model.arch}
    _LOADED[(key, str(device))] = (model, info)
    return model, info


@contextlib.contextmanager
def _waiting_for(folder: Path, key: str) -> Iterator[None]:
    """Hold the teacher's file lock; while another process holds it (building the teacher),
    say so once and leave a `<key>.waiting-<pid>` file, which `kdsweep launch` counts."""
    lock = FileLock(str(folder / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        marker = folder / f"{key}.waiting-{os.getpid()}"
        marker.touch()
        log.info("waiting for the teacher %s, which another worker is building (once for all)", key)
        try:
            lock.acquire()
        finally:
            marker.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.release()


def _train_on_all_cores(train: Callable[..., Any], tconfig: TrainConfig, device: torch.device,
                        report: Callable[[int, dict[str, float]], None] | None = None) -> Any:
    # Every worker of a study needs this teacher and waits on its lock meanwhile, so on CPU the
    # one that trains it takes the idle cores, not its 1/W share; the share is restored after.
    # Only the final weights' validation accuracy is stored, so earlier epochs are not scored.
    if device.type != "cpu":
        return train(tconfig, report=report, validate="last")
    before = torch.get_num_threads()
    try:
        return train(dataclasses.replace(tconfig, threads=max(tconfig.threads or 1, idle_cores())), report=report,
                     validate="last")
    finally:
        torch.set_num_threads(before)


def idle_cores() -> int:
    """This host's cores not busy with other work: cores minus the 1-minute load average, not
    counting one for this process itself (at least 1).

    Only idle cores are worth taking: with more OpenMP threads than free cores each parallel
    region waits for descheduled threads (measured on a 2-core host at load 16: a ResNet-50
    training step took 3 s with 1 thread and 35-53 s with 2).
    """
    cores = cpu_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return max(1, min(cores, int(cores - max(0.0, busy - 1) + 0.5)))


def _no_download(model_cfg):
    # The cached state_dict already holds every weight; don't fetch ImageNet weights again.
    return dataclasses.replace(model_cfg, weights="none")


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or "state_dict" not in stored or "val_acc" not in stored:
            raise ValueError("missing fields")
        return stored
    except Exception as exc:  # never trust a torn or foreign cache file: rebuild it
        log.warning("teacher cache %s is unreadable (%s); rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None


def logits_source(
    config: TrainConfig, splits: data.Splits, device: torch.device
) -> tuple[TeacherFn, dict[str, Any]]:
    """`fn(indices, views, augmented_uint8, host=None) -> teacher logits (B, C) float32` and
    teacher info.

    The teacher sees exactly the augmented view the student sees (Beyer et al. 2022), resized
    to its own input size. With `kd.cache_logits`, logits are cached per (image, view) on disk
    and computed lazily, so no (image, view) pair is ever run through the teacher twice.
    `host`, the ids of `indices` and `views` as CPU tensors, lets the cache find missing pairs
    without reading the device (see `LogitCache.lookup`); without it the ids are read back.
    """
    kd = config.kd
    model, info = load_teacher(config, splits, device)
    folded = _FOLDED.get(model)
    if folded is None:  # BatchNorms folded, small maps as matrix products (a ResNet's copy)
        folded = shortcuts.for_inference(model)
        if folded is not model:
            _FOLDED[model] = folded
    model = folded
    tdata = resolve_data(teacher_config(config), splits).data  # the normalisation it trained with
    image_size = tdata.image_size
    dtype = next(model.parameters()).dtype
    precision = resolve_precision(config.precision, device)

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        inp = data.to_input(x, tdata.mean, tdata.std, image_size=image_size, dtype=dtype,
                            channels=config.data.channels, channels_last=True)
        with autocast(device, precision, training=False):
            return model(inp).float()

    if not kd.cache_logits:
        return (lambda idx, views, x, host=None: forward(x)), {**info, "logit_cache": None}

    d = config.data
    views_n = data.num_views(d.pad, d.flip)
    # The teacher key holds its normalisation (and data); pad and flip define the views.
    cache_key = hashlib.sha256(f"{info['key']}|{d.pad}|{d.flip}|{image_size}".encode()).hexdigest()[:16]
    path = cache_root(config) / "logits" / cache_key
    shape = (len(splits.train_x), views_n, splits.num_classes)
    cache = _CACHES.get((str(path), shape))
    if cache is None:
        cache = _CACHES[(str(path), shape)] = LogitCache(path, *shape)
    train_x = splits.train_x  # CPU; only missing pairs are ever sent to the teacher

    def compute(idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        out = []
        step = eval_batch(config, device)
        for start in range(0, len(idx), step):
            i = idx[start:start + step].cpu()
            v = views[start:start + step].to(device)
            out.append(forward(data.apply_views(train_x[i].to(device), v, d.pad)))
        return torch.cat(out)

    def fn(idx: torch.Tensor, views: torch.Tensor, x: torch.Tensor,
           host: tuple[Any, Any] | None = None) -> torch.Tensor:
        if host is None:
            return cache.get(idx, views, compute)
        return cache.lookup(idx, views, compute, host)

    return fn, {**info, "logit_cache": str(path)}


def preflight(config: TrainConfig, splits: data.Splits) -> str:
    """Check, without training anything, what the teacher of `config` needs; describe it.

    Loads the teacher's data (naming kd.teacher_train_subset, not data.train_subset, when it
    asks for more images than the training split holds) and finds its weights. Raises
    DataError, ModelError or ConfigError with one sentence; returns one line for a header.
    """
    from kdsweep.core.resnets import check_weights, describe_stem

    kd = config.kd
    if kd is None:
        raise ValueError("preflight needs a config with kd settings.")
    tconfig = teacher_config(config)
    key = "kd.teacher_train_subset" if kd.teacher_train_subset else "data.train_subset"
    tsplits = data.load_splits(tconfig.data, names={"train_subset": key})
    tconfig = resolve_data(tconfig, tsplits)
    check_weights(tconfig.model)
    shape = input_shape(tconfig, tsplits)
    mode = "linear probe" if tconfig.model.trainable == "head" else "full fine-tune"
    norm = tconfig.data.normalize + " mean " + "/".join(f"{v:.3f}" for v in tconfig.data.mean)
    norm += " std " + "/".join(f"{v:.3f}" for v in tconfig.data.std)
    return (
        f"{describe_stem(tconfig.model, shape[1])}, weights {tconfig.model.weights}, {mode}, "
        f"{tconfig.epochs} epochs on the first {len(tsplits.train_y)} images of the training "
        f"split (the student has {len(splits.train_y)}), input {'x'.join(map(str, shape))}, "
        f"normalisation {norm}"
    )
