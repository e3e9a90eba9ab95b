"""GPU-only entries (skipped on a CPU): absolute throughputs, FLOP utilisation, compile reuse and
`--trials-per-device` scaling. No CIFAR-10 is needed: throughput does not depend on pixel
values, so ResNet figures use random uint8 images held as kdsweep holds data (npz -> uint8
tensors on the device), and the scaling study uses Fashion-MNIST.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Clock, Entry, Skip, env, scratch
from benchmarks.workers import STUDY_FILE

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM dense bf16 tensor-core peak


def _require_cuda(device: str) -> None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU (run with --device cuda on a GPU machine)")


def _random_npz(path: Path, n: int, side: int) -> str:
    rng = np.random.default_rng(0)
    # npz images are channels last (N×H×W×C), as numpy users save them
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    np.savez(path, x=x, y=y, x_test=x[:1000], y_test=y[:1000])
    return f"npz:{path}"


def resnet18_train(device: str, quick: bool) -> Entry:
    """ResNet18 (CIFAR stem) at 32x32 through `train()`: images/s of the last epoch and its model
    FLOP utilisation (FlopCounterMode on one fwd+bwd step), for the settings a sweep uses
    (eager, batch 512) and the techniques tried on top, side by side in one run: torch.compile
    (train()'s `compile=True`: Inductor's fused Triton kernels) and a larger batch (1024). Every variant
    keeps what train() always does on CUDA: bf16 autocast, channels_last, data on the device,
    no host sync per step. value = the best variant; the goal is 75,000 images/s on an H100."""
    _require_cuda(device)
    from kdsweep.core import train
    from kdsweep.core.config import DataConfig, ModelConfig, TrainConfig

    n = 10_000 if quick else 50_000
    variants = {
        "eager, batch 512 (as a sweep runs)": {"batch_size": 512},
        "compile, batch 512": {"batch_size": 512, "compile": True},
        "compile, batch 1024": {"batch_size": 1024, "compile": True},
    }
    rates = {}
    with scratch("r18") as tmp:
        dataset = _random_npz(tmp / "r.npz", n, 32)
        for label, change in variants.items():
            cfg = TrainConfig(
                data=DataConfig(dataset=dataset, val_size=1000, pad=4),
                model=ModelConfig(arch="resnet18", weights="none", stem="cifar"),
                epochs=3, device=device, **change,
            )
            result = train.train(cfg)
            rates[label] = {"images_per_s": result.history[-1]["images_per_s"],
                            "epochs": [h["images_per_s"] for h in result.history]}
    best = max(rates, key=lambda k: rates[k]["images_per_s"])
    rate = rates[best]["images_per_s"]
    flops = _train_step_flops(ModelConfig(arch="resnet18", weights="none", stem="cifar"), batch=64, side=32) / 64
    for v in rates.values():
        v["flop_utilisation"] = v["images_per_s"] * flops / 1e12 / H100_BF16_DENSE_TFLOPS
    return Entry(
        name="gpu_resnet18_train_32px", value=rate, unit=f"train images/s ({best})",
        baseline=rates["eager, batch 512 (as a sweep runs)"]["images_per_s"],
        ratio=rate / 75_000, goal=">= 75,000 img/s on an H100 (ratio = value / 75,000)",
        device=torch.cuda.get_device_name(), met=rate >= 75_000,
        details={"technique": best, "variants": rates, "flops_per_image_train": flops,
                 "peak_tflops_assumed": H100_BF16_DENSE_TFLOPS,
                 "compile_mode": "torch.compile default (kdsweep.core.train._compiled)"},
    )


def resnet18_train_224(device: str, quick: bool) -> Entry:
    """The Q2 paper student as a sweep trains it: uint8 32 px images on the device, resized to
    224 px per batch on the device, ResNet18 with the ImageNet stem, batch 256, through
    `train()`: images/s of the last epoch and FLOP utilisation at 224 px."""
    _require_cuda(device)
    from kdsweep.core import train
    from kdsweep.core.config import DataConfig, ModelConfig, TrainConfig

    n = 3000 if quick else 12_000
    model = ModelConfig(arch="resnet18", weights="none", stem="imagenet")
    with scratch("r18-224") as tmp:
        cfg = TrainConfig(
            data=DataConfig(dataset=_random_npz(tmp / "r.npz", n, 32), val_size=500, image_size=224, pad=2),
            model=model, epochs=2, batch_size=256, device=device,
        )
        result = train.train(cfg)
    rate = result.history[-1]["images_per_s"]
    flops = _train_step_flops(model, batch=8, side=224) / 8
    util = rate * flops / 1e12 / H100_BF16_DENSE_TFLOPS
    return Entry(
        name="gpu_resnet18_train_224px", value=rate, unit="train images/s", baseline=None, ratio=util,
        goal="record (ratio = FLOP utilisation of dense bf16 peak)", device=torch.cuda.get_device_name(),
        met=None,
        details={"flops_per_image_train": flops, "flop_utilisation": util, "batch_size": 256,
                 "epochs": [h["images_per_s"] for h in result.history],
                 "setting": "32 -> 224 px bilinear resize on the device, ImageNet stem, bf16, channels_last"},
    )


def _train_step_flops(model_cfg, batch: int, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from kdsweep.core import models

    model = models.build_model(model_cfg, (3, side, side), 10)
    x = torch.randn(batch, 3, side, side)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def resnet50_teacher(device: str, quick: bool) -> Entry:
    """ResNet50 teacher inference at 224 px as the logit cache runs it: uint8 32 px batch on the
    device -> to_input (resize to 224) -> bf16 autocast, channels_last, no grad."""
    _require_cuda(device)
    from kdsweep.core import data, models
    from kdsweep.core.config import ModelConfig
    from kdsweep.core.devices import autocast, resolve_precision

    dev = torch.device(device)
    model = models.build_model(ModelConfig(arch="resnet50", weights="none", stem="imagenet"),
                               (3, 224, 224), 10).to(dev).eval().to(memory_format=torch.channels_last)
    batch = 256
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    steps = 10 if quick else 40
    with torch.no_grad():
        for i in range(steps + 5):
            if i == 5:
                clock = Clock(cuda_sync=True)
            inp = data.to_input(x, mean, std, image_size=224, channels_last=True)
            with autocast(dev, resolve_precision("auto", dev), training=False):
                model(inp)
        seconds = clock()
    rate = steps * batch / seconds
    flops = _forward_flops(model, dev)
    return Entry(
        name="gpu_resnet50_teacher_224px", value=rate, unit="inference images/s",
        baseline=None, ratio=None, goal="record", device=torch.cuda.get_device_name(), met=None,
        details={"batch": batch, "flops_per_image": flops,
                 "flop_utilisation": rate * flops / 1e12 / H100_BF16_DENSE_TFLOPS},
    )


def _forward_flops(model, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, 224, 224, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2


def compile_reuse(device: str, quick: bool) -> Entry:
    """Two trials of one process with compile=True: the second should not compile again."""
    _require_cuda(device)
    from kdsweep.core import train
    from kdsweep.core.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=5000, train_subset=10_000, pad=2),
        model=ModelConfig(arch="cnn", budget=1_000_000, depth=2, width=64, regularizer="dropout", rate=0.1),
        epochs=1, batch_size=512, device=device, compile=True,
    )
    first = train.train(cfg).wall_time
    second = train.train(cfg).wall_time
    plain = train.train(dataclasses.replace(cfg, compile=False)).wall_time
    return Entry(
        name="gpu_compile_reuse", value=second, unit="s, 2nd compiled trial", baseline=first,
        ratio=second / first, goal="2nd trial << 1st (no recompile)", device=torch.cuda.get_device_name(),
        met=second < 0.5 * first, details={"first_compiled_s": first, "eager_s": plain},
    )


def trials_per_device(device: str, quick: bool) -> Entry:
    """K workers on one GPU (what `kdsweep launch --trials-per-device K` plans): trial throughput
    for K = 1, 2, 4 against K = 1, and how many trials really overlapped."""
    _require_cuda(device)
    import optuna

    from kdsweep.service import launch
    from kdsweep.service import spec as studies
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep

    per = 2 if quick else 3
    out = {}
    with scratch("tpd") as tmp:
        for k in (1, 2, 4):
            name = f"tpd{k}-{uuid.uuid4().hex[:6]}"
            url = f"sqlite:///{tmp / (name + '.db')}"
            study = Sweep.create(open_storage(url), studies.load(str(STUDY_FILE)), "gpu", name, per * k, seed=0)
            with env(KDSWEEP_CACHE=str(tmp / "cache"), CUDA_VISIBLE_DEVICES="0"):
                plans = launch.plan_workers(k, "cuda", url)
            assert len({p.env["CUDA_VISIBLE_DEVICES"] for p in plans}) == 1
            args = [str(STUDY_FILE), "--study-name", name, "--no-tensorboard",
                    "--artifacts", str(tmp / name)]
            t0 = time.perf_counter()
            launch.run(study, args, plans, lambda line: None, poll=0.5)
            done = [t for t in optuna.load_study(study_name=name, storage=open_storage(url)).trials
                    if t.state == optuna.trial.TrialState.COMPLETE]
            span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            out[k] = {"trials_per_hour": 3600 * len(done) / span, "trials": len(done),
                      "max_concurrent": _max_overlap(done), "wall_s": time.perf_counter() - t0}
    base = out[1]["trials_per_hour"]
    best = max(out, key=lambda k: out[k]["trials_per_hour"])
    return Entry(
        name="gpu_trials_per_device", value=out[best]["trials_per_hour"],
        unit=f"trials/hour at K={best}", baseline=base, ratio=out[best]["trials_per_hour"] / base,
        goal="> 1 (K trials at once beat one)", device=torch.cuda.get_device_name(),
        met=out[best]["trials_per_hour"] / base > 1,
        details={f"K={k}": {**v, "speedup": v["trials_per_hour"] / base} for k, v in out.items()},
    )


def _max_overlap(trials) -> int:
    events = sorted([(t.datetime_start, 1) for t in trials] + [(t.datetime_complete, -1) for t in trials])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak
