"""`precision`: bf16 autocast in training where the device runs bf16 natively, resolved per host
and stored as it ran; scoring on the CPU in full precision whatever it is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kdsweep.core import devices
from kdsweep.core.config import (
    ConfigError,
    DataConfig,
    KDConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    replace,
    validate,
)
from kdsweep.core.devices import DeviceError, resolve_precision
from kdsweep.core.teacher import teacher_config, teacher_key
from kdsweep.core.train import correctness, resolve, train

CPU = torch.device("cpu")


def tiny_cnn(npz: Path, **kw) -> TrainConfig:
    return TrainConfig(data=DataConfig(dataset=f"npz:{npz}", val_size=200, pad=0, flip=False),
                       model=ModelConfig(arch="cnn", width=8, depth=2), optim=OptimConfig(lr=0.05, warmup=0.0),
                       epochs=2, batch_size=64, device="cpu", threads=1, **kw)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_a_gpu_that_runs_it_natively_and_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                                          native: bool):
    monkeypatch.delenv("KDSWEEP_PRECISION", raising=False)
    monkeypatch.setattr(devices, "_cpu_bf16", lambda: True)  # even where the CPU has bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_the_host_may_choose(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(devices, "_cpu_bf16", lambda: True)
    monkeypatch.setenv("KDSWEEP_PRECISION", "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setenv("KDSWEEP_PRECISION", "bf16")
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"  # a config's explicit choice wins
    monkeypatch.setenv("KDSWEEP_PRECISION", "fp16")
    with pytest.raises(DeviceError, match="KDSWEEP_PRECISION must be fp32 or bf16"):
        resolve_precision("auto", CPU)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="unknown precision 'fp16'; choose auto, fp32 or bf16"):
        validate(TrainConfig(precision="fp16"))


def test_bf16_trains_differently_stores_what_ran_and_scores_in_full_precision(tiny_npz: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDSWEEP_PRECISION", "fp32")
    auto = train(tiny_cnn(tiny_npz))
    assert auto.config.precision == "fp32"  # "auto" is stored as it resolved
    fp32 = train(tiny_cnn(tiny_npz, precision="fp32"))
    bf16 = train(tiny_cnn(tiny_npz, precision="bf16"))
    assert bf16.config.precision == "bf16"
    def learnt(result):
        return [(h["val_acc"], h["train_loss"]) for h in result.history]

    assert learnt(auto) == learnt(fp32)
    assert learnt(bf16)[0][1] != learnt(fp32)[0][1]  # bf16 did run
    assert bf16.final_val_acc > 0.5  # and learnt (chance 0.1)
    # Scoring the bf16-trained model under either precision gives the same per-image answers.
    config = resolve(tiny_cnn(tiny_npz))
    from kdsweep.core import data

    splits = data.load_splits(config.data)
    by = {p: correctness(bf16.model, splits.val_x, splits.val_y, dataclasses.replace(config, precision=p), splits, CPU)
          for p in ("fp32", "bf16")}
    assert torch.equal(by["fp32"], by["bf16"]) and torch.equal(by["bf16"].cpu(), bf16.val_correct)


def test_a_teacher_trained_in_bf16_is_another_teacher():
    config = TrainConfig(data=DataConfig(dataset="fashion-mnist"), kd=KDConfig(alpha=0.5))

    class Splits:
        key = "data"

    keys = {p: teacher_key(teacher_config(replace(config, precision=p)), Splits) for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]
    # Where or how fast it runs is not part of it.
    fast = replace(config, **{"precision": "fp32", "threads": 4, "eval_batch_size": 7})
    assert teacher_key(teacher_config(fast), Splits) == keys["fp32"]
