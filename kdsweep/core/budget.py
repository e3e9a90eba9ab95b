"""The matched parameter budget of Q1: widths that give an MLP or a CNN `cfg.budget` parameters.

Q1 compares an MLP with a CNN "with the same number of parameters", so the widths are derived,
not sampled: `resolve(cfg, in_shape, num_classes)` returns a copy of `cfg` whose `hidden` (MLP)
or `channels` (CNN) make the trainable count land within `tolerance` (relative, default 1%) of
`cfg.budget`. Counts always come from `count_params`, which builds the very model `build_model`
would build on the meta device (no memory, ~1 ms), so the solver can never disagree with the
real network; every search below is a bisection on such counts, which grow with each width.

MLP (`depth` hidden layers)
    All hidden layers but the last share one width h: the largest h whose uniform network fits
    the budget. The last hidden width is then solved to the nearest integer; each unit of it
    moves the count by only h + 1 + num_classes, so the total lands very close. For depth 1 the
    single width is solved to the nearest integer (steps of in_features + 1 + num_classes, i.e.
    0.3% of a 1M budget on 3x32x32).

CNN (three stages of `depth` conv blocks)
    `width` is the sampled choice and fixes the first two stages at (w, 2w) channels. The last
    stage's channels c3 are solved to the nearest integer in [w, 16w]: below w the network would
    narrow towards its head, beyond 16w it would be almost all top stage. A width that needs
    more than the budget even at c3 = w, or cannot reach it at c3 = 16w, raises BudgetError
    naming the widths that would work. If rounding c3 still leaves the count outside the
    tolerance (a c3 step costs ~18*c3*(depth-1) weights), the final conv of the last stage gets
    its own output width, solved to the nearest integer: `channels` then has 4 entries
    (w, 2w, c3, c_out) and the head stays one small Linear(c_out, num_classes).

`resolve` also records the DropBlock block side used per stage in `block_sizes` (dropblock
only; () otherwise). `feasible` and `max_width` let a study keep widths that cannot meet the
budget out of its search space instead of failing trials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from kdsweep.core.config import ConfigError, ModelConfig
from kdsweep.core.models import build_model, check, dropblock_sizes

MAX_TOP_RATIO = 16  # c3 may be at most this many times the first-stage width


class BudgetError(ValueError):
    """The chosen architecture cannot meet the parameter budget; the message says what would."""


def count_params(cfg: ModelConfig, in_shape: Sequence[int], num_classes: int) -> int:
    """Trainable parameters of `build_model(cfg, in_shape, num_classes)`, built on the meta device.

    Results are memoised per process. The key drops the regulariser settings: Dropout,
    Dropout2d and DropBlock2d carry no parameters (tests check the count against real models
    for every regulariser), and building a CNN costs ~10 ms even on the meta device.
    """
    if cfg.budget is not None and not (cfg.hidden if cfg.arch == "mlp" else cfg.channels):
        cfg = resolve(cfg, in_shape, num_classes)  # the model a budget config builds
    key = dataclasses.replace(
        cfg, regularizer="none", rate=0.0, ramp=True, block_size=1, block_sizes=()
    )
    return _count(key, tuple(int(s) for s in in_shape), int(num_classes))


@functools.lru_cache(maxsize=8192)
def _count(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> int:
    with torch.device("meta"):
        model = build_model(cfg, in_shape, num_classes)  # type: ignore[arg-type]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve(
    cfg: ModelConfig, in_shape: Sequence[int], num_classes: int, tolerance: float = 0.01
) -> ModelConfig:
    """A copy of `cfg` with `hidden`/`channels`/`block_sizes` set so that the trainable count is
    within `tolerance` (relative) of `cfg.budget`.

    Raises ConfigError when `cfg` has no budget or is not an mlp/cnn, and BudgetError when the
    sampled choices (depth, width, factorized) cannot meet the budget.
    """
    if cfg.arch not in ("mlp", "cnn"):
        raise ConfigError(f"a parameter budget applies to mlp and cnn only, not {cfg.arch!r}.")
    if cfg.budget is None or cfg.budget < 1:
        raise ConfigError(f"model.budget must be a positive parameter count, got {cfg.budget}.")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}.")
    check(cfg, in_shape, num_classes)  # counting ignores the regulariser; validate it here
    if cfg.arch == "mlp":
        return _resolve_mlp(
            dataclasses.replace(cfg, channels=(), block_sizes=()), in_shape, num_classes, tolerance
        )
    sizes = dropblock_sizes(cfg.block_size, in_shape) if cfg.regularizer == "dropblock" else ()
    return _resolve_cnn(
        dataclasses.replace(cfg, hidden=(), block_sizes=sizes), in_shape, num_classes, tolerance
    )


def feasible(
    cfg: ModelConfig, in_shape: Sequence[int], num_classes: int, tolerance: float = 0.01
) -> bool:
    """Whether `resolve` succeeds for `cfg` (ConfigError, a broken config, still propagates)."""
    try:
        resolve(cfg, in_shape, num_classes, tolerance)
    except BudgetError:
        return False
    return True


def max_width(
    cfg: ModelConfig,
    in_shape: Sequence[int],
    num_classes: int,
    candidates: Iterable[int],
    tolerance: float = 0.01,
) -> list[int]:
    """The CNN widths among `candidates` (in their order) for which `cfg` resolves to its budget."""
    return [
        w
        for w in candidates
        if feasible(dataclasses.replace(cfg, width=w), in_shape, num_classes, tolerance)
    ]


# -- solvers -------------------------------------------------------------------------------------


def _memo(f: Callable[[int], int]) -> Callable[[int], int]:
    cache: dict[int, int] = {}

    def g(x: int) -> int:
        if x not in cache:
            cache[x] = f(x)
        return cache[x]

    return g


def _first_at_least(f: Callable[[int], int], target: float, lo: int, hi: int) -> int:
    """Smallest x in [lo, hi] with f(x) >= target for non-decreasing f; hi if there is none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _nearest(f: Callable[[int], int], target: int, lo: int, hi: int) -> int:
    """The x in [lo, hi] whose f(x) is closest to target, for non-decreasing f (ties: smaller x)."""
    x = _first_at_least(f, target, lo, hi)
    if x > lo and abs(f(x - 1) - target) <= abs(f(x) - target):
        return x - 1
    return x


def _within(n: int, budget: int, tolerance: float) -> bool:
    return abs(n - budget) <= tolerance * budget


def _shape(in_shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in in_shape)


def _resolve_mlp(
    cfg: ModelConfig, in_shape: Sequence[int], num_classes: int, tolerance: float
) -> ModelConfig:
    budget, depth = int(cfg.budget or 0), cfg.depth

    def count(hidden: tuple[int, ...]) -> int:
        return count_params(dataclasses.replace(cfg, hidden=hidden), in_shape, num_classes)

    smallest = count((1,) * depth)
    if smallest > budget * (1 + tolerance):
        raise BudgetError(
            f"mlp with depth {depth} on {_shape(in_shape)} inputs needs at least {smallest:,} "
            f"parameters but the budget is {budget:,}; lower the depth or raise the budget."
        )
    # A hidden width w alone costs more than w parameters, so `budget` bounds every search.
    if depth == 1:
        hidden: tuple[int, ...] = (_nearest(_memo(lambda x: count((x,))), budget, 1, budget),)
    else:
        uniform = _memo(lambda h: count((h,) * depth))
        h = max(1, _first_at_least(uniform, budget + 1, 1, budget) - 1)
        last = _nearest(_memo(lambda x: count((h,) * (depth - 1) + (x,))), budget, 1, budget)
        hidden = (h,) * (depth - 1) + (last,)
    n = count(hidden)
    if not _within(n, budget, tolerance):
        raise BudgetError(
            f"mlp with depth {depth} lands at {n:,} parameters, outside {tolerance:.1%} of the "
            f"budget {budget:,}; lower the depth or raise the budget."
        )
    return dataclasses.replace(cfg, hidden=hidden)


def _resolve_cnn(
    cfg: ModelConfig, in_shape: Sequence[int], num_classes: int, tolerance: float
) -> ModelConfig:
    budget, w = int(cfg.budget or 0), cfg.width
    top = MAX_TOP_RATIO * w

    def count(width: int, channels: tuple[int, ...]) -> int:
        c = dataclasses.replace(cfg, width=width, channels=channels)
        return count_params(c, in_shape, num_classes)

    by_c3 = _memo(lambda c3: count(w, (w, 2 * w, c3)))
    name = f"{'factorized ' if cfg.factorized else ''}cnn width {w} with depth {cfg.depth}"
    if by_c3(w) > budget * (1 + tolerance):
        # the smallest network of a width grows with the width, so bisect for the largest that fits
        smallest = _memo(lambda v: count(v, (v, 2 * v, v)))
        fits = _first_at_least(smallest, math.floor(budget * (1 + tolerance)) + 1, 1, w) - 1
        advice = f"choose width <= {fits} or raise the budget" if fits >= 1 else "raise the budget"
        raise BudgetError(
            f"{name} needs at least {by_c3(w):,} parameters but the budget is {budget:,}; {advice}."
        )
    if by_c3(top) < budget * (1 - tolerance):
        largest = _memo(lambda v: count(v, (v, 2 * v, MAX_TOP_RATIO * v)))
        needs = _first_at_least(largest, math.ceil(budget * (1 - tolerance)), w + 1, budget)
        raise BudgetError(
            f"{name} reaches at most {by_c3(top):,} parameters (last stage at {MAX_TOP_RATIO}x "
            f"width) but the budget is {budget:,}; choose width >= {needs} or lower the budget."
        )
    c3 = _nearest(by_c3, budget, w, top)
    channels: tuple[int, ...] = (w, 2 * w, c3)
    if not _within(by_c3(c3), budget, tolerance) and cfg.depth >= 2:
        # A c3 step is too coarse here; the last conv's own output width moves the count by only
        # ~9*c3 per unit (its input is still c3 wide), fine enough to land on the budget.
        by_out = _memo(lambda c: count(w, (w, 2 * w, c3, c)))
        channels = (w, 2 * w, c3, _nearest(by_out, budget, 1, budget))
    n = count(w, channels)
    if not _within(n, budget, tolerance):
        raise BudgetError(
            f"{name} lands at {n:,} parameters, outside {tolerance:.1%} of the budget "
            f"{budget:,}; choose another width or a looser tolerance."
        )
    return dataclasses.replace(cfg, channels=channels)


def count_flops(cfg: ModelConfig, in_shape: Sequence[int], num_classes: int) -> int:
    """Forward FLOPs per image of `build_model(cfg, in_shape, num_classes)`: 2 x the multiply-
    accumulates of its Conv2d and Linear layers (BatchNorm, activations, pooling and biases are
    left out: they are a few percent at most), counted by hooks on the meta device.

    A matched parameter budget is not a matched compute budget: at 30k parameters on 28x28
    images the Q1 CNN does tens of times the MLP's FLOPs, and this is how a study says so.
    """
    key = dataclasses.replace(cfg, weights="none", rate=0.0)
    return _flops(key, tuple(int(s) for s in in_shape), int(num_classes))


@functools.lru_cache(maxsize=1024)
def _flops(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> int:
    from torch import nn

    macs = 0

    def conv(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += out[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module: nn.Linear, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        macs += out[0].numel() * module.in_features

    with torch.device("meta"):
        model = build_model(cfg, in_shape, num_classes).eval()  # type: ignore[arg-type]
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(conv)
            elif isinstance(m, nn.Linear):
                m.register_forward_hook(linear)
        with torch.no_grad():
            model(torch.empty(1, *in_shape))
    return 2 * macs
