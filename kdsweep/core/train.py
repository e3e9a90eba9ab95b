"""The training core: one function, `train(config, report)`, shared by every study and worker.

It knows nothing of Optuna. A caller that wants pruning passes `report`, which is called after
every epoch and may raise to stop training at once (the exception propagates unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kdsweep.core import budget, data, models, progress, shortcuts
from kdsweep.core.config import ConfigError, TrainConfig, validate
from kdsweep.core.devices import autocast, resolve_device, resolve_precision, set_threads
from kdsweep.core.distill import at_least_float32, kd_loss

log = logging.getLogger("kdsweep.core.train")

Report = Callable[[int, dict[str, float]], None]


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the trial should be failed."""


class Stopped(KeyboardInterrupt):
    """train() was asked to stop through its `stop` event (a KeyboardInterrupt, like Ctrl-C)."""


# Set while a train() given a `stop` event is in its epoch loop, where it checks the event
# before every batch. A signal handler reads it: there, setting the event is enough, and an
# exception raised from the handler (which can land anywhere, even inside a library's cleanup)
# is needed only outside the loop, e.g. while a teacher is built.
_POLLING = threading.Event()


def polling_stop() -> bool:
    """Whether a running train() will notice its `stop` event before its next batch."""
    return _POLLING.is_set()


@contextlib.contextmanager
def _polling(stop: threading.Event | None) -> Iterator[None]:
    if stop is None:
        yield
        return
    _POLLING.set()
    try:
        yield
    finally:
        _POLLING.clear()


@dataclass
class TrainResult:
    config: TrainConfig  # the fully resolved config (budget solved, block sizes adapted)
    final_val_acc: float  # validation accuracy after the last epoch run, in [0, 1]
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    params: int  # trainable parameters of the student
    param_split: dict[str, int]
    wall_time: float  # seconds, whole call including data and teacher preparation
    images_per_s: float  # training images per second over the epochs run (excludes evaluation)
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    test_acc: float | None = None
    teacher: dict[str, Any] | None = None  # content key, validation accuracy, mode
    model: nn.Module | None = field(default=None, repr=False)
    # Per validation image (in split order), whether the last epoch run classified it right:
    # bool, CPU. Trials scored on the same images compare paired (kdsweep/service/stats.py).
    # None when every epoch came from a checkpoint.
    val_correct: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (no model, no config)."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("model", "config", "history", "val_correct")
        }


def cache_root(config: TrainConfig) -> Path:
    """Where teacher probes and logit caches live: config, then $KDSWEEP_CACHE, then ~/.cache."""
    root = config.cache_dir or os.environ.get("KDSWEEP_CACHE") or "~/.cache/kdsweep"
    return Path(root).expanduser()


def input_shape(config: TrainConfig, splits: data.Splits) -> tuple[int, int, int]:
    """(C, H, W) of what the network sees after channel conversion and per-batch resizing."""
    c, h, w = splits.in_shape
    size = config.data.image_size
    return (config.data.channels or c, size or h, size or w)


def resolve(config: TrainConfig, splits: data.Splits | None = None) -> TrainConfig:
    """Fill in what is computed rather than chosen: the matched-budget widths, DropBlock sizes,
    the dataset's default augmentation (`data.pad`, `data.flip`) and the input normalisation
    (`data.normalize`, `data.mean`, `data.std`; see `resolve_data`)."""
    config = validate(config)
    splits = splits if splits is not None else data.load_splits(config.data)
    if isinstance(splits, data.Splits):
        config = resolve_data(config, splits)
    else:  # a data.Shape (a dry run reads no images): augmentation only; statistics need the images
        config = dataclasses.replace(config, data=data.with_augmentation(config.data, splits))
    if config.model.arch in ("mlp", "cnn") and config.model.budget:
        model_cfg = budget.resolve(config.model, input_shape(config, splits), splits.num_classes)
        config = dataclasses.replace(config, model=model_cfg)
    return config


def with_precision(config: TrainConfig, device: torch.device) -> TrainConfig:
    """`config` with `precision` as it runs on `device` (`devices.resolve_precision`): what
    train() trains in and a trial stores, so an exported config trains alike."""
    return dataclasses.replace(config, precision=resolve_precision(config.precision, device))


def resolve_data(config: TrainConfig, splits: data.Splits) -> TrainConfig:
    """`config` with augmentation and normalisation set (values already given are kept).

    normalize "auto" becomes "imagenet" when the network starts from ImageNet weights (they
    expect ImageNet's mean/std, read from torchvision's weights metadata), else "dataset" (the
    training split's per-channel statistics, shared by all its subsets).
    """
    d = data.with_augmentation(config.data, splits)
    kind = d.normalize
    if kind == "auto":
        kind = "imagenet" if config.model.weights == "imagenet" else "dataset"
    if not d.mean:
        from kdsweep.core.resnets import imagenet_normalization

        mean, std = imagenet_normalization(config.model.arch) if kind == "imagenet" else (splits.mean, splits.std)
        if len(mean) == 3 and (d.channels or splits.in_shape[0]) == 1:  # grey into a 1-channel conv1
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        d = dataclasses.replace(d, mean=mean, std=std)
    return dataclasses.replace(config, data=dataclasses.replace(d, normalize=kind))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying BatchNorm scales and biases only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    o = config.optim
    # fused: one kernel per parameter for the whole update; the default on the CPU is a loop of
    # separate ops per parameter (~15 ms of a ~130 ms ResNet-18 step at 28 px, batch 25).
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.momentum > 0,
        fused=bool(params) and all(p.device.type in ("cpu", "cuda") for p in params),
    )


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` of `total` (linear warm-up, then decay)."""
    warm = max(1, int(total * warmup)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def eval_batch(config: TrainConfig, device: torch.device) -> int:
    """Images per evaluation forward: `config.eval_batch_size`, else 1024 on CUDA and 256 on the
    CPU, where a batch's activations then stay in cache (one thread, 28 px: q2's ResNet-18
    scores 1.12x and its ResNet-50 1.09x faster than in batches of 1024)."""
    return config.eval_batch_size or (1024 if device.type == "cuda" else 256)


@torch.inference_mode()
def correctness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    splits: data.Splits,
    device: torch.device,
) -> torch.Tensor:
    """Per image of uint8 `x`, whether top-1 is right: a bool tensor on `device`, in order.

    Inference mode, channels_last input, a ResNet's BatchNorms folded into its convolutions
    (`shortcuts.for_inference`, a copy: `model` itself is only switched to eval mode): every
    image's top-1 as on the default layout with the layers unfolded. Full precision on the CPU
    whatever `config.precision` (bf16 on CUDA where it resolves to bf16)."""
    model.eval()
    model = shortcuts.for_inference(model)
    precision = resolve_precision(config.precision, device)
    out = []
    for idx in data.batch_indices(len(x), eval_batch(config, device), None, shuffle=False):
        idx = idx.to(x.device)
        inp = _to_input(x[idx].to(device, non_blocking=True), config, splits, device, channels_last=True)
        with autocast(device, precision, training=False):
            logits = model(inp)
        out.append(logits.argmax(1) == y[idx].to(device))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=device)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    splits: data.Splits,
    device: torch.device,
) -> float:
    """Top-1 accuracy in [0, 1] over uint8 images `x`, in large batches without autograd."""
    return correctness(model, x, y, config, splits, device).sum().item() / max(1, len(x))


def epoch_order(n: int, pad: int, flip: bool, index_gen: torch.Generator,
                view_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's image order (a permutation of range(n)) and a view id per position, on the
    host: the same draws as `data.batch_indices` and per-batch `data.sample_views` made."""
    order = torch.randperm(n, generator=index_gen)
    return order, data.sample_views(n, pad, flip, view_gen)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait (pinned, non-blocking)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


_NORM: dict[tuple[tuple[float, ...], tuple[float, ...], str], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_on(mean: Sequence[float], std: Sequence[float], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    # The normalisation's mean and std as tensors on the device, made once: built from Python
    # floats at every step they would be a host-to-device copy, which synchronises on CUDA.
    key = (tuple(mean), tuple(std), str(device))
    if key not in _NORM:
        _NORM[key] = (torch.tensor(key[0], device=device), torch.tensor(key[1], device=device))
    return _NORM[key]


def _to_input(x: torch.Tensor, config: TrainConfig, splits: data.Splits, device: torch.device,
              image_size: int | None = None, channels_last: bool | None = None) -> torch.Tensor:
    # The config's normalisation (resolved: the dataset's or the pretrained weights' own).
    # channels_last: on CUDA; on the CPU for inference only (oneDNN ~1.8x faster, a ResNet-18
    # at 28 px on one thread; no faster for training there).
    mean, std = _norm_on(config.data.mean or splits.mean, config.data.std or splits.std, device)
    return data.to_input(
        x,
        mean,
        std,
        image_size=image_size or config.data.image_size,
        channels=config.data.channels,
        dtype=torch.get_default_dtype(),  # float32, or float64 where a test checks rounding
        channels_last=device.type == "cuda" if channels_last is None else channels_last,
    )


def _compiled(model: nn.Module) -> nn.Module:
    """torch.compile `model`; Dynamo keys compiled code on the forward's code object, so a later
    trial's fresh model of the same class and shapes reuses it (checked in benchmarks/gpu.py).
    A sweep meets many shapes (widths, regularisers) in one worker: past Dynamo's default limit
    of 8 variants it would silently fall back to eager, so the limit is raised."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` whole or not at all; TrainingError (saying why) if it cannot."""
    # Write then rename, so a worker killed mid-write never leaves a torn checkpoint behind,
    # and a write that fails (a full disk, a stop) leaves no temporary file either.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        free = shutil.disk_usage(path.parent).free
        why = ("its disk is full" if getattr(exc, "errno", None) == errno.ENOSPC or free < 16 << 20
               else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise TrainingError(
            f"cannot write the checkpoint {path}: {why} ({free >> 20} MiB free); free space there "
            "or point --artifacts at another disk."
        ) from None


def _load_checkpoint(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over rather than trust it
        log.warning("ignoring unreadable checkpoint %s (%s); starting from epoch 0", path, exc)
        return None


def build_student(config: TrainConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """`config.model` initialised in float32 whatever the default dtype (float64 runs, the
    tests' rounding yardstick, start from the same weights upcast)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = models.build_model(config.model, in_shape, num_classes)
    finally:
        torch.set_default_dtype(dtype)
    return model.to(dtype)


class TeacherSource(Protocol):
    """A prepared teacher (`kdsweep.core.teacher.prepare`): gives logits for training batches."""

    def logits_source(self, config: TrainConfig, splits: data.Splits, device: torch.device
                      ) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """`fn(indices, views, augmented_uint8, host=None) -> logits (B, C) float32` and info;
        `host`, CPU copies of (indices, views), lets a logit cache skip reading the device."""
        ...


def train(
    config: TrainConfig,
    report: Report | None = None,
    checkpoint: str | Path | None = None,
    stop: threading.Event | None = None,
    teacher: TeacherSource | None = None,
    *,
    data_seed: int | None = None,
    validate: str = "every",
) -> TrainResult:
    """Train `config.model` on `config.data`, distilling from `teacher` when `config.kd` is set.

    A KD config (α > 0) needs its teacher prepared first and passed in:
    `train(config, teacher=kdsweep.core.teacher.prepare(config))`. Preparing may train the
    teacher (minutes, every core, under a file lock); `train` itself never does.

    After each epoch `report(epoch, metrics)` is called (epochs count from 1) with at least
    `val_acc` (validation accuracy in [0, 1]), `train_loss`, `lr`, `images_per_s`, `seconds`.
    If `report` raises, training stops and the exception propagates.

    With `stop`, training raises Stopped before the next batch once the event is set (how a
    worker asked to stop by a signal leaves its trial cleanly, between two optimiser steps).

    With `checkpoint`, the state after every epoch is written there, and a call that finds a
    checkpoint resumes after its last epoch (used to resume trials of dead workers); epochs
    already run are not reported again.

    `data_seed` seeds batch order and augmentation instead of `config.seed` (which then seeds
    the initialisation only): how a fused group's members are reproduced one at a time
    (kdsweep/core/fused.py).

    `validate="last"` scores the validation split after the last epoch only (earlier epochs
    have no `val_acc`; the weights are the same): how a teacher is built.

    Raises TrainingError when the loss stops being finite. The same config and seed give the
    same result twice on CPU. No step reads from the device: `train_loss` and the NaN check
    sync once per epoch.
    """
    if validate not in ("every", "last"):
        raise ValueError(f"validate must be 'every' or 'last', got {validate!r}.")
    start = time.perf_counter()
    set_threads(config.threads)
    device = resolve_device(config.device)
    splits = data.load_splits(config.data)
    config = resolve(config, splits)
    config = with_precision(config, device)
    in_shape = input_shape(config, splits)

    torch.manual_seed(config.seed)
    model = build_student(config, in_shape, splits.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = _compiled(model) if config.compile and device.type == "cuda" else model
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    teacher_fn = None
    teacher_info = None
    if config.kd is not None and config.kd.alpha > 0:
        if teacher is None:
            raise ConfigError(
                "this config distils from a teacher (kd.alpha > 0): prepare it first with "
                "kdsweep.core.teacher.prepare(config) and pass it as train(..., teacher=...)."
            )
        teacher_fn, teacher_info = teacher.logits_source(config, splits, device)

    train_x = splits.train_x.to(device)
    train_y = splits.train_y.to(device)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = _optimizer(model, config)
    o = config.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, o.warmup, o.schedule)
    )
    # Batch order and views are drawn on the host, a whole epoch at a time, and copied to the
    # device once: the host then knows every batch's ids (the logit cache finds missing pairs
    # there) and a step never waits for the device.
    gen = torch.Generator().manual_seed(data_seed if data_seed is not None else config.seed)
    index_gen = torch.Generator().manual_seed((data_seed if data_seed is not None else config.seed) + 1)

    history: list[dict[str, float]] = []
    val_correct: torch.Tensor | None = None
    first_epoch = 1
    ckpt_path = Path(checkpoint) if checkpoint else None
    state = _load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["gen"])
        index_gen.set_state(state["index_gen"])
        history = list(state["history"])
        first_epoch = int(state["epoch"]) + 1
        log.info("resumed from %s after epoch %d", ckpt_path, first_epoch - 1)

    d = config.data
    train_images = 0
    train_seconds = 0.0
    with _polling(stop):  # a stop request is honoured between two batches from here on
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)
            order, views_all = epoch_order(n, d.pad, d.flip, index_gen, gen)
            order_dev, views_dev = to_device(order, device), to_device(views_all, device)
            host_order, host_views = order.numpy(), views_all.numpy()  # once per epoch
            batches = progress.track(range(steps_per_epoch), steps_per_epoch,
                                     f"{config.model.arch} epoch {epoch}/{config.epochs}", "batch")
            for i in batches:  # a bar on a terminal (KD: includes filling the logit cache)
                if stop is not None and stop.is_set():
                    raise Stopped()
                models.set_progress(model, ((epoch - 1) * steps_per_epoch + i) / total_steps, config.model)
                rows = slice(i * config.batch_size, (i + 1) * config.batch_size)
                idx, views = order_dev[rows], views_dev[rows]
                x = data.apply_views(train_x[idx], views, d.pad)
                with autocast(device, config.precision):
                    logits = step_model(_to_input(x, config, splits, device))
                if teacher_fn is not None:
                    t_logits = teacher_fn(idx, views, x, (host_order[rows], host_views[rows]))
                    loss = kd_loss(logits, t_logits, train_y[idx], config.kd.alpha, config.kd.temperature,
                                   label_smoothing=o.label_smoothing)
                else:
                    loss = F.cross_entropy(at_least_float32(logits), train_y[idx],
                                           label_smoothing=o.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
            train_loss = loss_sum.item() / steps_per_epoch  # one sync per epoch, not per step
            if not math.isfinite(train_loss):
                raise TrainingError(f"the training loss became {train_loss} in epoch {epoch}.")
            seconds = time.perf_counter() - epoch_start
            train_images += n
            train_seconds += seconds
            metrics: dict[str, float] = {"epoch": epoch}
            if validate == "every" or epoch == config.epochs:
                val_correct = correctness(model, splits.val_x, splits.val_y, config, splits, device)
                metrics["val_acc"] = val_correct.sum().item() / max(1, len(val_correct))
            metrics.update({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                            "images_per_s": n / seconds, "seconds": time.perf_counter() - epoch_start})
            history.append(metrics)
            log.info("epoch %d/%d val_acc %.4f loss %.4f (%.0f img/s)",
                     epoch, config.epochs, metrics.get("val_acc", math.nan), train_loss, n / seconds)
            # Report first, then checkpoint: a worker killed in between re-runs this epoch from the
            # previous checkpoint (and re-reports the same value), whereas the other order could
            # resume past an epoch whose value was never reported.
            if report is not None:
                report(epoch, metrics)
            # Not after the last epoch: the caller is about to finish the trial and delete it, and
            # writing a ResNet's weights and momentum costs ~0.1 s of dead time between trials.
            if ckpt_path is not None and epoch < config.epochs:
                _save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "gen": gen.get_state().cpu(),
                    "index_gen": index_gen.get_state(), "history": history, "epoch": epoch,
                })

    best = max((h for h in history if "val_acc" in h), key=lambda h: h["val_acc"])
    test_acc = None
    if config.evaluate_test:
        test_acc = evaluate(model, splits.test_x, splits.test_y, config, splits, device)
    return TrainResult(
        config=config,
        final_val_acc=history[-1]["val_acc"],
        best_val_acc=best["val_acc"],
        best_epoch=int(best["epoch"]),
        epochs_run=len(history),
        params=params,
        param_split=models.param_split(model),
        wall_time=time.perf_counter() - start,
        images_per_s=train_images / train_seconds if train_seconds else 0.0,
        device=str(device),
        history=history,
        test_acc=test_acc,
        teacher=teacher_info,
        model=model,
        val_correct=val_correct.cpu() if val_correct is not None else None,
    )
