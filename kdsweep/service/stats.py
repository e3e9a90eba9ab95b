"""How much of a difference between trials is noise: binomial and paired (McNemar) intervals.

Every trial of a study is scored on the same validation images, so two trials are compared
*paired*, image by image: only the images one gets right and the other wrong (the discordant
pairs) carry information about which is better. The objective stores each complete trial's
per-image correctness as a packed bit mask (`MASK`, see `pack`), and these functions take
plain `FrozenTrial`s or masks, so `status`, `best`, `report` and the launch summary can all
call them.

Formulas (n images, a and b the 0/1 correctness of trials A and B per image):

* one accuracy p: binomial standard error sqrt(p(1-p)/n) (`binomial_se`);
* A - B: d = (n10 - n01)/n, where n10 counts images A gets right and B wrong; its standard
  error is sqrt(n10 + n01 - (n10 - n01)^2/n)/n (the paired-proportions Wald interval behind
  McNemar's test), and the 95% interval is d ± 1.96·SE (`paired_difference`).

A sweep's top value is also biased upwards: it is the maximum of many noisy values (the
winner's curse), so `noise_lines` says so and points to `kdsweep best --verify`, which
re-trains over seeds and remains the judge.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial

from kdsweep.service import keys

MASK = keys.VAL_CORRECT  # trial user attr: base64 of np.packbits(per-image correctness)
MASK_N = keys.VAL_N  # trial user attr: how many images the mask holds (packbits pads to 8)
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def pack(correct: Sequence[bool] | np.ndarray) -> str:
    """Per-image correctness as base64 text of its packed bits (n/8 bytes: 836 chars for 5,000)."""
    bits = np.asarray(correct, dtype=bool)
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
    """The bool array `pack` stored, `n` images long."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(raw, count=n).astype(bool)


def mask_of(trial: FrozenTrial) -> np.ndarray | None:
    """The trial's validation correctness per image, or None for a trial that stored none."""
    text, n = trial.user_attrs.get(MASK), trial.user_attrs.get(MASK_N)
    if not text or not n:
        return None
    return unpack(text, int(n))


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n images: sqrt(p(1-p)/n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


@dataclass(frozen=True)
class PairedDiff:
    """accuracy(A) - accuracy(B) on the same n images, with its 95% interval."""

    n: int
    a_only: int  # images A classifies right and B wrong
    b_only: int  # images B classifies right and A wrong
    mean: float
    low: float
    high: float

    @property
    def exceeds_noise(self) -> bool:
        """Whether the 95% interval excludes zero."""
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        verdict = "beyond noise" if self.exceeds_noise else "within noise"
        return (f"{self.mean:+.4f} (95% CI {self.low:+.4f} .. {self.high:+.4f}, paired on {self.n} "
                f"images: {self.a_only} right only in the first, {self.b_only} only in the second): {verdict}")


def paired_difference(a: np.ndarray, b: np.ndarray) -> PairedDiff:
    """A - B from two correctness masks of the same images (McNemar-style paired interval)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two masks of the same images, got shapes {a.shape} and {b.shape}")
    n = len(a)
    n10 = int(np.count_nonzero(a & ~b))
    n01 = int(np.count_nonzero(~a & b))
    d = (n10 - n01) / n
    se = math.sqrt(max(n10 + n01 - (n10 - n01) ** 2 / n, 0.0)) / n
    return PairedDiff(n, n10, n01, d, d - Z95 * se, d + Z95 * se)


def compare_trials(a: FrozenTrial, b: FrozenTrial) -> PairedDiff | None:
    """A - B paired on their validation images; None unless both stored masks of one length."""
    ma, mb = mask_of(a), mask_of(b)
    if ma is None or mb is None or ma.shape != mb.shape:
        return None
    return paired_difference(ma, mb)


def noise_lines(ranked: Sequence[FrozenTrial], study_name: str, k: int = 3, verified: bool = False) -> list[str]:
    """What the top of a sweep means, as text lines: the winner's binomial error, its paired
    differences from the next `k - 1` trials, the selection bias, and what to run next
    (`verified`: a seed verification exists, which is then what settles it).

    `ranked` holds complete trials, best first (as `kdsweep.service.verify.top_trials` gives).
    """
    if not ranked:
        return []
    best = ranked[0]
    mask = mask_of(best)
    lines = []
    if mask is not None and best.value is not None:
        se = binomial_se(best.value, len(mask))
        lines.append(f"top value {best.value:.4f} ± {se:.4f} (binomial standard error on {len(mask)} "
                     f"validation images); as the best of {len(ranked)} complete trials it is biased "
                     "upwards (selection), so expect less on new seeds and on the test set.")
    else:
        lines.append(f"top value {best.value:.4f} is the best of {len(ranked)} complete trials: "
                     "biased upwards (selection); no per-image scores were stored for an interval.")
    within = []
    for other in ranked[1:k]:
        diff = compare_trials(best, other)
        if diff is None:
            continue
        lines.append(f"trial {best.number} - trial {other.number}: {diff.text()}")
        if not diff.exceeds_noise:
            within.append(other.number)
    if within:
        then = (VERIFIED if verified else
                f"run `kdsweep best {study_name} --verify` (a race on fresh seeds).")
        lines.append(f"the winner is within validation noise of trial(s) {', '.join(map(str, within))}: "
                     f"which is best is not settled by one seed; {then}")
    else:
        then = VERIFIED if verified else f"confirm with `kdsweep best {study_name} --verify`."
        lines.append(f"seed noise is not in these intervals; {then}")
    return lines


VERIFIED = "the seed verification is what settles it."
