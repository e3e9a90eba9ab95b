"""Devices, precision and CPU threads for one training process."""

from __future__ import annotations

import contextlib
import os

import torch


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says what to do instead."""


def resolve_device(name: str) -> torch.device:
    """Map `auto | cpu | cuda | cuda:N` to a torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was requested but this machine has no usable CUDA GPU; "
                "use --device cpu (or auto)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) are visible."
            )
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N.")
    return device


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """Cap this process's CPU threads so several workers can share the cores without thrashing."""
    if threads is None:
        threads = int(os.environ["KDSWEEP_THREADS"]) if os.environ.get("KDSWEEP_THREADS") else None
    if threads is not None and threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on the CPU.

    On the CPU bf16 buys too little to be worth a second precision, even with AMX: one thread,
    torch 2.14, a Xeon with amx_bf16 (oneDNN ran its AMX kernels), a q2 smoke training step ran
    1.09-1.12x faster under bf16 autocast for the ResNet-18 student (batch 25, 28 px) and
    1.11-1.22x for the ResNet-50 teacher (batch 64; 1.20-1.34x with channels_last, which alone
    is 0.91-0.99x), in four runs of `python -m benchmarks.bf16_step` on a loaded host. The
    student's backward, 60% of its step, went only from 66 to 59 ms (forward 33 -> 30 ms,
    optimiser 11 ms either way); channels_last sped its bf16 forward up (18 ms) but not its
    backward (68 ms), and doubled the optimiser step (23 ms)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
