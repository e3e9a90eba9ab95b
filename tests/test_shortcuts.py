"""Exact shortcuts (kdsweep/core/shortcuts.py): convolutions that skip taps meeting only zero
padding, and BatchNorm folded into convolutions for evaluation; the same functions as before."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdsweep.core.config import ModelConfig
from kdsweep.core.resnets import build_resnet
from kdsweep.core.shortcuts import LiveTapConv2d, for_inference, live_taps, use_live_taps


def test_live_taps_are_the_taps_that_meet_a_real_pixel():
    assert live_taps(3, 1, 1, 1) == (1, 2, 0)  # 1x1 map, 3x3 conv: the centre tap alone
    assert live_taps(3, 2, 1, 2) == (1, 3, 0)  # 2x2 map, stride 2: rows/columns 1 and 2
    assert live_taps(3, 1, 1, 2) is None  # 2x2 map, stride 1: every tap meets a pixel
    assert live_taps(7, 2, 3, 28) is None
    assert live_taps(1, 2, 0, 2) is None


@pytest.mark.parametrize(("kernel", "pad", "size", "stride"), [
    (3, 1, 1, 1), (3, 1, 2, 2), (3, 1, 2, 1), (3, 1, 3, 2), (3, 1, 5, 1), (3, 1, 4, 2),
    (1, 0, 1, 1), (1, 0, 2, 2), (1, 0, 3, 1), (7, 3, 1, 2), (7, 3, 2, 2), (3, 0, 3, 1), (5, 2, 2, 1),
])
def test_a_live_tap_conv_is_the_plain_conv_forward_and_backward(kernel: int, pad: int, size: int, stride: int):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, kernel, stride=stride, padding=pad, bias=True).double()
    live = use_live_taps(copy.deepcopy(plain))
    assert type(live) is LiveTapConv2d
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    target = torch.randn_like(plain(x))
    grads = []
    for conv in (plain, live):
        out = conv(x)
        F.mse_loss(out, target).backward()
        grads.append((out.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for want, got in zip(grads[0], grads[1], strict=True):
        assert want.shape == got.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if (kernel, size) == (3, 1):  # only the centre tap meets a pixel: the others' gradient is exactly 0
        mask = torch.ones(3, 3, dtype=torch.bool)
        mask[1, 1] = False
        assert live.weight.grad[:, :, mask].abs().max().item() == 0.0


def test_a_resnet_at_28_px_skips_the_dead_taps_and_keeps_its_parameter_names():
    torch.manual_seed(0)
    model = build_resnet(ModelConfig(arch="resnet18", weights="none", stem="imagenet"), num_classes=10)
    assert all(type(m) is LiveTapConv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    shapes: dict[str, int] = {}

    def side(name: str):
        def record(module, inputs, output) -> None:  # None: the output is left unchanged
            shapes[name] = inputs[0].shape[-1]

        return record

    hooks = [m.register_forward_hook(side(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.randn(2, 3, 28, 28))
    for h in hooks:
        h.remove()
    assert shapes["layer4.1.conv2"] == 1  # the map this is for
    plain = torchvision_resnet18(model)
    assert list(plain.state_dict()) == list(model.state_dict())


def torchvision_resnet18(model: nn.Module) -> nn.Module:
    from torchvision.models import resnet18

    plain = resnet18(num_classes=10)
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_folded_copy_gives_the_logits_of_the_model_and_leaves_it_alone(arch: str):
    torch.manual_seed(0)
    model = build_resnet(ModelConfig(arch=arch, weights="none", stem="imagenet"), num_classes=10).double()
    with torch.no_grad():  # BatchNorm statistics and scales away from their initial 0/1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 28, 28, dtype=torch.float64)
    folded = for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        want, got = model.eval()(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_models_other_than_resnets_are_evaluated_as_they_are():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert for_inference(mlp) is mlp


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_resnet_trains_as_torchvision_s_own_at_28_px(arch: str):
    # Training mode (batch statistics), forward and every gradient, against the same weights in
    # torchvision's ResNet of plain nn.Conv2d; float64, so only rounding could differ.
    import torchvision

    torch.manual_seed(0)
    model = build_resnet(ModelConfig(arch=arch, weights="none", stem="imagenet"), num_classes=10).double()
    with torch.no_grad():  # zero_init_residual leaves the last BatchNorm of each block at 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1, 0.3)
    plain = getattr(torchvision.models, arch)(num_classes=10).double()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 7, 1, 2, 9, 4, 3])
    losses = []
    for net in (plain, model):
        loss = F.cross_entropy(net.train()(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        want = grads[name].grad  # float64 rounding, relative to the gradient's scale (~1e-14 seen)
        assert (p.grad - want).abs().max() <= 1e-10 * want.abs().max(), name
