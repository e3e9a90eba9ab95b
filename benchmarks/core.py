"""`core_vs_reference`: kdsweep's training core against a plain torchvision DataLoader loop.

Both sides train the same Q1 CNN (built by `kdsweep.core.models.build_model` from the same resolved
config) on the same Fashion-MNIST training subset with the same batch size, epochs, optimizer,
augmentation (random crop with zero padding + horizontal flip), precision and memory format.
The reference is what a researcher would write: `torchvision.datasets.FashionMNIST` read from
its raw files, per-sample `transforms` (RandomCrop, RandomHorizontalFlip, ToTensor, Normalize),
a `DataLoader` with num_workers = cores, pinned memory on CUDA and persistent workers.
Only training epochs are timed on both sides (kdsweep's `images_per_s` excludes evaluation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import Clock, Entry, cores, mean_std, scratch, torchvision_fmnist_root
from kdsweep.core import data as kdata
from kdsweep.core import models
from kdsweep.core import train as ktrain
from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.core.devices import autocast, resolve_precision


@dataclass(frozen=True)
class Sizes:
    train_subset: int
    epochs: int
    batch_size: int
    budget: int
    width: int
    repeats: int  # side-by-side pairs; the ratio is taken per pair, then averaged


CPU = Sizes(train_subset=4_000, epochs=2, batch_size=256, budget=30_000, width=16, repeats=2)
CPU_QUICK = Sizes(train_subset=1_000, epochs=1, batch_size=128, budget=30_000, width=16, repeats=1)
# The Q1 paper budget (1M parameters) on the GPU, where a small CNN cannot hide data loading.
GPU = Sizes(train_subset=50_000, epochs=3, batch_size=512, budget=1_000_000, width=64, repeats=2)
GPU_QUICK = Sizes(train_subset=10_000, epochs=1, batch_size=512, budget=1_000_000, width=64, repeats=1)


def config(sizes: Sizes, device: str) -> TrainConfig:
    """The Q1 CNN setting both sides train: dropblock CNN at the matched budget."""
    return TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=5000, train_subset=sizes.train_subset, pad=2),
        model=ModelConfig(arch="cnn", budget=sizes.budget, depth=2, width=sizes.width,
                          regularizer="dropblock", rate=0.1, block_size=3),
        optim=OptimConfig(lr=0.05, weight_decay=5e-4),
        epochs=sizes.epochs,
        batch_size=sizes.batch_size,
        device=device,
        seed=0,
    )


def kdsweep_rate(cfg: TrainConfig) -> float:
    """Training images/s of `train()` (evaluation excluded by the core itself)."""
    return ktrain.train(cfg).images_per_s


def reference_rate(cfg: TrainConfig, root: str) -> float:
    """Training images/s of the plain PyTorch loop a researcher would write."""
    from torchvision import datasets, transforms

    device = torch.device(cfg.device)
    splits = kdata.load_splits(cfg.data)  # only for the mean/std and the same resolved model
    resolved = ktrain.resolve(cfg, splits)
    in_shape = ktrain.input_shape(resolved, splits)
    side = in_shape[-1]
    tf = transforms.Compose([
        transforms.RandomCrop(side, padding=cfg.data.pad),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(splits.mean, splits.std),
    ])
    full = datasets.FashionMNIST(root, train=True, transform=tf, download=False)
    subset = torch.utils.data.Subset(full, list(range(cfg.data.train_subset)))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=cfg.batch_size, shuffle=True, num_workers=cores(),
        pin_memory=device.type == "cuda", persistent_workers=True, drop_last=False,
    )
    torch.manual_seed(cfg.seed)
    model = models.build_model(resolved.model, in_shape, splits.num_classes).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True,
    )
    total = len(loader) * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, total_steps=total)
    images, seconds, step = 0, 0.0, 0
    for _ in range(cfg.epochs):
        model.train()
        clock = Clock(cuda_sync=device.type == "cuda")
        for x, y in loader:
            models.set_progress(model, step / total, resolved.model)
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, resolve_precision(resolved.precision, device)):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        loss.item()
        seconds += clock()
        images += len(subset)
    del loader
    return images / seconds


def run(device: str, quick: bool) -> Entry:
    """Alternate kdsweep and the reference `repeats` times; ratio = mean of per-pair ratios."""
    gpu = device.startswith("cuda")
    sizes = (GPU_QUICK if quick else GPU) if gpu else (CPU_QUICK if quick else CPU)
    cfg = config(sizes, device)
    ours, ref, ratios = [], [], []
    with scratch("core") as tmp:
        root = str(torchvision_fmnist_root(tmp))
        start = time.perf_counter()
        for _ in range(sizes.repeats):
            a = kdsweep_rate(cfg)
            b = reference_rate(cfg, root)
            ours.append(a)
            ref.append(b)
            ratios.append(a / b)
    r, r_std = mean_std(ratios)
    goal = 3.0 if gpu else 1.0
    return Entry(
        name="core_vs_reference", value=mean_std(ours)[0], unit="train images/s",
        baseline=mean_std(ref)[0], ratio=r, goal=f">= {goal:g}", device=device,
        met=r >= goal,
        details={
            "ratio_std": r_std, "kdsweep_images_per_s": ours, "reference_images_per_s": ref,
            "model": f"Q1 CNN, budget {sizes.budget:,}, width {sizes.width}, dropblock",
            "data": f"Fashion-MNIST, {sizes.train_subset} training images, pad 2 + flip",
            "epochs": sizes.epochs, "batch_size": sizes.batch_size,
            "reference_loader": f"torchvision FashionMNIST + per-sample transforms, "
                                f"num_workers={cores()}, pin_memory={gpu}, persistent_workers",
            "seconds": round(time.perf_counter() - start, 1),
            "torch_threads": torch.get_num_threads(),
            "note": None if not math.isnan(r) else "no measurement",
        },
    )
