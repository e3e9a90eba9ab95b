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
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU, where it is faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
