"""train(): end to end on real Fashion-MNIST, reports, determinism, checkpoints, odd inputs."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.core.models import dropblock_sizes
from kdsweep.core.train import Stopped, TrainingError, polling_stop, resolve, train


def tiny(npz: Path, **kw) -> TrainConfig:
    """A seconds-long run on the 8×8 tiny npz (see conftest): no shifts or flips, it has none."""
    base = {
        "data": DataConfig(dataset=f"npz:{npz}", val_size=200, pad=0, flip=False),
        "model": ModelConfig(arch="mlp", hidden=(64,)),
        "optim": OptimConfig(lr=0.05, warmup=0.0),
        "epochs": 3,
        "batch_size": 64,
        "device": "cpu",
        "threads": 1,
    }
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    """What a pruning report raises in these tests."""


@pytest.fixture(scope="module")
def fmnist_cnn(fmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Q1 CNN (budget 10k) trained twice on the same real Fashion-MNIST subset, 1 thread."""
    cfg = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=1000, pad=2),
        model=ModelConfig(arch="cnn", budget=10_000, width=8, regularizer="dropout", rate=0.1),
        optim=OptimConfig(lr=0.1),
        epochs=3,
        batch_size=64,
        device="cpu",
        threads=1,  # tiny convolutions gain nothing from more, and CI's cores are shared
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    reports: list[tuple[int, dict[str, float]]] = []
    first = train(cfg, report=lambda epoch, m: reports.append((epoch, m)))
    second = train(cfg)
    return cfg, first, second, reports


def test_cnn_on_fashion_mnist_ends_clearly_above_chance(fmnist_cnn):
    _, first, _, reports = fmnist_cnn
    assert first.final_val_acc > 0.5  # chance is 0.1; about 0.65 measured
    assert [epoch for epoch, _ in reports] == [1, 2, 3]
    for _, metrics in reports:
        assert {"val_acc", "train_loss", "lr", "images_per_s", "seconds"} <= set(metrics)
        assert 0.0 <= metrics["val_acc"] <= 1.0


def test_result_fields(fmnist_cnn):
    cfg, first, _, reports = fmnist_cnn
    assert first.epochs_run == 3 == len(first.history)
    assert first.final_val_acc == reports[-1][1]["val_acc"]
    assert first.best_val_acc == max(m["val_acc"] for _, m in reports)
    assert first.best_val_acc >= first.final_val_acc
    assert first.history[first.best_epoch - 1]["val_acc"] == first.best_val_acc
    assert abs(first.params - 10_000) <= 100  # the matched budget, within 1%
    split = first.param_split
    assert split["total"] == first.params == split["conv"] + split["head"]
    assert split["conv"] > 5 * split["head"]  # a CNN: its parameters sit in the convolutions
    assert first.wall_time > 0 and first.images_per_s > 0
    assert first.device == "cpu" and first.test_acc is None and first.teacher is None
    summary = first.summary()
    assert "model" not in summary and summary["params"] == first.params


def test_resolved_config_records_dropblock_block_sizes(fmnist_cnn):
    cfg, first, _, _ = fmnist_cnn
    used = first.config.model
    assert used.channels and used.channels[0] == 8 and used.block_sizes == ()
    # resolve() is what train() records, without training anything.
    assert resolve(cfg).model == used
    dropblock = dataclasses.replace(cfg.model, regularizer="dropblock", block_size=7)
    resolved = resolve(dataclasses.replace(cfg, model=dropblock)).model
    assert resolved.block_sizes == dropblock_sizes(7, (1, 28, 28)) == (7, 7, 7)
    # The 8×8 case, where the block must shrink per stage, is trained below.


def test_same_config_and_seed_give_the_same_accuracy_on_cpu(fmnist_cnn):
    _, first, second, _ = fmnist_cnn
    assert [h["val_acc"] for h in first.history] == [h["val_acc"] for h in second.history]
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]


def test_a_report_that_raises_stops_training_at_once(tiny_npz: Path):
    seen = []

    def report(epoch: int, metrics: dict[str, float]) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(tiny(tiny_npz, epochs=5), report=report)
    assert seen == [1, 2]


def test_a_set_stop_event_ends_training_before_the_next_batch(tiny_npz: Path):
    # How a worker stops on a signal: it sets the event, and train() leaves between two batches.
    stop = threading.Event()
    seen = []

    def report(epoch: int, metrics: dict[str, float]) -> None:
        seen.append((epoch, polling_stop()))
        if epoch == 2:
            stop.set()

    with pytest.raises(Stopped):
        train(tiny(tiny_npz, epochs=5), report=report, stop=stop)
    assert seen == [(1, True), (2, True)]
    assert not polling_stop()  # only while a loop that checks the event runs
    assert train(tiny(tiny_npz, epochs=1), stop=threading.Event()).epochs_run == 1


def test_checkpoint_resumes_after_the_last_epoch_without_reporting_it_again(tiny_npz: Path, tmp_path: Path):
    cfg = tiny(tiny_npz, epochs=4)
    ckpt = tmp_path / "trial.pt"
    seen: list[int] = []

    def dies_in_epoch_three(epoch: int, metrics: dict[str, float]) -> None:
        seen.append(epoch)
        if epoch == 3:
            raise Stop  # a worker that died after epoch 2's checkpoint, before epoch 3's

    with pytest.raises(Stop):
        train(cfg, report=dies_in_epoch_three, checkpoint=ckpt)
    assert seen == [1, 2, 3] and ckpt.exists()
    resumed_reports: list[int] = []
    resumed = train(cfg, report=lambda epoch, m: resumed_reports.append(epoch), checkpoint=ckpt)
    # Epochs 1-2 are not reported again; epoch 3, whose checkpoint was never written, is re-run.
    assert resumed_reports == [3, 4]
    assert resumed.epochs_run == 4 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # Model, optimiser, schedule and both generators come back: as if it had never stopped.
    straight = train(cfg)
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in straight.history]


def test_unreadable_checkpoint_starts_over(tiny_npz: Path, tmp_path: Path):
    ckpt = tmp_path / "trial.pt"
    ckpt.write_bytes(b"not a checkpoint")
    seen: list[int] = []
    train(tiny(tiny_npz, epochs=1), report=lambda epoch, m: seen.append(epoch), checkpoint=ckpt)
    assert seen == [1]


def test_a_diverging_loss_raises_training_error(tiny_npz: Path):
    with pytest.raises(TrainingError, match="loss became"):
        train(tiny(tiny_npz, optim=OptimConfig(lr=1e12, warmup=0.0), epochs=2))


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(arch="resnet18", stem="imagenet"),  # 8 px: 2×2 at layer1, 1×1 at layer4
        ModelConfig(arch="cnn", budget=10_000, width=8, regularizer="dropblock", rate=0.1,
                    block_size=7),
    ],
    ids=["resnet18-imagenet-stem", "q1-cnn"],
)
def test_images_smaller_than_the_network_expects(tiny_npz: Path, model: ModelConfig):
    data = DataConfig(dataset=f"npz:{tiny_npz}", val_size=200, train_subset=400, pad=0, flip=False,
                      channels=3 if model.arch == "resnet18" else None)
    result = train(tiny(tiny_npz, data=data, model=model, epochs=1))
    assert result.epochs_run == 1 and 0.0 <= result.final_val_acc <= 1.0
    if model.arch == "cnn":
        assert result.config.model.block_sizes == (7, 3, 1) == dropblock_sizes(7, (1, 8, 8))


def test_mlp_and_cnn_of_one_budget_are_within_one_percent(tiny_npz: Path):
    counts = {}
    for model in (ModelConfig(arch="mlp", budget=20_000, depth=2),
                  ModelConfig(arch="cnn", budget=20_000, width=8)):
        result = train(tiny(tiny_npz, model=model, epochs=1))
        counts[model.arch] = result.params
        assert result.param_split["total"] == result.params
    assert all(abs(n - 20_000) <= 200 for n in counts.values()), counts


def test_train_module_imports_no_optuna():
    code = "import sys, kdsweep.core.train, kdsweep.core.teacher; sys.exit('optuna' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_evaluate_test_reports_test_accuracy(tiny_npz: Path):
    result = train(tiny(tiny_npz, epochs=1, evaluate_test=True))
    assert result.test_acc is not None and 0.0 <= result.test_acc <= 1.0


def test_train_returns_the_last_epochs_per_image_validation_correctness(tiny_npz: Path):
    config = TrainConfig(data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=150, pad=0, flip=False),
                         model=ModelConfig(arch="mlp", hidden=(32,)), epochs=2, batch_size=64,
                         device="cpu", threads=1)
    result = train(config)
    mask = result.val_correct
    assert mask is not None and mask.dtype == torch.bool and mask.shape == (150,)
    assert mask.float().mean().item() == pytest.approx(result.final_val_acc)
    # The resolved config records what was used: the dataset's own statistics.
    assert result.config.data.normalize == "dataset" and len(result.config.data.mean) == 1


def test_a_kd_config_needs_its_teacher_prepared_first(tiny_npz: Path, tmp_path: Path) -> None:
    # train() never hides the teacher's training (minutes, every core, a lock): it is passed in.
    from kdsweep.core.config import ConfigError, KDConfig

    cfg = dataclasses.replace(tiny(tiny_npz), cache_dir=str(tmp_path),
                              kd=KDConfig(alpha=0.5, teacher=ModelConfig(arch="mlp", hidden=(16,))))
    with pytest.raises(ConfigError, match=r"prepare it first with kdsweep.core.teacher.prepare\(config\)"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()  # nothing was trained
    alone = dataclasses.replace(cfg, kd=KDConfig(alpha=0.0, teacher=cfg.kd.teacher))
    assert train(alone).teacher is None  # alpha = 0 is plain cross-entropy: no teacher needed


def test_label_smoothing_reaches_the_cross_entropy_term_at_every_alpha(tiny_npz: Path, tmp_path: Path) -> None:
    # alpha = 1e-6 makes the soft term negligible: its loss must be alpha 0's smoothed
    # cross-entropy, not the unsmoothed one.
    from kdsweep.core import teacher
    from kdsweep.core.config import KDConfig, replace

    cfg = dataclasses.replace(tiny(tiny_npz, epochs=1, cache_dir=str(tmp_path)),
                              kd=KDConfig(alpha=0.0, temperature=1.0, teacher=ModelConfig(arch="mlp", hidden=(16,)),
                                          teacher_epochs=1))
    smoothed = replace(cfg, **{"optim.label_smoothing": 0.3})
    plain_ce = train(smoothed).history[0]["train_loss"]
    tiny_kd = replace(smoothed, **{"kd.alpha": 1e-6})
    kd = train(tiny_kd, teacher=teacher.prepare(tiny_kd)).history[0]["train_loss"]
    unsmoothed = train(cfg).history[0]["train_loss"]
    assert kd == pytest.approx(plain_ce, rel=1e-3)
    assert abs(plain_ce - unsmoothed) > 0.1  # smoothing 0.3 over 10 classes moves the loss clearly


@pytest.mark.slow
def test_evaluation_classifies_every_image_as_a_plain_forward_does(fmnist_dir: Path) -> None:
    # The scoring path (inference mode, channels_last on the CPU, BatchNorms folded, dead taps
    # skipped) against the plainest one: torchvision's own ResNet-18 with the same weights, a
    # default-layout forward under no_grad; image by image the same top-1 on the q2 smoke
    # preset's 5000 validation images.
    from torchvision.models import resnet18

    from kdsweep.core import data
    from kdsweep.core.train import _to_input, correctness

    config = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", root=str(fmnist_dir), val_size=5000, train_subset=1000,
                        channels=3, pad=1, flip=True),
        model=ModelConfig(arch="resnet18", weights="none", stem="imagenet"),
        optim=OptimConfig(lr=0.05), epochs=1, batch_size=25, eval_batch_size=512, device="cpu", threads=1,
    )
    result = train(config)
    splits = data.load_splits(result.config.data)
    model, device = result.model.eval(), torch.device("cpu")
    reference = resnet18(num_classes=10)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain = torch.cat([reference.eval()(_to_input(splits.val_x[i:i + 512], result.config, splits, device)).argmax(1)
                           for i in range(0, len(splits.val_x), 512)]) == splits.val_y
    assert 0.2 < plain.float().mean().item() < 1.0  # a model that learnt something (chance: 0.1)
    assert torch.equal(correctness(model, splits.val_x, splits.val_y, result.config, splits, device), plain)
    assert torch.equal(result.val_correct, plain)


def test_validating_only_the_last_epoch_trains_the_same_weights(tiny_npz: Path) -> None:
    every = train(tiny(tiny_npz))
    last = train(tiny(tiny_npz), validate="last")
    assert ["val_acc" in h for h in last.history] == [False, False, True]
    assert last.final_val_acc == every.final_val_acc and last.best_epoch == 3
    assert torch.equal(last.val_correct, every.val_correct)
    for name, want in every.model.state_dict().items():
        assert torch.equal(last.model.state_dict()[name], want), name


def test_the_optimiser_is_fused_and_steps_as_plain_sgd_does() -> None:
    # One kernel per parameter (fused) instead of SGD's per-op loop; the same update to rounding.
    from kdsweep.core.train import _optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).double()
    plain_model = copy.deepcopy(model)
    config = TrainConfig(data=DataConfig(dataset="fashion-mnist"),
                         optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01))
    opt = _optimizer(model, config)
    assert all(g.get("fused") for g in opt.param_groups)
    decay = [p for p in plain_model.parameters() if p.ndim > 1]
    no_decay = [p for p in plain_model.parameters() if p.ndim <= 1]
    plain = torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0}],
                            lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(3):
        for m, o in ((model, opt), (plain_model, plain)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for got, want in zip(model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scoring_runs_in_batches_of_256_on_the_cpu_unless_set(tiny_npz: Path):
    from torch import nn

    from kdsweep.core import data
    from kdsweep.core.train import correctness, eval_batch

    assert eval_batch(TrainConfig(), torch.device("cuda")) == 1024
    config = resolve(tiny(tiny_npz, data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=600, pad=0, flip=False)))
    splits = data.load_splits(config.data)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    by_default = correctness(model, splits.val_x, splits.val_y, config, splits, torch.device("cpu"))
    assert sizes == [256, 256, 88]
    sizes.clear()
    seven = correctness(model, splits.val_x, splits.val_y, dataclasses.replace(config, eval_batch_size=7), splits,
                        torch.device("cpu"))
    assert sizes == [7] * 85 + [5] and torch.equal(seven, by_default)
