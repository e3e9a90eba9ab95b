"""One training step of the q2 smoke networks on the CPU (one thread, float32), with layer4's
`LiveTapConv2d` weight gradient taken two ways: autograd through a slice of the weight (the
path before `_LiveTapConv`) and `_LiveTapConv`. The student is q2's ResNet-18 (28 px, batch 25),
the teacher its ResNet-50 (28 px, batch 64), built as kdsweep builds them, with fused SGD.

A third variant bounds what the full-shape weight costs at all: every sliced convolution given
its live taps as a parameter of their own (no full-shape gradient, no dead taps for the
optimiser: not the same training, only a bound). Most of the gap to it is the optimiser's work
on the skipped taps (their weight decay and momentum, which training keeps) and the forward's
gather of the live taps, which reads every cache line of the full weight. Keeping the full-shape
gradient tensor from one step to the next (rewriting only its live taps, no fresh zero fill) was
measured as well: no gain over a fresh one per step (backward 60.6 against 59.6 ms alternating in
one process, 70-73 against 65-68 ms in separate processes), so it is not done. Storing the
sliced convolutions' weights tap-major (memory order kh, kw, out, in: the live taps one contiguous
block, no gather) was measured too, bit-identical: forward 31.1 -> 25.4 ms, backward 54.4 ->
50.7 ms, but fused SGD 10.8 -> 20.1 ms (its CPU kernel takes 4.6 ms instead of 1.7 ms on a
permuted 512x512x3x3 weight), so the step stays at 96 ms; not done either.

It also times scoring (`scoring`): the smallest maps' convolutions as convolutions against
`SmallMapConv2d`'s matrix products, both networks, 1,024 images per forward.

`python -m benchmarks.live_tap_step [--steps N]` prints the median process CPU milliseconds of
the forward (with the loss), backward and optimiser step of each variant, whether the two exact
variants kept bit-identical parameters and gradients after every step, and the 1-minute load
average at start and end. Variants alternate step by step, so a change of load hits them alike.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import click


def _own_live_params(model, x):
    """The bound variant: each sliced convolution replaced by a conv on its live taps alone."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from kdsweep.core import shortcuts

    class Own(nn.Module):
        def __init__(self, conv, rows, cols):
            super().__init__()
            self.weight = nn.Parameter(conv.weight.detach()[:, :, rows[0]:rows[1], cols[0]:cols[1]].clone())
            self.stride, self.padding = conv.stride, (rows[2], cols[2])

        def forward(self, x):
            return F.conv2d(x, self.weight, None, self.stride, self.padding)

    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: sizes.__setitem__(n, a[0].shape[-2:]))
             for n, m in model.named_modules() if isinstance(m, shortcuts.LiveTapConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, m in list(model.named_modules()):
        if isinstance(m, shortcuts.LiveTapConv2d):
            rows = shortcuts.live_taps(m.kernel_size[0], m.stride[0], m.padding[0], sizes[n][0])
            cols = shortcuts.live_taps(m.kernel_size[1], m.stride[1], m.padding[1], sizes[n][1])
            if rows and cols:
                parent, leaf = n.rsplit(".", 1)
                setattr(model.get_submodule(parent), leaf, Own(m, rows, cols))
    return model


def measure(steps: int, warmup: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.common import q2_smoke_nets
    from kdsweep.core import models, shortcuts
    from kdsweep.core.train import _optimizer

    torch.set_num_threads(1)
    nets = q2_smoke_nets()
    plain_autograd = shortcuts._plain_autograd
    out: dict = {"threads": 1, "torch": torch.__version__, "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    for name, (mcfg, batch, tcfg) in nets.items():
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(batch, 3, 28, 28, generator=gen) for _ in range(4)]
        ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(4)]
        states = {}
        for v in ("slice_autograd", "live_tap_conv", "bound_own_live_params"):
            torch.manual_seed(0)
            model = models.build_model(mcfg, (3, 28, 28), 10)
            if v == "bound_own_live_params":
                model = _own_live_params(model, xs[0])
            model.train()
            states[v] = (model, _optimizer(model, tcfg))
        parts: dict = {v: {"forward": [], "backward": [], "optimizer": []} for v in states}
        identical = True
        for i in range(warmup + steps):
            x, y = xs[i % 4], ys[i % 4]
            for v, (model, opt) in states.items():
                shortcuts._plain_autograd = (lambda w: False) if v == "slice_autograd" else plain_autograd
                try:
                    t0 = time.process_time()
                    loss = F.cross_entropy(model(x), y)
                    t1 = time.process_time()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    t2 = time.process_time()
                    opt.step()
                    t3 = time.process_time()
                finally:
                    shortcuts._plain_autograd = plain_autograd
                if i >= warmup:
                    for part, dt in zip(("forward", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                        parts[v][part].append(dt)
            before = dict(states["slice_autograd"][0].named_parameters())
            for n, p in states["live_tap_conv"][0].named_parameters():
                identical &= torch.equal(p, before[n]) and torch.equal(p.grad, before[n].grad)
        med = {v: {k: round(1000 * statistics.median(ts), 2) for k, ts in d.items()} for v, d in parts.items()}
        for m in med.values():
            m["step"] = round(sum(m.values()), 2)
        out[name] = {"batch": batch, "steps": steps, "median_cpu_ms": med,
                     "step_speedup_live_tap_conv": round(med["slice_autograd"]["step"] / med["live_tap_conv"]["step"], 3),
                     "bit_identical_params_and_grads_every_step": bool(identical)}
    out["scoring"] = scoring(nets, max(3, steps // 5))
    out["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    return out


def scoring(nets: dict, rounds: int) -> dict:
    """Scoring 1,024 images (inference mode, channels_last, BatchNorms folded) with the smallest
    maps' convolutions as convolutions (`LiveTapConv2d`) and as matrix products (`SmallMapConv2d`,
    what `for_inference` gives), alternating; BatchNorm statistics set away from 0/1 first."""
    import torch
    from torch import nn

    from kdsweep.core import models, shortcuts

    out = {}
    for name, (mcfg, _, _) in nets.items():
        torch.manual_seed(0)
        model = models.build_model(mcfg, (3, 28, 28), 10)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
        matrix = shortcuts.for_inference(model.eval())
        conv = shortcuts.for_inference(model.eval())
        for m in conv.modules():
            if type(m) is shortcuts.SmallMapConv2d:
                m.__class__ = shortcuts.LiveTapConv2d
        x = torch.randn(1024, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {"convolution": [], "matrix_product": []}
        with torch.inference_mode():
            same = bool(torch.equal(conv(x).argmax(1), matrix(x).argmax(1)))
            for _ in range(rounds):
                for v, net in (("convolution", conv), ("matrix_product", matrix)):
                    t0 = time.process_time()
                    net(x)
                    times[v].append(time.process_time() - t0)
        med = {v: round(1000 * statistics.median(ts) / 1024, 4) for v, ts in times.items()}
        out[name] = {"median_cpu_ms_per_image": med, "speedup": round(med["convolution"] / med["matrix_product"], 3),
                     "same_top1": same, "rounds": rounds}
    return out


@click.command()
@click.option("--steps", type=int, default=30, show_default=True, help="Timed steps per variant.")
def main(steps: int) -> None:
    """Time one q2 smoke training step (layer4's live-tap weight gradient, two ways) and scoring."""
    click.echo(json.dumps(measure(steps), indent=1))


if __name__ == "__main__":
    main()
