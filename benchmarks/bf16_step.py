"""One training step of the q2 smoke preset's networks on the CPU, one thread: float32 against
bf16 autocast, default layout against channels_last. The student is its ResNet-18 (28 px,
batch 25), the teacher its ResNet-50 (28 px, batch 64), both built as kdsweep builds them
(LiveTapConv2d in layer4), with fused SGD; the loss is computed in float32 either way.

`python -m benchmarks.bf16_step [--steps N]` prints the median process CPU seconds per step of
each variant, the ratios to float32 on the default layout, the medians of the step's parts
(forward with the loss, backward, optimiser step) and the CPU's bf16 support. Variants alternate step by step
within rounds, so a change of load on a shared host hits them alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import click


def cpu_bf16() -> dict:
    """What this CPU and torch offer for bf16: the CPU's flags and oneDNN's own answer."""
    import torch

    from kdsweep.core.devices import cpu_flags

    return {"cpu_flags": sorted(cpu_flags() & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"}),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "torch": torch.__version__}


def _variants():
    return [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]


def measure(steps: int, warmup: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.common import q2_smoke_nets
    from kdsweep.core import models
    from kdsweep.core.train import _optimizer

    torch.set_num_threads(1)
    nets = q2_smoke_nets()
    out: dict = {"threads": 1, **cpu_bf16(), "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    for name, (mcfg, batch, tcfg) in nets.items():
        states = {}
        for v in _variants():
            torch.manual_seed(0)
            model = models.build_model(mcfg, (3, 28, 28), 10)
            if v[1]:
                model = model.to(memory_format=torch.channels_last)
            model.train()
            states[v] = (model, _optimizer(model, tcfg))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 28, 28, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        times: dict = {v: [] for v in states}
        parts: dict = {v: {"forward": [], "backward": [], "optimizer": []} for v in states}
        for i in range(warmup + steps):
            for v, (model, opt) in states.items():
                inp = x.contiguous(memory_format=torch.channels_last) if v[1] else x
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if v[0] == "bf16" else contextlib.nullcontext()
                t0 = time.process_time()
                with ctx:
                    logits = model(inp)
                loss = F.cross_entropy(logits.float(), y)
                t1 = time.process_time()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.process_time()
                opt.step()
                t3 = time.process_time()
                if i >= warmup:
                    times[v].append(t3 - t0)
                    for part, dt in zip(("forward", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                        parts[v][part].append(dt)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        base = med[("fp32", False)]
        out[name] = {
            "batch": batch,
            "steps": steps,
            "median_cpu_s": {f"{p}{'_channels_last' if cl else ''}": round(m, 4) for (p, cl), m in med.items()},
            "speedup_vs_fp32": {f"{p}{'_channels_last' if cl else ''}": round(base / m, 3)
                                for (p, cl), m in med.items()},
            "median_cpu_ms_by_part": {f"{p}{'_channels_last' if cl else ''}":
                                      {k: round(1000 * statistics.median(ts), 1) for k, ts in parts[(p, cl)].items()}
                                      for (p, cl) in parts},
        }
    out["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    return out


@click.command()
@click.option("--steps", type=int, default=20, show_default=True, help="Timed steps per variant.")
def main(steps: int) -> None:
    """Time one training step of the q2 smoke networks: fp32 vs bf16, layouts."""
    click.echo(json.dumps(measure(steps), indent=1))


if __name__ == "__main__":
    main()
