"""Devices, precision and CPU threads for one training process."""

from __future__ import annotations

import contextlib
import functools
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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (read from /proc/cpuinfo; elsewhere, no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_bf16()


def _cpu_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:
        return frozenset()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` as it will run: "fp32" and "bf16" stay; "auto" becomes $KDSWEEP_PRECISION
    where set (this host's choice), else "bf16" on a CUDA GPU that runs it natively, else
    "fp32". (Autocast leaves float64 tensors alone: a float64 run, the tests' rounding
    yardstick, is float64 whatever this says.)

    Why not bf16 on a CPU that runs it natively: on the q2 smoke preset (an AMD EPYC with
    AVX-512 BF16, one thread; `python -m benchmarks.bf16_accuracy`) the ResNet-50 teacher's
    build ran 1.39x faster but its accuracy differed from fp32's by +0.7, -2.7 and +1.2 points
    over three seeds (mean -0.3, SE 1.2: not shown within 0.5 point), and a trial ran only 1.13x
    faster (its scoring, half the time, stays fp32) with its accuracy 0.69 point lower on average
    over six seeds (SE 0.37)."""
    if precision != "auto":
        return precision
    chosen = os.environ.get("KDSWEEP_PRECISION", "").strip()
    if chosen:
        if chosen not in ("fp32", "bf16"):
            raise DeviceError(f"KDSWEEP_PRECISION must be fp32 or bf16, got {chosen!r}.")
        return chosen
    return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str, training: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved `precision` of "bf16" (no loss scaling needed), else full
    precision; evaluation on the CPU (`training=False`) is always full precision, so a model's
    scores there depend on its weights alone.

    Measured on the CPU, one thread, torch 2.14, a training step of the q2 smoke networks
    (`python -m benchmarks.bf16_step`): on an AMD EPYC with AVX-512 BF16, 1.27x faster for the
    ResNet-18 student (batch 25, 28 px) and 1.45x for the ResNet-50 teacher (batch 64); on a Xeon
    with AMX, 1.09-1.12x and 1.11-1.22x. Where a CPU lacks both, bf16 is emulated and slower:
    "auto" leaves it off there (`resolve_precision`)."""
    if precision == "bf16" and (training or device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
