"""The Q2 teacher: trained once and cached, never on the validation split, logits cached per
view and computed once, and (on real data, offline) worth distilling from."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from kdsweep.core import data, teacher
from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig, replace
from kdsweep.core.logit_cache import LogitCache
from kdsweep.core.resnets import ModelError
from kdsweep.core.train import train


def kd_config(npz: Path, cache_dir: Path, **kw) -> TrainConfig:
    """A student distilling from a small MLP teacher on the tiny 8×8 npz: seconds, not minutes."""
    base = {
        "data": DataConfig(dataset=f"npz:{npz}", val_size=200, train_subset=400, pad=1, flip=True),
        "model": ModelConfig(arch="mlp", hidden=(32,)),
        "optim": OptimConfig(lr=0.05, warmup=0.0),
        "kd": KDConfig(alpha=0.5, temperature=4.0, teacher=ModelConfig(arch="mlp", hidden=(64,)),
                       teacher_epochs=2),
        "epochs": 2,
        "batch_size": 64,
        "device": "cpu",
        "threads": 1,
        "cache_dir": str(cache_dir),
    }
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def fresh_process_cache():
    """Each test starts as a new worker process would: no teacher loaded in memory."""
    teacher._LOADED.clear()
    yield
    teacher._LOADED.clear()


def kd_train(cfg, **kwargs):
    """train() as the objective calls it: the teacher prepared first, then passed in."""
    return train(cfg, teacher=teacher.prepare(cfg), **kwargs)


def runs(cache_dir: Path) -> list[str]:
    """Lines of every teacher's `.runs` file: one per time a teacher was trained."""
    return [line for f in (cache_dir / "teachers").glob("*.runs") for line in f.read_text().splitlines()]


def test_the_teacher_is_trained_once_and_every_trial_records_it(tiny_npz: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    cfg = kd_config(tiny_npz, tmp_path)
    first = kd_train(cfg)
    assert len(runs(tmp_path)) == 1
    info = first.teacher
    assert info is not None and len(info["key"]) == 16 and 0.0 <= info["val_acc"] <= 1.0
    assert info["mode"].startswith("full fine-tune")

    # A new process (nothing in memory) and another trial: the cached file is loaded, nothing trains.
    teacher._LOADED.clear()
    real_train = train
    calls = []

    def spy(config, *args, **kwargs):
        calls.append(config)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr("kdsweep.core.train.train", spy)
    monkeypatch.setattr(teacher, "train", spy)  # the teacher trains through the same train()
    again = replace(cfg, **{"kd.alpha": 0.9})
    second = spy(again, teacher=teacher.prepare(again))
    assert len(calls) == 1  # the student only; the teacher's train() was never called
    assert len(runs(tmp_path)) == 1
    assert second.teacher["key"] == info["key"] and second.teacher["val_acc"] == info["val_acc"]


def test_a_corrupt_teacher_file_is_rebuilt_not_trusted(tiny_npz: Path, tmp_path: Path):
    cfg = kd_config(tiny_npz, tmp_path)
    key = kd_train(cfg).teacher["key"]
    path = tmp_path / "teachers" / f"{key}.pt"
    path.write_bytes(b"torn write")
    teacher._LOADED.clear()
    again = kd_train(cfg)
    assert len(runs(tmp_path)) == 2  # trained again
    assert again.teacher["key"] == key
    assert torch.load(path, weights_only=True)["state_dict"]  # and stored whole this time


def test_the_teacher_never_trains_on_the_validation_split(tiny_npz: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    cfg = kd_config(tiny_npz, tmp_path, data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=200,
                                                        train_subset=400, pad=0, flip=False))
    splits = data.load_splits(cfg.data)
    seen: list[torch.Tensor] = []
    real_build = teacher.models.build_model

    def build_and_watch(model_cfg, in_shape, num_classes):
        model = real_build(model_cfg, in_shape, num_classes)
        if model_cfg.hidden == (64,):  # the teacher
            model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if m.training else None)
        return model

    monkeypatch.setattr("kdsweep.core.models.build_model", build_and_watch)
    teacher.load_teacher(cfg, splits, torch.device("cpu"))
    trained_on = torch.cat(seen)
    as_input = lambda x: data.to_input(x, splits.mean, splits.std)  # noqa: E731
    train_rows = {tuple(r.tolist()) for r in as_input(splits.train_x).flatten(1)}
    val_rows = {tuple(r.tolist()) for r in as_input(splits.val_x).flatten(1)}
    seen_rows = {tuple(r.tolist()) for r in trained_on.flatten(1)}
    assert len(trained_on) == 2 * 400  # two epochs over the 400 training images
    assert seen_rows <= train_rows and not seen_rows & val_rows


def test_the_teacher_may_learn_from_more_of_the_training_split(tiny_npz: Path, tmp_path: Path):
    cfg = kd_config(tiny_npz, tmp_path)
    cfg = replace(cfg, **{"kd.teacher_train_subset": 800})
    tconfig = teacher.teacher_config(cfg)
    assert tconfig.data.train_subset == 800
    student, wider = data.load_splits(cfg.data), data.load_splits(tconfig.data)
    # The same split: the student's images are the teacher's first ones; validation is shared.
    assert torch.equal(wider.train_x[:400], student.train_x) and torch.equal(wider.val_x, student.val_x)
    # Another teacher, so another cache file.
    narrow = teacher.teacher_config(kd_config(tiny_npz, tmp_path))
    assert teacher.teacher_key(tconfig, student) != teacher.teacher_key(narrow, student)


def test_offline_imagenet_teacher_is_one_sentence(tiny_npz: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    kd = KDConfig(alpha=0.5, teacher=ModelConfig(arch="resnet50", weights="imagenet"))
    cfg = kd_config(tiny_npz, tmp_path, kd=kd,
                    data=DataConfig(dataset=f"npz:{tiny_npz}", val_size=200, train_subset=400, channels=3))
    with pytest.raises(ModelError) as info:
        kd_train(cfg)
    message = str(info.value)
    assert message.startswith("ImageNet weights for resnet50 are not in the torch hub cache")
    assert message.count(". ") == 0 and message.endswith("or use weights=none.")
    assert runs(tmp_path) == []  # nothing was trained or stored


def test_teacher_logits_are_cached_per_view_and_computed_once(tiny_npz: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    cfg = kd_config(tiny_npz, tmp_path)  # pad 1 and flips: 18 views of each of 400 images
    first = kd_train(cfg)
    path = Path(first.teacher["logit_cache"])
    views = data.num_views(1, True)
    cache = LogitCache(path, 400, views, 10)
    after_one = cache.stats()
    assert after_one["max_passes"] == 1
    # Lazily filled: two epochs draw 800 (image, view) pairs out of 7200, so most views are never run.
    assert 0 < after_one["filled"] <= 2 * 400 < 400 * views

    # Another trial (other alpha and seed, new process): cached pairs are read, not recomputed,
    # and the teacher runs only on pairs this trial draws for the first time.
    teacher._LOADED.clear()
    other = replace(cfg, **{"seed": 1, "kd.alpha": 0.2, "kd.temperature": 8.0})
    assert Path(kd_train(other).teacher["logit_cache"]) == path
    after_two = LogitCache(path, 400, views, 10).stats()
    assert after_two["max_passes"] == 1
    assert after_one["filled"] < after_two["filled"] == after_two["total_passes"]


def test_kd_logits_are_the_teachers_logits_on_the_students_view(tiny_npz: Path, tmp_path: Path):
    cfg = kd_config(tiny_npz, tmp_path)
    splits = data.load_splits(cfg.data)
    fn, info = teacher.logits_source(cfg, splits, torch.device("cpu"))
    model, _ = teacher.load_teacher(cfg, splits, torch.device("cpu"))
    idx = torch.tensor([0, 5, 5, 9])
    views = torch.tensor([0, 3, 17, 4])
    x = data.apply_views(splits.train_x[idx], views, 1)
    with torch.no_grad():
        direct = model(data.to_input(x, splits.mean, splits.std))
    cached = fn(idx, views, x)
    assert torch.allclose(cached, direct, atol=1e-2, rtol=1e-2)  # fp16 storage
    assert torch.equal(fn(idx, views, x), cached)  # read back, not recomputed


def test_the_teacher_beats_a_student_trained_alone(fmnist_teacher):
    """Offline there are no ImageNet weights, so the ResNet50 teacher is fine-tuned from scratch
    (more epochs, more of the training split); it must know the task better than the ResNet18
    student does on its own, or Q2 measures nothing."""
    teacher_acc, student_acc = fmnist_teacher["teacher_val_acc"], fmnist_teacher["student_val_acc"]
    assert teacher_acc > student_acc + 0.05, fmnist_teacher
    assert teacher_acc > 0.5  # chance is 0.1


def test_teacher_preflight_names_the_teacher_key_and_one_normalisation(fmnist_dir: Path):
    from kdsweep.core.train import resolve_data

    config = TrainConfig(
        data=DataConfig(dataset="fashion-mnist", val_size=500, train_subset=300, channels=3, pad=1),
        model=ModelConfig(arch="resnet18"), kd=KDConfig(alpha=0.5, teacher=ModelConfig(arch="resnet50"),
                                                        teacher_train_subset=10**6))
    splits = data.load_splits(config.data)
    with pytest.raises(data.DataError, match=r"^kd\.teacher_train_subset=1000000 but"):
        teacher.preflight(config, splits)
    ok = replace(config, **{"kd.teacher_train_subset": 1000})
    line = teacher.preflight(ok, splits)
    assert "first 1000 images" in line and "the student has 300" in line and "normalisation dataset" in line
    # One normalisation for the teacher whichever split it is applied to: its own training
    # split (1000 images) and the student's (300) give the same statistics.
    tconfig = teacher.teacher_config(ok)
    own = resolve_data(tconfig, data.load_splits(tconfig.data)).data
    on_student = resolve_data(tconfig, splits).data
    assert own.mean == on_student.mean and own.std == on_student.std
    # ImageNet weights: the teacher gets ImageNet's statistics, whatever the student uses.
    probed = replace(ok, **{"kd.teacher": ModelConfig(arch="resnet50", weights="imagenet")})
    tdata = resolve_data(teacher.teacher_config(probed), splits).data
    assert tdata.normalize == "imagenet" and tdata.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_the_teacher_trains_in_its_students_precision_as_it_resolves(
        tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str):
    monkeypatch.delenv("KDSWEEP_PRECISION", raising=False)
    built = []

    def spy(config, *args, **kwargs):
        built.append(config.precision)
        return train(config, *args, **kwargs)

    monkeypatch.setattr(teacher, "train", spy)
    student = kd_train(kd_config(tiny_npz, tmp_path, precision=precision))
    want = "fp32" if precision == "auto" else "bf16"
    assert built == [want] and student.config.precision == want
    # The resolved config, as a trial stores it, finds the same teacher: nothing trains again.
    again = kd_train(student.config)
    assert built == [want] and again.teacher["key"] == student.teacher["key"]


def test_a_resnet_teacher_is_folded_for_its_logits_once_per_process(tiny_npz: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    from kdsweep.core import data, shortcuts
    from kdsweep.core.resnets import build_resnet

    net = build_resnet(ModelConfig(arch="resnet18", weights="none", stem="imagenet"), num_classes=10).eval()
    monkeypatch.setattr(teacher, "load_teacher", lambda config, splits, device: (net, {"key": "k"}))
    calls = []
    fold = shortcuts.for_inference
    monkeypatch.setattr(shortcuts, "for_inference", lambda m: calls.append(m) or fold(m))
    config = replace(kd_config(tiny_npz, tmp_path), **{"data.channels": 3, "kd.cache_logits": False})
    splits = data.load_splits(config.data)
    for _ in range(2):  # two trials of one worker
        fn, _ = teacher.logits_source(config, splits, torch.device("cpu"))
        assert fn(None, None, splits.train_x[:4]).shape == (4, 10)
    assert calls == [net]
