"""No step of a KD run reads from the device: host syncs per run do not grow with the steps.

On the CPU every device-to-host read goes through a few Tensor methods (`.cpu()`, `.item()`,
`.numpy()`, `.tolist()`, bool/float/int conversion); they are counted over two runs that differ
only in the number of steps per epoch (10 vs 20, the same images and epochs), so every call
that happens once per epoch or per run (the epoch's loss, evaluation) cancels out. On CUDA the
same comparison counts torch.cuda.set_sync_debug_mode warnings (skipped without a GPU).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdsweep.core import teacher
from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.core.train import train

READS = ("cpu", "item", "numpy", "tolist", "__bool__", "__float__", "__int__")


def kd_run(npz: Path, cache: Path, batch_size: int, device: str = "cpu") -> TrainConfig:
    """640 images, no augmentation (one view): a first run fills the whole logit cache."""
    return TrainConfig(
        data=DataConfig(dataset=f"npz:{npz}", val_size=200, train_subset=640, pad=0, flip=False),
        model=ModelConfig(arch="mlp", hidden=(32,)),
        optim=OptimConfig(lr=0.05, warmup=0.0),
        kd=KDConfig(alpha=0.5, temperature=4.0, teacher=ModelConfig(arch="mlp", hidden=(32,)),
                    teacher_epochs=1, teacher_train_subset=640),
        epochs=1, batch_size=batch_size, device=device, threads=1, cache_dir=str(cache),
    )


def run(config: TrainConfig):
    return train(config, teacher=teacher.prepare(config))


def count_reads(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Counter:
    calls: Counter = Counter()
    prepared = teacher.prepare(config)  # loading the teacher is not a training step
    with monkeypatch.context() as m:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        train(config, teacher=prepared)
    return calls


def test_kd_steps_make_no_host_reads_on_cpu(tiny_npz: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    ten, twenty = kd_run(tiny_npz, tmp_path, 64), kd_run(tiny_npz, tmp_path, 32)
    for cfg in (ten, twenty):  # teachers trained and the logit cache filled: the steady state
        run(cfg)
    teacher._LOADED.clear()
    reads_10 = count_reads(ten, monkeypatch)
    teacher._LOADED.clear()
    reads_20 = count_reads(twenty, monkeypatch)
    extra = reads_20 - reads_10
    assert not extra, f"10 more steps made {dict(extra)} more host reads ({dict(reads_20)} in all)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kd_steps_make_no_cuda_syncs(tiny_npz: Path, tmp_path: Path):
    ten, twenty = kd_run(tiny_npz, tmp_path, 64, "cuda"), kd_run(tiny_npz, tmp_path, 32, "cuda")
    for cfg in (ten, twenty):
        run(cfg)

    def syncs(cfg: TrainConfig) -> list[str]:
        prepared = teacher.prepare(cfg)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(cfg, teacher=prepared)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]

    at_10, at_20 = syncs(ten), syncs(twenty)
    extra = Counter(at_20) - Counter(at_10)
    assert not extra, f"10 more steps made these extra syncs: {dict(extra)}"
