"""models: shapes, regularisers (DropBlock above all), factorized convs, progress ramp, param split."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torchvision.ops import DropBlock2d, drop_block2d

from kdsweep.core.config import ConfigError, ModelConfig
from kdsweep.core.models import (
    CNN,
    RampedDropBlock2d,
    build_model,
    drop_block2d_tensor,
    dropblock_sizes,
    param_split,
    set_progress,
    stage_plan,
)

REGULARIZERS = ("none", "dropout", "spatial_dropout", "dropblock")


def cnn(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "cnn", "width": 8, "depth": 2, **kw})


def dropblocks(model: nn.Module) -> list[DropBlock2d]:
    return [m for m in model.modules() if isinstance(m, DropBlock2d)]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_cnn_forward_shape(shape, factorized, regularizer):
    torch.manual_seed(0)
    cfg = cnn(factorized=factorized, regularizer=regularizer, rate=0.2, block_size=7)
    model = build_model(cfg, shape, 10)
    x = torch.randn(4, *shape)
    for train in (True, False):
        out = model.train(train)(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_mlp_forward_shape_and_layout(shape):
    model = build_model(ModelConfig(arch="mlp", hidden=(32, 16), rate=0.5), shape, 10)
    assert model(torch.randn(4, *shape)).shape == (4, 10)
    kinds = [type(m) for m in model.body]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout]
    assert model.head.in_features == 16


def test_plain_defaults_without_a_budget():
    mlp = build_model(ModelConfig(arch="mlp", depth=3), (1, 8, 8), 10)
    assert [m.out_features for m in mlp.body if isinstance(m, nn.Linear)] == [256, 256, 256]
    assert not any(isinstance(m, nn.Dropout) for m in mlp.modules()), "rate 0: no dropout layers"
    net = build_model(cnn(width=4, depth=1), (1, 8, 8), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16]
    assert net.head.in_features == 16


def test_tiny_maps_skip_pools_instead_of_vanishing():
    assert stage_plan((3, 2, 2)) == ((False, 2), (True, 1), (False, 1))
    for shape in [(1, 1, 1), (1, 2, 2), (1, 3, 5)]:
        model = build_model(cnn(regularizer="dropblock", rate=0.3), shape, 10).train()
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_dropblock_is_active_and_rescaled_in_train_and_identity_in_eval():
    torch.manual_seed(0)
    model = build_model(cnn(regularizer="dropblock", rate=0.3, block_size=3), (3, 32, 32), 10)
    block = dropblocks(model)[0]
    ones = torch.ones(8, 4, 16, 16)
    dropped = block.train()(ones)
    assert (dropped == 0).any() and (dropped > 1).any(), "zeros, and survivors scaled up"
    kept = dropped[dropped > 0]
    assert torch.allclose(kept, kept[0].expand_as(kept))  # one rescale factor: numel / kept
    assert dropped.mean().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(block.eval()(ones), ones)

    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x)), "a fresh mask every forward"
    model.eval()
    assert torch.equal(model(x), model(x))
    control = build_model(cnn(regularizer="dropblock", rate=0.0), (3, 32, 32), 10).train()
    assert torch.equal(control(x), control(x)), "the randomness above comes from DropBlock"


def test_dropblock_zeros_come_in_blocks():
    model = build_model(cnn(regularizer="dropblock", rate=0.2, block_size=5), (3, 32, 32), 10)

    def interior_share(module: nn.Module) -> float:
        """Share of dropped pixels whose four neighbours are all dropped too."""
        torch.manual_seed(0)
        mask = module.train()(torch.ones(1, 64, 16, 16))[0] == 0
        inner = mask[:, 1:-1, 1:-1]
        around = mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
        return ((around & inner).sum() / inner.sum()).item()

    # 5x5 blocks: ~9 of 25 pixels are interior; independent dropout: ~0.2**4
    assert interior_share(dropblocks(model)[0]) > 0.25
    assert interior_share(nn.Dropout(0.2)) < 0.05


def test_block_sizes_fit_every_stage():
    assert dropblock_sizes(7, (3, 32, 32)) == (7, 7, 7)
    assert dropblock_sizes(7, (3, 8, 8)) == (7, 3, 1)
    assert dropblock_sizes(4, (3, 32, 32)) == (3, 3, 3), "even requests round down to odd"
    assert dropblock_sizes(5, (1, 28, 28)) == (5, 5, 5)
    assert dropblock_sizes(9, (1, 8, 12)) == (7, 3, 1), "the smaller side counts"
    # why: torchvision clips block 7 to a 4x4 map and then rejects the even size
    with pytest.raises(ValueError, match="odd"):
        DropBlock2d(p=0.1, block_size=7).train()(torch.ones(1, 1, 4, 4))

    torch.manual_seed(0)
    model = build_model(cnn(regularizer="dropblock", rate=0.3, block_size=7), (3, 8, 8), 10)
    per_stage = [sorted({b.block_size for b in dropblocks(stage)}) for stage in model.features]
    assert per_stage == [[7], [3], [1]]
    assert model.train()(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_factorized_block_weights():
    cin, cout = 8, 16
    plain = CNN((cin, 8, 8), (cin, cout, cout), 10, depth=1)
    fact = CNN((cin, 8, 8), (cin, cout, cout), 10, depth=1, factorized=True)

    def conv_weights(stage: nn.Module) -> int:
        return sum(m.weight.numel() for m in stage.modules() if isinstance(m, nn.Conv2d))

    assert conv_weights(plain.features[1]) == 9 * cin * cout
    assert conv_weights(fact.features[1]) == 3 * cin * cout + 3 * cout * cout
    kernels = [m.kernel_size for m in fact.features[1].modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [(3, 1), (1, 3)]
    # the network's first conv sees raw pixels and stays 3x3
    first = next(m for m in fact.modules() if isinstance(m, nn.Conv2d))
    assert first.kernel_size == (3, 3)
    assert conv_weights(fact.features[0]) == conv_weights(plain.features[0])


def test_set_progress_ramps_dropblock_linearly():
    cfg = cnn(regularizer="dropblock", rate=0.2, ramp=True)
    model = build_model(cfg, (3, 16, 16), 10)
    assert len(dropblocks(model)) == 6
    for progress in (0.0, 0.25, 1.0):
        set_progress(model, progress, cfg)
        assert [b.p for b in dropblocks(model)] == pytest.approx([0.2 * progress] * 6)
    fixed = cnn(regularizer="dropblock", rate=0.2, ramp=False)
    set_progress(model, 0.1, fixed)
    assert {b.p for b in dropblocks(model)} == {0.2}
    with pytest.raises(ValueError, match="progress"):
        set_progress(model, 1.5, cfg)
    assert "_kdsweep_dropblocks" not in "".join(model.state_dict())
    set_progress(build_model(ModelConfig(arch="mlp"), (1, 8, 8), 10), 0.5, cfg)  # no-op


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(arch="mlp", hidden=(64, 32)), cnn(factorized=True, channels=(8, 16, 24, 20))],
    ids=["mlp", "cnn-4-channels"],
)
def test_param_split_sums_to_total(cfg):
    model = build_model(cfg, (3, 16, 16), 10)
    split = param_split(model)
    assert split["conv"] + split["head"] == split["total"]
    assert split["total"] == sum(p.numel() for p in model.parameters())
    assert split["head"] == model.head.in_features * 10 + 10


def test_param_split_without_a_head_attribute_uses_the_last_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 5))
    model[0].weight.requires_grad_(False)  # frozen weights are not counted
    assert param_split(model) == {"conv": 4, "head": 25, "total": 29}


def test_resnets_are_delegated(monkeypatch):
    calls = []
    fake = types.ModuleType("kdsweep.core.resnets")
    fake.build_resnet = lambda cfg, num_classes, in_channels=3: (
        calls.append((cfg.arch, num_classes, in_channels)) or nn.Linear(1, 1)
    )
    monkeypatch.setitem(sys.modules, "kdsweep.core.resnets", fake)
    build_model(ModelConfig(arch="resnet18"), (1, 32, 32), 7)
    assert calls == [("resnet18", 7, 1)]


@pytest.mark.parametrize(
    "cfg,match",
    [
        (cnn(regularizer="cutout"), "choose none, dropout, spatial_dropout, dropblock"),
        (cnn(depth=0), "depth"),
        (cnn(rate=1.0), "rate"),
        (ModelConfig(arch="vit"), "arch"),
        (cnn(channels=(8, 16)), "3 or 4 entries"),
        (cnn(regularizer="dropblock", rate=0.1, block_sizes=(3, 3)), "3 block sizes"),
    ],
)
def test_invalid_settings_raise_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, (3, 32, 32), 10)


def test_ramped_dropblock_eager_equals_torchvision_draw_for_draw():
    x = torch.randn(4, 8, 12, 12)
    for p, size in ((0.3, 5), (0.1, 3), (0.0, 5)):
        ours = RampedDropBlock2d(p=0.5, block_size=size).train()
        ours.set_rate(p)
        torch.manual_seed(7)
        got = ours(x)
        torch.manual_seed(7)
        want = DropBlock2d(p=p, block_size=size).train()(x)
        assert torch.equal(got, want)
    assert torch.equal(ours.eval()(x), x)


def test_tensor_rate_path_is_torchvisions_formula(monkeypatch):
    """The compiled path's arithmetic equals drop_block2d's given the same Bernoulli noise."""
    x = torch.randn(3, 4, 10, 10)
    uniform = torch.rand(3, 4, 6, 6)  # noise shape for block 5 on a 10 px map

    def fixed_bernoulli(self, p=0.5, *, generator=None):
        p = p if isinstance(p, float) else p.reshape(-1)[0].item()
        return self.copy_((uniform < p).to(self.dtype))

    monkeypatch.setattr(torch.Tensor, "bernoulli_", fixed_bernoulli)
    for p in (0.0, 0.2, 0.6):
        got = drop_block2d_tensor(x, torch.tensor(p), 5)
        want = drop_block2d(x, p, 5)
        assert torch.allclose(got, want, rtol=1e-6, atol=0), p
    assert torch.equal(drop_block2d_tensor(x, torch.tensor(0.0), 5), x)


def test_compiled_dropblock_ramp_compiles_once():
    """set_progress changes the rate every step; a compiled model must not recompile for it."""
    import torch._dynamo

    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    cfg = cnn(regularizer="dropblock", rate=0.3, block_size=3, ramp=True)
    torch.manual_seed(0)
    model = build_model(cfg, (1, 12, 12), 10).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(2, 1, 12, 12)
    for step in range(20):
        set_progress(model, step / 19, cfg)
        compiled(x).sum().backward()
    torch._dynamo.reset()
    assert len(frames) == 1, f"{len(frames)} compiled frames over 20 steps"


def test_resnets_skip_only_the_conv_init_torchvision_overwrites():
    """Every conv of a built ResNet holds kaiming-normal weights (std sqrt(2 / fan_out)), none is
    left uninitialised, and Conv2d's own init is restored for every other model."""
    for stem in ("imagenet", "cifar"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="resnet18", weights="none", stem=stem), (3, 32, 32), 10)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.detach()
                fan_out = w.shape[0] * w.shape[2] * w.shape[3]
                assert torch.isfinite(w).all() and abs(w.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.2
    conv = nn.Conv2d(3, 8, 3)
    assert conv.weight.abs().max() <= 1 / (3 * 9) ** 0.5  # Conv2d's default kaiming-uniform bound
