"""Whether the installed torch and torchvision belong together, said in one sentence.

pip can end with a torch and a torchvision that do not: versions of different releases, or a
CPU build of one beside a CUDA build of the other (when a wheel index is reachable for one and
not the other). Training then dies deep inside torchvision (`operator torchvision::nms does not
exist`) with a long traceback; checked first, it is one sentence naming what to reinstall.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from types import ModuleType

# torch 2.N pairs with torchvision 0.(N+15): 2.0 with 0.15, 2.4 with 0.19, 2.14 with 0.29.
TORCHVISION_OFFSET = 15


class InstallError(RuntimeError):
    """torch and torchvision do not load together; the message says what to reinstall."""


def _release(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_build(value: object) -> str | None:
    """The CUDA version a build was made for ('12.6'), or None for a CPU build. torch says
    '12.6' or None; torchvision an int such as 12060 (13000 is 13.0), or -1 without CUDA."""
    if value is None or value == -1 or value == "":
        return None
    if isinstance(value, int):
        return f"{value // 1000}.{value % 1000 // 10}"
    return str(value)


def mismatch(torch_version: str, torch_cuda: object, vision_version: str, vision_cuda: object) -> str | None:
    """The sentence for a torch / torchvision pair that does not belong together, else None."""
    fix = (f"reinstall both from one place, e.g. `pip install --force-reinstall torch=={torch_version.split('+')[0]} "
           f"torchvision`, adding `--index-url https://download.pytorch.org/whl/cpu` for the CPU-only wheels "
           "where that index is reachable")
    t, v = _release(torch_version), _release(vision_version)
    if t and v and t[0] == 2 and v != (0, t[1] + TORCHVISION_OFFSET):
        return (f"torch {torch_version} and torchvision {vision_version} are not a pair (torch 2.{t[1]} "
                f"goes with torchvision 0.{t[1] + TORCHVISION_OFFSET}); {fix}.")
    tc, vc = cuda_build(torch_cuda), cuda_build(vision_cuda)
    if tc != vc:
        def kind(cuda: str | None) -> str:
            return f"CUDA {cuda}" if cuda else "CPU"

        return (f"torch {torch_version} is a {kind(tc)} build but torchvision {vision_version} a {kind(vc)} "
                f"build; {fix}.")
    return None


def check(import_module: Callable[[str], ModuleType] = importlib.import_module) -> None:
    """InstallError (one sentence) unless torch and torchvision import and belong together."""
    try:
        torch = import_module("torch")
    except Exception as exc:
        raise InstallError(f"torch does not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "reinstall it: `pip install --force-reinstall torch torchvision`.") from None
    try:
        vision = import_module("torchvision")
    except Exception as exc:
        raise InstallError(f"torchvision does not load beside torch {torch.__version__} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"reinstall torchvision for this torch: `pip install --force-reinstall "
                           f"torch=={torch.__version__.split('+')[0]} torchvision`.") from None
    problem = mismatch(torch.__version__, torch.version.cuda, vision.__version__,
                       getattr(getattr(vision, "version", None), "cuda", None))
    if problem:
        raise InstallError(problem)
