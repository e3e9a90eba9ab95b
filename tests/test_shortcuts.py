"""Exact shortcuts (kdsweep/core/shortcuts.py): convolutions that skip taps meeting only zero
padding or run as matrix products, BatchNorm over small maps as a matrix, and BatchNorm folded
into convolutions for evaluation; the same functions as before."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdsweep.core.config import ModelConfig
from kdsweep.core.resnets import build_resnet
from kdsweep.core.shortcuts import (
    LiveTapConv2d,
    SmallMapBatchNorm2d,
    SmallMapConv2d,
    dense_taps,
    for_inference,
    live_taps,
    use_shortcuts,
)


@contextlib.contextmanager
def dispatched_ops() -> Iterator[list[str]]:
    """The names of the aten ops dispatched inside the block, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        yield ops


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
    live = use_shortcuts(copy.deepcopy(plain))
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
    assert all(type(m) is SmallMapBatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
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
    buffers = dict(plain.named_buffers())  # the BatchNorms' running averages moved alike
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-12, atol=1e-12)


def slice_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take a live-tap conv's gradient by autograd through a slice of its weight, as it was."""
    from kdsweep.core import shortcuts

    monkeypatch.setattr(shortcuts, "_plain_autograd", lambda weight: False)


@pytest.mark.parametrize(("size", "stride", "bias"), [(1, 1, False), (2, 2, False), (1, 1, True), (2, 2, True)])
def test_a_live_tap_conv_rounds_as_autograd_through_the_slice_in_float32(monkeypatch: pytest.MonkeyPatch,
                                                                          size: int, stride: int, bias: bool):
    torch.manual_seed(0)
    conv = use_shortcuts(nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias))
    x = torch.randn(5, 16, size, size)
    target = torch.randn_like(conv(x))
    results = []
    for path in ("live tap conv", "slice"):
        if path == "slice":
            slice_autograd(monkeypatch)
        conv.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = conv(xi)
        F.mse_loss(out, target).backward()
        results.append([out.detach(), xi.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    dead = torch.ones(3, 3, dtype=torch.bool)
    dead[1:, 1:] = False
    assert torch.count_nonzero(results[0][2][:, :, dead]) == 0  # the skipped taps' gradient is exactly 0


def test_the_backward_reads_the_live_taps_gathered_not_scattered_over_the_weight():
    # Autograd through `weight[:, :, 2:5, 2:5]` handed the convolution's backward the scattered
    # taps of the full weight (9 of 49 floats, every cache line of it); they are gathered
    # once, contiguous, in the forward. A 7x7 convolution on a 2x2 map: 2x2 outputs, 3x3 live taps.
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                weights.append(args[2])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    conv = use_shortcuts(nn.Conv2d(32, 32, 7, padding=3, bias=False))
    loss = conv(torch.randn(4, 32, 2, 2)).square().sum()
    with Record():
        loss.backward()
    assert len(weights) == 1
    assert weights[0].shape == (32, 32, 3, 3) and weights[0].is_contiguous()


@pytest.mark.parametrize(("kernel", "pad", "size", "stride"), [(3, 1, 1, 1), (3, 1, 2, 2), (1, 0, 1, 1), (1, 0, 2, 2)])
def test_a_convolution_with_one_output_pixel_is_a_matrix_product(kernel: int, pad: int, size: int, stride: int):
    # Layer4 at 28 px: every convolution there outputs one pixel (1x1 maps; the stride-2 ones
    # read a 2x2 map). Forward and backward run as matrix products, no convolution at all.
    torch.manual_seed(0)
    conv = use_shortcuts(nn.Conv2d(16, 24, kernel, stride=stride, padding=pad, bias=True))
    x = torch.randn(5, 16, size, size, requires_grad=True)
    with dispatched_ops() as ops:
        out = conv(x)
        out.square().sum().backward()
    assert out.shape == (5, 24, 1, 1)
    assert not [op for op in ops if "convolution" in op]
    assert any(op.startswith(("addmm", "mm")) for op in ops)


@pytest.mark.parametrize(("kernel", "pad", "size", "stride"), [(3, 1, 2, 1), (3, 1, 4, 2), (1, 0, 4, 2), (1, 0, 2, 1),
                                                         (3, 1, 2, 2), (3, 1, 3, 2)])
def test_a_convolution_with_two_to_four_output_pixels_trains_as_one_unfolded_product(kernel: int, pad: int,
                                                                                     size: int, stride: int):
    # Layer3 at 28 px (2x2 maps) and layer4's stride-2 3x3 (4 of its 9 taps live): in training
    # on the CPU, forward and backward are matrix products of the unfolded input; no
    # convolution, and the same numbers in float64.
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 24, kernel, stride=stride, padding=pad, bias=True).double()
    conv = use_shortcuts(copy.deepcopy(plain))
    x = torch.randn(5, 16, size, size, dtype=torch.float64)
    target = torch.randn_like(plain(x))
    grads = []
    for module in (plain, conv):
        xi = x.clone().requires_grad_(True)
        with dispatched_ops() if module is conv else contextlib.nullcontext([]) as ops:
            out = module(xi)
            F.mse_loss(out, target).backward()
        grads.append([out.detach(), xi.grad, module.weight.grad, module.bias.grad])
    for want, got in zip(*grads, strict=True):
        assert want.shape == got.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not [op for op in ops if "convolution" in op]  # ops: what `conv`, run last, dispatched
    assert any(op.startswith(("addmm", "mm")) for op in ops)
    if (kernel, size, stride) == (3, 2, 2):  # the 5 taps that meet only padding: exactly 0
        dead = torch.ones(3, 3, dtype=torch.bool)
        dead[1:, 1:] = False
        assert torch.count_nonzero(conv.weight.grad[:, :, dead]) == 0


def test_in_inference_a_two_by_two_output_stays_a_convolution():
    # Scoring is checked image by image against the plain path: the unfolded product is for
    # training only.
    conv = use_shortcuts(nn.Conv2d(8, 8, 1, stride=2))
    with torch.inference_mode(), dispatched_ops() as ops:
        conv(torch.randn(3, 8, 4, 4))
    assert [op for op in ops if op.startswith(("conv", "convolution"))]


def test_resnet18_trains_at_28_px_bit_for_bit_as_with_autograd_through_the_slice(monkeypatch: pytest.MonkeyPatch):
    # Five SGD steps (Nesterov momentum, weight decay on every tap, fused) in float32: every
    # parameter and gradient equal, the skipped taps' decay included.
    config = ModelConfig(arch="resnet18", weights="none", stem="imagenet")
    torch.manual_seed(1)
    batches = [(torch.randn(6, 3, 28, 28), torch.randint(0, 10, (6,))) for _ in range(5)]
    runs = []
    for path in ("live tap conv", "slice"):
        if path == "slice":
            slice_autograd(monkeypatch)
        torch.manual_seed(0)
        model = build_resnet(config, num_classes=10).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3, fused=True)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append({n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()})
    for name, (weight, grad) in runs[0].items():
        assert torch.equal(weight, runs[1][name][0]) and torch.equal(grad, runs[1][name][1]), name
    torch.manual_seed(0)
    before = build_resnet(config, num_classes=10)
    assert not torch.equal(runs[0]["layer4.1.conv2.weight"][0][:, :, 0, 0],
                           before.state_dict()["layer4.1.conv2.weight"][:, :, 0, 0])  # a dead tap moved


def test_autograd_grad_and_hooks_see_the_weight_gradient_as_before(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    conv = use_shortcuts(nn.Conv2d(8, 8, 3, padding=1, bias=False))
    x = torch.randn(2, 8, 1, 1)
    (got,) = torch.autograd.grad(conv(x).square().sum(), [conv.weight])
    assert conv.weight.grad is None
    seen = []
    conv.weight.register_hook(lambda g: seen.append(g.clone()))
    conv(x).square().sum().backward()
    slice_autograd(monkeypatch)
    (want,) = torch.autograd.grad(conv(x).square().sum(), [conv.weight])
    assert torch.equal(got, want) and torch.equal(seen[0], want) and torch.equal(conv.weight.grad, want)


def test_dense_taps_name_the_tap_between_every_output_and_input_pixel():
    assert dense_taps(3, 1, 1, 2) == ((1, 2), (0, 1))  # 2x2 map: output 0 reads inputs 0, 1 through taps 1, 2
    assert dense_taps(3, 2, 1, 2) == ((1, 2),)  # stride 2: one output, the lower-right taps
    assert dense_taps(3, 1, 1, 1) == ((1,),)
    assert dense_taps(1, 1, 0, 2) is None  # a 1x1 convolution: output 0 never reads input 1
    assert dense_taps(3, 1, 1, 3) is None  # output 0 never reads input 2
    assert dense_taps(1, 2, 0, 2) is None


@pytest.mark.parametrize(("kernel", "pad", "size", "stride", "dense"), [
    (3, 1, 2, 1, True), (3, 1, 2, 2, True), (3, 1, 1, 1, True), (1, 0, 1, 1, True), (7, 3, 2, 2, True),
    (1, 0, 2, 1, False), (1, 0, 2, 2, False), (3, 1, 3, 1, False), (3, 1, 4, 2, False), (5, 2, 2, 1, True),
])
def test_a_small_map_conv_is_the_plain_conv_in_inference(kernel: int, pad: int, size: int, stride: int, dense: bool):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, kernel, stride=stride, padding=pad, bias=True).double()
    small = copy.deepcopy(plain)
    small.__class__ = SmallMapConv2d
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 6, size, size, dtype=torch.float64).contiguous(memory_format=layout)
        with torch.no_grad():
            torch.testing.assert_close(small(x), plain(x), rtol=1e-12, atol=1e-12)
    assert ((size, size) in small.__dict__.get("_matrices", {})) == dense
    x.requires_grad_(True)  # with autograd on it stays the convolution
    torch.testing.assert_close(torch.autograd.grad(small(x).sum(), x)[0],
                               torch.autograd.grad(plain(x).sum(), x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_folded_resnet_at_28_px_scores_its_smallest_maps_as_matrix_products(arch: str):
    model = build_resnet(ModelConfig(arch=arch, weights="none", stem="imagenet"), num_classes=10)
    folded = for_inference(model)
    with torch.inference_mode():
        folded(torch.randn(2, 3, 28, 28).contiguous(memory_format=torch.channels_last))
    as_matrix = {n for n, m in folded.named_modules() if m.__dict__.get("_matrices")}
    assert "layer3.1.conv2" in as_matrix and "layer4.1.conv2" in as_matrix  # 3x3 on 2x2, on 1x1
    assert "layer1.0.conv1" not in as_matrix and "conv1" not in as_matrix  # 7x7 and 14x14 maps: convolutions


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 2), (2, 1), (3, 3), (7, 7)])
def test_a_small_map_batchnorm_is_batchnorm_and_keeps_the_same_running_averages(size: tuple[int, int]):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(12).double()
    with torch.no_grad():
        plain.weight.normal_(1, 0.3)
        plain.bias.normal_(0, 0.3)
    small = use_shortcuts(copy.deepcopy(plain))
    assert type(small) is SmallMapBatchNorm2d
    x = torch.randn(6, 12, *size, dtype=torch.float64)
    target = torch.randn(6, 12, *size, dtype=torch.float64)
    grads = []
    for bn in (plain, small):
        xi = x.clone().requires_grad_(True)
        outs = [bn.train()(xi) for _ in range(2)]  # two steps: the running averages move twice
        F.mse_loss(outs[1], target).backward()
        grads.append([outs[1].detach(), xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var])
        assert bn.num_batches_tracked.item() == 2
        assert outs[1].is_contiguous()
    for want, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "pad", "size", "stride"), [(3, 0, 3, 1), (3, 1, 1, 1), (3, 1, 2, 2), (1, 0, 2, 2)])
def test_a_one_pixel_convolution_takes_channels_last_weights_and_input(kernel: int, pad: int, size: int,
                                                                        stride: int):
    # On CUDA the model and its input are channels_last: a 3x3 weight is then no view of a matrix.
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, kernel, stride=stride, padding=pad).double().to(memory_format=torch.channels_last)
    live = use_shortcuts(copy.deepcopy(plain))
    x = torch.randn(4, 6, size, size, dtype=torch.float64).to(memory_format=torch.channels_last)
    torch.testing.assert_close(live(x), plain(x), rtol=1e-12, atol=1e-12)
