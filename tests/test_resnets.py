"""build_resnet: stems, heads, the linear-probe freeze, local and (offline) ImageNet weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

from kdsweep.core.config import ModelConfig
from kdsweep.core.resnets import ModelError, build_resnet, describe_stem, layer_sizes


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "resnet18", **kw})


def feature_sides(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Spatial side of the layer1 and layer4 outputs for input x."""
    seen: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.shape[-1]  # returns None: the output is left unchanged

        return record

    model.layer1.register_forward_hook(hook("layer1"))
    model.layer4.register_forward_hook(hook("layer4"))
    with torch.no_grad():
        model.eval()(x)
    return seen["layer1"], seen["layer4"]


def test_cifar_stem_keeps_resolution_and_works_on_tiny_inputs():
    torch.manual_seed(0)
    model = build_resnet(cfg(stem="cifar"), num_classes=7)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert feature_sides(model, torch.randn(2, 3, 32, 32)) == (32, 4)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_imagenet_stem_on_32px_and_describe_stem_agree_with_the_network():
    model = build_resnet(cfg(stem="imagenet"), num_classes=10)
    assert model.conv1.kernel_size == (7, 7)
    assert feature_sides(model, torch.randn(2, 3, 32, 32)) == (8, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert describe_stem(cfg(stem="imagenet"), 32) == (
        "resnet18, imagenet stem: 32 px input is 8x8 at layer1, 1x1 at layer4"
    )
    assert layer_sizes("imagenet", 224) == (56, 7)
    assert layer_sizes("cifar", 32) == (32, 4)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_one_input_channel(stem):
    model = build_resnet(cfg(stem=stem), num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_head_only_trains_only_fc_and_keeps_batchnorm_frozen():
    torch.manual_seed(0)
    model = build_resnet(cfg(trainable="head", stem="imagenet"), num_classes=10)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    # Parameter names stay torchvision's, so a probe's state_dict loads into a plain ResNet.
    assert set(model.state_dict()) == set(resnet18().state_dict())

    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    assert model.training and model.fc.training
    assert not model.bn1.training and not model.layer3[0].bn2.training
    out = model(torch.randn(4, 3, 32, 32) * 3 + 1)  # far from N(0,1): train-mode BN would move
    out.sum().backward()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert model.fc.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))


def test_all_trainable_batchnorm_moves_in_train_mode():
    # Guards the test above: the same forward on the plain network does move the statistics.
    model = build_resnet(cfg(), num_classes=10).train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(model.bn1.running_mean, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_local_state_dict_round_trip(tmp_path: Path, stem):
    torch.manual_seed(0)
    source = build_resnet(cfg(stem=stem), num_classes=10).eval()
    path = tmp_path / "student.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)  # a different init, so equality means the weights were loaded
    loaded = build_resnet(cfg(stem=stem, weights=str(path)), num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_compiled_and_checkpoint_wrapped_state_dicts_load(tmp_path: Path):
    source = build_resnet(cfg(), num_classes=10)
    path = tmp_path / "ckpt.pt"
    state = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "val_acc": 0.5}, path)
    loaded = build_resnet(cfg(weights=str(path), trainable="head"), num_classes=10)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


def test_imagenet_shaped_state_dict_loads_all_but_fc(tmp_path: Path):
    torch.manual_seed(0)
    imagenet_like = resnet18()  # 1000-class fc, 7x7 stem
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet_like.state_dict(), path)

    model = build_resnet(cfg(weights=str(path)), num_classes=10)
    assert model.fc.out_features == 10
    assert torch.equal(model.layer2[0].conv1.weight, imagenet_like.layer2[0].conv1.weight)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)

    cifar = build_resnet(cfg(weights=str(path), stem="cifar"), num_classes=10)
    assert cifar.conv1.weight.shape == (64, 3, 3, 3)  # re-initialised, not loaded
    assert torch.equal(cifar.layer4[1].bn2.running_var, imagenet_like.layer4[1].bn2.running_var)

    gray = build_resnet(cfg(weights=str(path)), num_classes=10, in_channels=1)
    assert torch.allclose(gray.conv1.weight[:, 0], imagenet_like.conv1.weight.sum(1))


def test_bad_local_weights_raise_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        build_resnet(cfg(weights=str(tmp_path / "nope.pt")), num_classes=10)

    wrong_keys = tmp_path / "wrong.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong_keys)
    with pytest.raises(ModelError, match="key"):
        build_resnet(cfg(weights=str(wrong_keys)), num_classes=10)

    other_head = tmp_path / "other_head.pt"
    torch.save(build_resnet(cfg(), num_classes=100).state_dict(), other_head)
    with pytest.raises(ModelError, match="100-class fc"):
        build_resnet(cfg(weights=str(other_head)), num_classes=10)

    not_torch = tmp_path / "junk.pt"
    not_torch.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable state_dict"):
        build_resnet(cfg(weights=str(not_torch)), num_classes=10)


def test_unknown_settings_raise_model_error():
    with pytest.raises(ModelError, match="resnet18 or resnet50"):
        build_resnet(ModelConfig(arch="cnn"), num_classes=10)
    with pytest.raises(ModelError, match="stem"):
        build_resnet(cfg(stem="tiny"), num_classes=10)
    with pytest.raises(ModelError, match="trainable"):
        build_resnet(cfg(trainable="fc"), num_classes=10)


def test_offline_imagenet_weights_raise_one_sentence_model_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelError) as info:
        build_resnet(ModelConfig(arch="resnet50", weights="imagenet"), num_classes=10)
    message = str(info.value)
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert message == (
        f"ImageNet weights for resnet50 are not in the torch hub cache ({checkpoints}) and cannot "
        "be downloaded here; copy resnet50-11ad3fa6.pth there, pass a local state_dict as "
        "weights=PATH, or use weights=none."
    )
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    fake = resnet18()
    filename = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(fake.state_dict(), checkpoints / filename)
    model = build_resnet(cfg(weights="imagenet"), num_classes=10)
    assert torch.equal(model.layer1[0].conv2.weight, fake.layer1[0].conv2.weight)

    (checkpoints / filename).write_bytes(b"torn download")
    with pytest.raises(ModelError, match="delete the file"):
        build_resnet(cfg(weights="imagenet"), num_classes=10)


def test_random_init_starts_every_residual_branch_at_zero(tmp_path: Path):
    for arch, last_bn in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = build_resnet(cfg(arch=arch), num_classes=10)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        assert all(torch.count_nonzero(getattr(b, last_bn).weight) == 0 for b in blocks)
    # Loaded weights keep their own scales.
    torch.manual_seed(0)
    saved = resnet18(num_classes=10)
    torch.save(saved.state_dict(), tmp_path / "r18.pt")
    loaded = build_resnet(cfg(weights=str(tmp_path / "r18.pt")), num_classes=10)
    assert torch.equal(loaded.layer1[0].bn2.weight, saved.layer1[0].bn2.weight)
    assert torch.count_nonzero(loaded.layer1[0].bn2.weight) > 0
