"""Shared fixtures: Debian's Fashion-MNIST, a tiny learnable npz, and a per-test cache dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def fmnist_available() -> bool:
    """Whether Debian's dataset-fashion-mnist files are installed."""
    return all((FMNIST_DIR / name).is_file() for name in FMNIST_FILES)


@pytest.fixture(scope="session")
def fmnist_dir(fmnist_available: bool) -> Path:
    """Debian's read-only Fashion-MNIST folder (the four IDX .gz files); skips when absent."""
    if not fmnist_available:
        pytest.skip("install Debian's dataset-fashion-mnist")
    return FMNIST_DIR


def make_tiny(
    n: int, rng: np.random.Generator, prototypes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """n 8×8 uint8 images: a class prototype, randomly brightened, plus pixel noise."""
    y = rng.integers(0, len(prototypes), n)
    gain = rng.uniform(0.7, 1.3, (n, 1, 1))
    x = prototypes[y] * gain + rng.normal(0, 80, (n, 8, 8))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny.npz`: 1200 train + 300 test 8×8 grayscale images of 10 classes, fixed seed.

    Each class is a smooth random pattern; images add brightness jitter and strong noise, so it
    is learnable but not saturated: a 64-unit MLP (Adam, lr 3e-3, batch 32, no augmentation)
    reaches about 80% test accuracy after one epoch and about 88% after two (chance is 10%).
    Its patterns are neither shift- nor flip-invariant (pad=1 gives about 40% after two
    epochs): train on it with pad=0 and flip=False.
    """
    rng = np.random.default_rng(0)
    coarse = rng.uniform(64, 192, (10, 4, 4))
    prototypes = coarse.repeat(2, axis=1).repeat(2, axis=2)  # 2×2 blocks: smooth, 8×8
    x, y = make_tiny(1200, rng, prototypes)
    x_test, y_test = make_tiny(300, rng, prototypes)
    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    classes = np.array([f"class{i}" for i in range(10)])
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test, classes=classes)
    return path


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point KDSWEEP_CACHE at a per-test directory so no test writes to ~/.cache."""
    cache = tmp_path / "kdsweep-cache"
    monkeypatch.setenv("KDSWEEP_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def fmnist_teacher(fmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A ResNet50 teacher fine-tuned from scratch on real Fashion-MNIST (no ImageNet weights
    offline), and a ResNet18 student trained alone on the student's budget; built once per session.

    The recipe is the q2 smoke preset's, made cheaper: 16 px instead of 28 (the ImageNet stem
    then leaves 4×4 at layer1), fewer images and epochs. The teacher lives in its own cache
    folder, passed as `cache_dir` because the per-test `tmp_cache` fixture moves KDSWEEP_CACHE.
    Returns the student config (kd set), the teacher's info and both validation accuracies.
    """
    import torch

    from kdsweep.core import data, teacher
    from kdsweep.core.config import (
        DataConfig,
        KDConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        replace,
    )
    from kdsweep.core.train import train

    config = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=300, channels=3, pad=1,
                        image_size=16),
        model=ModelConfig(arch="resnet18", stem="imagenet"),
        optim=OptimConfig(lr=0.1),
        kd=KDConfig(alpha=0.5, temperature=4.0, teacher=ModelConfig(arch="resnet50", stem="imagenet"),
                    teacher_train_subset=1000, teacher_epochs=3, teacher_lr=0.05),
        epochs=2,
        batch_size=50,
        device="cpu",
        threads=1,
        cache_dir=str(tmp_path_factory.mktemp("teacher-cache")),
    )
    splits = data.load_splits(config.data)
    _, info = teacher.load_teacher(config, splits, torch.device("cpu"))
    alone = train(replace(config, kd=None))
    return {"config": config, "teacher": info, "teacher_val_acc": info["val_acc"],
            "student_val_acc": alone.final_val_acc}


@pytest.fixture(autouse=True)
def torch_global_state():
    """Restore torch's process-wide settings after every test (threads, default dtype,
    determinism, matmul precision, grad mode), so no test runs under another's leftovers."""
    saved = (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
             torch.get_float32_matmul_precision(), torch.is_grad_enabled())
    yield
    threads, dtype, deterministic, precision, grad = saved
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_float32_matmul_precision(precision)
    torch.set_grad_enabled(grad)


@pytest.fixture(autouse=True)
def signal_state():
    """Fail a test that leaves the main thread's signal mask or handlers changed, and restore them.

    A blocked SIGINT/SIGTERM is inherited by every process a later test starts (launch, workers,
    the dashboard), which then cannot be stopped: the failure would show far from its cause.
    """
    import signal

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    leaked = signal.pthread_sigmask(signal.SIG_SETMASK, mask) != mask
    changed = [s.name for s, h in handlers.items() if signal.getsignal(s) != h]
    for s, h in handlers.items():
        signal.signal(s, h)
    assert not leaked, "the test left signals blocked in the main thread"
    assert not changed, f"the test left handlers changed: {changed}"
