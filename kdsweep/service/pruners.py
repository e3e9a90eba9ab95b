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

Cost: both pruners keep what they derive from a study's complete trials per study, and a call
first asks the database how many trials are COMPLETE (`storage.complete_count`, one SQL
count); only when that number grew are the trials read (`get_trials(deepcopy=False)`) and the
new ones added. COMPLETE is final, so an unchanged count means the same trials and the same
decision as a fresh read. Without the count, Optuna's RDB `get_trials` reloads every running
trial and sorts all trials on every call: that read, not the forecast, was the cost at
thousands of trials (`pruning_epoch_savings` in benchmarks/results.json measures both).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service.storage import complete_count


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
        self._curves: dict[tuple[int, str], _Curves] = {}  # (id of the Study object, its name) -> curves
        self._lock = threading.Lock()  # trials of one worker process may share this pruner in threads

    def __repr__(self) -> str:
        return (f"CurvePruner(max_epochs={self.max_epochs}, margin={self.margin}, confidence={self.confidence}, "
                f"min_epoch={self.min_epoch}, slope_weight={self.slope_weight}, "
                f"prior_spread={self.prior_spread}, prior_curves={self.prior_curves}, "
                f"neighbours={self.neighbours}, window={self.window})")

    def _study_curves(self, study: optuna.Study, sign: float) -> _Curves:
        with self._lock:
            # Per Study object (a worker keeps one per study), with its name: an object's id can
            # be reused once it is freed (and a cache that has seen more trials than exist is reset).
            key = (id(study), study.study_name)
            cache = self._curves.get(key)
            if cache is not None and complete_count(study._storage, study._study_id) == len(cache.seen):
                return cache  # the same complete trials: nothing to read
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return self._update(key, cache, complete, sign)

    def _update(self, key: tuple[int, str], cache: _Curves | None, complete: list[FrozenTrial],
                sign: float) -> _Curves:
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
        cache = self._study_curves(study, sign)
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


# --- ForecastPruner: calibrated intervals, a prior, decisions from epoch 1 ---------------------

def resample(curve: Sequence[float], epochs: int) -> list[float]:
    """A curve of len(curve) epochs read at the same fractions of training for `epochs` epochs.

    Epoch e of `epochs` is read at fraction e/epochs of the recorded schedule (linear between
    recorded epochs, the first value before it): learning-rate schedules (warm-up, cosine) are
    functions of that fraction, so a curve's shape carries over approximately.
    """
    n = len(curve)
    if n == epochs:
        return [float(v) for v in curve]
    return [float(v) for v in np.interp(np.arange(1, epochs + 1) * n / epochs, np.arange(1, n + 1), curve)]


def _encode(params: dict[str, Any], names: list[str], dists: dict[str, BaseDistribution]) -> list[float]:
    """Parameters as numbers in [0, 1] (a categorical: its choice's index; absent: NaN)."""
    row = []
    for name in names:
        d, v = dists.get(name), params.get(name, None)
        if v is None or d is None:
            row.append(math.nan)
        elif isinstance(d, CategoricalDistribution):
            row.append(float(d.choices.index(v)) if v in d.choices else math.nan)
        elif isinstance(d, (FloatDistribution, IntDistribution)):
            lo, hi, x = float(d.low), float(d.high), float(v)
            if d.log:
                lo, hi, x = math.log(lo), math.log(hi), math.log(x)
            row.append((x - lo) / (hi - lo) if hi > lo else 0.0)
        else:
            row.append(math.nan)
    return row


_PRIOR_RESIDUALS: dict[tuple, np.ndarray] = {}  # see ForecastPruner._prior_residuals


@dataclass
class _Study:
    """A study's complete curves by trial number, each scored as the pruner would have forecast it."""

    rows: dict[int, list[float]] = field(default_factory=dict)  # trial number -> curve (maximised)
    params: dict[int, dict[str, Any]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    best: float | None = None
    refs: np.ndarray | None = None  # prior curves, then the study's by trial number
    codes: np.ndarray | None = None  # their parameters, encoded (see _encode)
    scores: np.ndarray | None = None  # (references, epochs - 1): standardised residuals
    dists: dict[str, BaseDistribution] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    categorical: np.ndarray | None = None  # per name: a categorical parameter


class ForecastPruner(optuna.pruners.BasePruner):
    """Stop a trial as soon as a calibrated upper bound of its final value falls below the incumbent.

    At epoch t the trial's final value is forecast from its `neighbours` nearest reference
    curves. Every curve is read as its best value so far (a validation value that falls for an
    epoch and jumps back does not move the forecast). Nearest: by the RMS difference over the
    trial's last `window` epochs plus `param_weight` times the RMS difference of the sampled
    parameters (each scaled to [0, 1] by its distribution, log-scaled where sampled so; a
    categorical or an absent parameter differs by 1). Each neighbour forecasts its own final
    value plus `lead` times the trial's lead over it (the difference of their window means):
    lead 1 adds the neighbour's gain to the trial's level, lead 0 forecasts the neighbour's
    final value, so the curve only chooses the neighbours. `center` is the mean of these
    forecasts, `spread` their standard deviation (floored by `spread_floor`). The references are
    the `prior` shipped with a study (configurations of its space recorded to the end) and the
    study's own complete trials.

    The bound is split conformal with normalised residuals (Vovk et al. 2005; Lei et al. 2018):
    every reference is forecast at every epoch from the references before it (a prior curve
    from the other prior curves, a complete trial from the prior and the complete trials with
    smaller numbers) and its residual (final - center) / spread is kept. Only residuals of
    references that ended at or above incumbent - margin - `band` calibrate the bound: winners
    beat their neighbours' forecast more often than most curves do, and a bound calibrated on
    every curve stops them too often. With m such residuals at epoch t,

        upper = center + spread * (the ceil((m + 1) * (1 - miss))-th smallest of them),

    so a trial exchangeable with those references ends above `upper` with a chance of at most
    `miss` at that epoch. The trial is stopped when upper < incumbent - margin (the incumbent:
    the best complete value). With fewer than 1/miss - 1 residuals there is no bound and
    nothing is stopped: without a prior, pruning starts once enough trials have completed.

    Parameters (values in the metric's units: accuracy in [0, 1] for kdsweep's studies):
        max_epochs: T, the epoch (step) at which trials end; forecasts are of the value there.
        margin: 0.005 = 0.5 accuracy points: a trial is kept while it may end within `margin`
            of the incumbent.
        miss: the calibrated chance, per epoch, of stopping a trial that would have ended near
            the top; 0.05 = 1 in 20. Lower keeps more trials. A sequence gives it per epoch
            (epoch 1, 2, ...; its last value for every later epoch): `(0.1, 0.05)` prunes
            more readily at epoch 1, where stopping saves the most epochs, and more cautiously
            after, where a stopped winner costs as much and saves less.
        min_epoch: the earliest epoch (step) at which a trial may be stopped. A longer schedule
            with the same `min_epoch` makes a clear loser pay only its first epochs.
        neighbours: how many references forecast the trial.
        lead: how much of the trial's lead over a neighbour carries to the end, per epoch like
            `miss` (its last value for every later epoch). At the first epochs a lead is mostly
            noise (a slow starter that ends on top looks like a loser there): `(0.0, 0.6, 1.0)`
            forecasts from the neighbours' final values at epoch 1 and trusts the lead more as
            the curve grows.
        window: how many of the trial's latest epochs choose its neighbours and anchor the forecast.
        param_weight: the weight of the parameters' distance against the curve's (0: curves only).
        spread_floor: the least spread (metric units) of a forecast; 0.005 = 0.5 points.
        band: how far below incumbent - margin a reference may have ended and still calibrate
            the bound (metric units).
        prior: reference configurations `[{"params": {...}, "curve": [...]}, ...]` recorded to the
            end on the study's space (any number of epochs: read at the same fractions of
            training, see `resample`), e.g. `kdsweep.service.priors.Q1`; None: the study's
            own trials only.
        prior_distributions: the distributions of the prior's parameters, for those the study's
            complete trials do not define yet.

    A minimising study is handled by negating values (a prior is given as the metric is
    reported). The decision depends only on the trial's values and parameters and on the
    study's complete trials with their numbers, not on the order a worker saw them in: the same
    inputs give the same decision in every worker. NaN or infinite values are never pruned here
    (the objective fails that trial); complete trials with non-finite values or another length
    are no references.
    """

    def __init__(self, max_epochs: int, margin: float = 0.005, miss: float | Sequence[float] = 0.05,
                 min_epoch: int = 1, lead: float | Sequence[float] = 1.0,
                 neighbours: int = 10, window: int = 2, param_weight: float = 0.0, spread_floor: float = 0.005,
                 band: float = 0.03, prior: Sequence[dict[str, Any]] | None = None,
                 prior_distributions: dict[str, BaseDistribution] | None = None) -> None:
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        misses = (float(miss),) if isinstance(miss, (int, float)) else tuple(float(m) for m in miss)
        if not misses or not all(0 < m < 0.5 for m in misses):
            raise ValueError(f"miss must be in (0, 0.5) (every value of a sequence), got {miss}.")
        leads = (float(lead),) if isinstance(lead, (int, float)) else tuple(float(v) for v in lead)
        if not leads or not all(0 <= v <= 1 for v in leads):
            raise ValueError(f"lead must be in [0, 1] (every value of a sequence), got {lead}.")
        if (margin < 0 or spread_floor <= 0 or band < 0 or param_weight < 0 or min_epoch < 1
                or neighbours < 1 or window < 1):
            raise ValueError("margin, band, param_weight must be >= 0; spread_floor > 0; "
                             "min_epoch, neighbours, window >= 1.")
        self.max_epochs = max_epochs
        self.margin = margin
        self.miss = misses[0] if len(misses) == 1 else misses
        self._misses = misses
        self.lead = leads[0] if len(leads) == 1 else leads
        self._leads = leads
        self.min_epoch = min_epoch
        self.neighbours = neighbours
        self.window = window
        self.param_weight = param_weight
        self.spread_floor = spread_floor
        self.band = band
        self.prior = [{"params": dict(p.get("params", {})), "curve": resample(p["curve"], max_epochs)}
                      for p in (prior or ()) if p["curve"] and all(math.isfinite(v) for v in p["curve"])]
        self.prior_distributions = dict(prior_distributions or {})
        self._studies: dict[tuple[int, str], _Study] = {}
        self._lock = threading.Lock()  # trials of one worker process may share this pruner in threads

    def __repr__(self) -> str:
        return (f"ForecastPruner(max_epochs={self.max_epochs}, margin={self.margin}, miss={self.miss}, "
                f"min_epoch={self.min_epoch}, lead={self.lead}, neighbours={self.neighbours}, window={self.window}, "
                f"param_weight={self.param_weight}, spread_floor={self.spread_floor}, band={self.band}, "
                f"prior={len(self.prior)} configurations)")

    def miss_at(self, epoch: int) -> float:
        """The calibrated miss level of a decision at `epoch` (see `miss`)."""
        return self._misses[min(epoch, len(self._misses)) - 1]

    # -- the forecast ------------------------------------------------------------------------

    def forecast(self, refs: np.ndarray, codes: np.ndarray, mine: np.ndarray, code: np.ndarray,
                 categorical: np.ndarray) -> tuple[float, float]:
        """(center, spread) of the final value of a curve known up to epoch t = len(mine).

        `refs` are read as `_update` stores them: every epoch but the last as its best value so
        far, the last as the final value."""
        t = len(mine)
        lo = max(0, t - self.window)
        theirs = refs[:, lo:t]
        mine = np.maximum.accumulate(mine)[lo:]
        diff = theirs - mine
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff) / (t - lo))
        if self.param_weight > 0 and codes.shape[1]:
            d = np.abs(codes - code)
            d = np.where(np.isnan(codes) & np.isnan(code), 0.0, np.where(np.isnan(d), 1.0, d))
            d = np.where(categorical & (d > 0), 1.0, d)
            dist = dist + self.param_weight * np.sqrt((d * d).mean(axis=1))
        k = min(self.neighbours, len(refs))
        near = np.argsort(dist, kind="stable")[:k]  # ties by position: deterministic
        lead = self._leads[min(t, len(self._leads)) - 1]
        ends = refs[near, -1] + lead * (float(mine.sum()) / (t - lo) - theirs[near].sum(axis=1) / (t - lo))
        mean = float(ends.sum()) / k
        var = float(((ends - mean) ** 2).sum()) / k
        return mean, math.sqrt(var + self.spread_floor**2)

    def _residuals(self, refs: np.ndarray, codes: np.ndarray, curve: np.ndarray, code: np.ndarray,
                   categorical: np.ndarray) -> np.ndarray:
        """Standardised residuals, per epoch, of `curve` forecast from the references `refs`/`codes`."""
        out = np.full(self.max_epochs - 1, np.nan)
        if len(refs):
            for t in range(1, self.max_epochs):
                center, spread = self.forecast(refs, codes, curve[:t], code, categorical)
                out[t - 1] = (curve[-1] - center) / spread
        return out

    def _prior_residuals(self, refs: np.ndarray, codes: np.ndarray, cat: np.ndarray) -> np.ndarray:
        # The same for every study of a worker (and every pruner with these settings and prior):
        # computed once per process.
        key = (repr(self), refs.tobytes(), np.nan_to_num(codes, nan=-1.0).tobytes(), cat.tobytes())
        if key not in _PRIOR_RESIDUALS:
            keep = np.arange(len(refs))
            _PRIOR_RESIDUALS[key] = np.asarray(
                [self._residuals(refs[keep != i], codes[keep != i], refs[i], codes[i], cat) for i in range(len(refs))]
            ).reshape(len(refs), self.max_epochs - 1)
            while len(_PRIOR_RESIDUALS) > 16:
                _PRIOR_RESIDUALS.pop(next(iter(_PRIOR_RESIDUALS)))
        return _PRIOR_RESIDUALS[key]

    def _update(self, study: optuna.Study, sign: float) -> _Study:
        key = (id(study), study.study_name)
        cache = self._studies.get(key)
        if (cache is not None and cache.refs is not None
                and complete_count(study._storage, study._study_id) == len(cache.seen)):
            return cache  # the same complete trials (COMPLETE is final): nothing to read or score
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if cache is None or len(cache.seen) > len(complete):  # new, or not the study it was
            cache = self._studies[key] = _Study()
        if cache.refs is not None and len(cache.seen) == len(complete):
            return cache
        new: list[int] = []
        for ft in complete:
            if ft.number in cache.seen:
                continue
            cache.seen.add(ft.number)
            if ft.value is not None and math.isfinite(ft.value):
                cache.best = sign * ft.value if cache.best is None else max(cache.best, sign * ft.value)
            row = [ft.intermediate_values.get(e, math.nan) for e in range(1, self.max_epochs + 1)]
            if all(math.isfinite(v) for v in row):
                cache.rows[ft.number] = [sign * v for v in row]
                cache.params[ft.number] = ft.params
                new.append(ft.number)
        numbers = sorted(cache.rows)
        # The study's own distributions first (a prior recorded on a narrower space may lack choices).
        dists = {**self.prior_distributions, **{n: d for ft in complete for n, d in ft.distributions.items()}}
        names = sorted(set(dists))
        cat = np.array([isinstance(dists[n], CategoricalDistribution) for n in names], dtype=bool)
        P = len(self.prior)
        refs = np.asarray([[sign * v for v in p["curve"]] for p in self.prior]
                          + [cache.rows[n] for n in numbers], dtype=float).reshape(P + len(numbers), self.max_epochs)
        # As every forecast reads them, once: each epoch but the last its best value so far (the
        # last stays the final value, which is forecast).
        refs[:, :-1] = np.maximum.accumulate(refs[:, :-1], axis=1)
        codes = np.asarray([_encode(p["params"], names, dists) for p in self.prior]
                           + [_encode(cache.params[n], names, dists) for n in numbers],
                           dtype=float).reshape(len(refs), len(names))
        if cache.codes is None or cache.codes.shape[1] != len(names):  # first call, or a new parameter
            cache.scores = None
        if cache.scores is None:  # the prior's residuals: each from the other prior curves
            first, head = 0, self._prior_residuals(refs[:P], codes[:P], cat)
        else:  # only the study's residuals at or after the earliest new trial change
            first = min((numbers.index(n) for n in new), default=len(numbers))
            head = cache.scores[:P + first]
        fresh = [self._residuals(refs[:P + i], codes[:P + i], refs[P + i], codes[P + i], cat)
                 for i in range(first, len(numbers))]
        cache.scores = np.vstack([head, np.asarray(fresh).reshape(len(fresh), self.max_epochs - 1)])
        cache.refs, cache.codes, cache.dists, cache.names, cache.categorical = refs, codes, dists, names, cat
        return cache

    def bound(self, study: optuna.Study, trial: FrozenTrial) -> tuple[float, float] | None:
        """(upper bound of the trial's final value, incumbent), both maximised; None: no decision."""
        t = trial.last_step
        if t is None or t >= self.max_epochs:
            return None
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        mine = np.array([sign * trial.intermediate_values.get(e, math.nan) for e in range(1, t + 1)])
        if not np.isfinite(mine).all():
            return None  # NaN, inf or a missing epoch: the objective decides, not the pruner
        with self._lock:
            cache = self._update(study, sign)
            if cache.best is None or cache.refs is None or len(cache.refs) == 0:
                return None
            # Residuals only of references that ended near or above the incumbent.
            scores = cache.scores[:, t - 1]
            scores = np.sort(scores[np.isfinite(scores) & (cache.refs[:, -1] >= cache.best - self.margin - self.band)])
            rank = math.ceil((len(scores) + 1) * (1 - self.miss_at(t)))
            if rank > len(scores):
                return None  # too few residuals for a bound at this level
            code = np.asarray(_encode(trial.params, cache.names, cache.dists), dtype=float)
            center, spread = self.forecast(cache.refs, cache.codes, mine, code, cache.categorical)
        return center + spread * float(scores[rank - 1]), cache.best

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        t = trial.last_step
        if t is None or t < self.min_epoch or t >= self.max_epochs:
            return False
        b = self.bound(study, trial)
        return b is not None and b[0] < b[1] - self.margin
