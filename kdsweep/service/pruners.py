"""A pruner that reads learning curves: stop a trial once it is unlikely to end near the incumbent.

Stock rung-based pruners (median, successive halving, Hyperband) compare a trial with other
trials *at the same epoch*: they need a population at that rung before they can stop anything,
they cut slow starters (DropBlock's ramp, strong dropout, a low learning rate) whose early values
are low but still rising, and they keep lucky early peaks. Learning-curve extrapolation (Domhan
et al., IJCAI 2015; LC-PFN, Adriaensen et al., NeurIPS 2023) asks the question that matters
instead: what is the chance that this trial ends better than the best one so far? Both stop a
trial when that chance is small. Domhan et al. fit an ensemble of parametric curves by MCMC
(seconds per decision) and LC-PFN needs pre-trained transformer weights; `CurvePruner` keeps
their stopping criterion and forecasts from the study's own finished curves instead:

* **neighbours**: the `neighbours` complete curves of the study whose last `window` epochs up to
  epoch t are closest (RMS) to the trial's; each forecasts final_i - mean_i + mean, where mean_i
  and mean are the neighbour's and the trial's average over those epochs (the trial gains what
  a curve of that shape gained; averaging keeps one noisy epoch from moving the anchor much);
* **its own slope** as `prior_curves` pseudo-curves: y_t + slope_weight * max(d_t, 0) * (T - t),
  with d_t the trial's average improvement per epoch over the window (a slow starter still
  rising is forecast to keep rising; a fall is noise, not a trend). With few complete curves these dominate, so the rule works from the
  study's second trial on, without a startup population;
* the forecast is normal with the mean of these values and their spread (floored by
  `prior_spread` with the weight of `prior_curves`); the trial is stopped when

      P(final >= incumbent - margin) < 1 - confidence,

  the incumbent being the best complete trial's value.

Neighbours make the spread local: a flat MLP-like curve is compared with flat curves (small
gains, small spread) and is stopped early; a CNN curve still climbing is compared with climbing
curves (large gains, large spread) and is kept.

Only complete trials can say how a curve ended, so they alone are neighbours; pruned trials'
partial curves are left out because they were selected for being bad (censored) and would bias
the forecast towards pessimism. Everything comes from the pruner interface (the study's stored
trials and the trial's intermediate values), so any number of workers on any hosts take the
same decision from the same storage, and recorded curves can be replayed.

NaN: a trial whose latest value is NaN (or infinite) is never pruned here. In kdsweep a
diverging loss raises TrainingError in train() before the epoch is reported and the trial
FAILs, as with any pruner; a NaN reported by another objective likewise ends as that objective
decides, not as PRUNED. Complete trials with non-finite values or another length are skipped.

Cost: each call reads the study's complete trials once (`get_trials(deepcopy=False)`); their
curves are kept per study in an array that only grows when a new trial completes, so a call
is one distance computation over it (measured at 2,000 trials in docs/benchmarks.md).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState


@dataclass
class _Curves:
    """A study's complete, full-length, finite curves (as maximised values), grown as trials complete."""

    seen: set[int] = field(default_factory=set)  # trial ids already looked at
    rows: list[list[float]] = field(default_factory=list)
    array: np.ndarray | None = None  # rows as (n, T), rebuilt when rows grow
    best: float | None = None  # the incumbent: the best finite value of a complete trial (maximised)


class CurvePruner(optuna.pruners.BasePruner):
    """Stop a trial when its forecast final value is unlikely to come within `margin` of the best.

    Parameters (values in the metric's units: accuracy in [0, 1] for kdsweep's studies):
        max_epochs: T, the epoch (step) at which trials end; forecasts are of the value there.
        margin: 0.005 = 0.5 accuracy points. A trial is kept while it may end within `margin`
            of the incumbent (the best complete trial's value).
        confidence: stop only when P(final >= incumbent - margin) < 1 - confidence
            (0.9: a trial with a 10% chance or more of coming that close is kept).
        min_epoch: the earliest epoch (step) at which a trial may be stopped.
        slope_weight: the share of the last epoch's improvement expected in each remaining
            epoch in the trial's own extrapolation (0: none; 1: linear). Dimensionless.
        prior_spread: standard deviation (metric units) of the forecast before the study has
            curves to say otherwise; 0.05 = 5 accuracy points.
        prior_curves: how many curves the own-slope extrapolation and `prior_spread` count as,
            against up to `neighbours` of the study's curves.
        neighbours: how many of the study's complete curves forecast the trial.
        window: how many epochs (up to the current one) decide which curves are neighbours.

    A minimising study is handled by negating values. Decisions depend only on the trial's
    intermediate values and the study's trials: the same inputs give the same decision.
    Nothing is stopped in a study without a complete trial, or at or after `max_epochs`.
    """

    def __init__(self, max_epochs: int, margin: float = 0.005, confidence: float = 0.9, min_epoch: int = 3,
                 slope_weight: float = 0.5, prior_spread: float = 0.05, prior_curves: float = 2.0,
                 neighbours: int = 10, window: int = 3) -> None:
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        if not 0.5 <= confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {confidence}.")
        if margin < 0 or prior_spread <= 0 or prior_curves <= 0 or min_epoch < 1 or neighbours < 1 or window < 1:
            raise ValueError("margin must be >= 0; prior_spread, prior_curves > 0; min_epoch, neighbours, "
                             "window >= 1.")
        self.max_epochs = max_epochs
        self.margin = margin
        self.confidence = confidence
        self.min_epoch = min_epoch
        self.slope_weight = slope_weight
        self.prior_spread = prior_spread
        self.prior_curves = prior_curves
        self.neighbours = neighbours
        self.window = window
        self._curves: dict[tuple[int, int, str], _Curves] = {}  # (storage, study id, name) -> curves
        self._lock = threading.Lock()  # trials of one worker process may share this pruner in threads

    def __repr__(self) -> str:
        return (f"CurvePruner(max_epochs={self.max_epochs}, margin={self.margin}, confidence={self.confidence}, "
                f"min_epoch={self.min_epoch}, slope_weight={self.slope_weight}, "
                f"prior_spread={self.prior_spread}, prior_curves={self.prior_curves}, "
                f"neighbours={self.neighbours}, window={self.window})")

    def _study_curves(self, study: optuna.Study, complete: list[FrozenTrial], sign: float) -> _Curves:
        with self._lock:
            return self._update(study, complete, sign)

    def _update(self, study: optuna.Study, complete: list[FrozenTrial], sign: float) -> _Curves:
        # Per Study object (a worker keeps one per study), with its name: an object's id can be
        # reused once it is freed (and a cache that has seen more trials than exist is reset).
        key = (id(study), study.study_name)
        cache = self._curves.get(key)
        if cache is None or len(cache.seen) > len(complete):  # new, or not the study it was
            cache = self._curves[key] = _Curves()
        if len(cache.seen) != len(complete):  # trials never leave COMPLETE: only new ones to add
            grew = False
            for ft in complete:
                if ft.number in cache.seen:
                    continue
                cache.seen.add(ft.number)
                if ft.value is not None and math.isfinite(ft.value):
                    value = sign * ft.value
                    cache.best = value if cache.best is None else max(cache.best, value)
                row = [ft.intermediate_values.get(e, math.nan) for e in range(1, self.max_epochs + 1)]
                if all(math.isfinite(v) for v in row):
                    cache.rows.append([sign * v for v in row])
                    grew = True
            if grew:
                cache.array = np.asarray(cache.rows, dtype=float)
        return cache

    def chance(self, study: optuna.Study, trial: FrozenTrial) -> float | None:
        """P(the trial's final value >= incumbent - margin) under the forecast; None: no forecast."""
        t = trial.last_step
        if t is None or t >= self.max_epochs:
            return None
        values = trial.intermediate_values
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        y = values[t]
        if not math.isfinite(y):
            return None  # NaN or inf: the objective fails (or completes) it, not the pruner
        cache = self._study_curves(study, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), sign)
        if cache.best is None:
            return None  # no incumbent yet
        y *= sign
        # The slope over the window, not the last step: validation values at a high learning rate
        # dip and jump by a point or two from one epoch to the next.
        back = min(self.window - 1, t - 1)
        prev = values.get(t - back) if back > 0 else None
        slope = (max(sign * (values[t] - prev), 0.0) / back
                 if prev is not None and math.isfinite(prev) else 0.0)
        own = y + self.slope_weight * slope * (self.max_epochs - t)

        forecasts = np.empty(0)
        curves = cache.array
        if curves is not None:
            lo = max(1, t - self.window + 1)
            mine = np.array([sign * values.get(e, math.nan) for e in range(lo, t + 1)])
            known = np.isfinite(mine)
            theirs = curves[:, lo - 1:t][:, known]
            diff = theirs - mine[known]
            dist = np.sqrt((diff * diff).mean(axis=1))
            k = min(self.neighbours, len(curves))
            # Ties broken by position (the order trials completed in): deterministic.
            near = np.argsort(dist, kind="stable")[:k]
            # Each neighbour's gain from its window's mean to its end, added to the trial's
            # window mean: one noisy epoch moves the anchor by a third, not fully.
            forecasts = curves[near, -1] - theirs[near].mean(axis=1) + mine[known].mean()
        w = len(forecasts) + self.prior_curves
        mean = (forecasts.sum() + self.prior_curves * own) / w
        var = (self.prior_curves * (self.prior_spread**2 + (own - mean) ** 2)
               + float(((forecasts - mean) ** 2).sum())) / w
        sd = math.sqrt(var * (1 + 1 / w))  # a new curve: the spread plus the mean's uncertainty
        target = cache.best - self.margin
        return 0.5 * math.erfc((target - mean) / (sd * math.sqrt(2)))

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        t = trial.last_step
        if t is None or t < self.min_epoch or t >= self.max_epochs:
            return False
        p = self.chance(study, trial)
        return p is not None and p < 1 - self.confidence
