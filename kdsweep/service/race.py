"""Racing seed verification: re-train the candidates seed by seed, drop the ones beaten beyond noise.

A fixed grid (top K x S seeds) runs every config to the end however early its comparison was
settled. A race (Maron & Moore's Hoeffding races, Birattari's F-race) spends the seeds where
they decide something: in every *round* each surviving candidate trains on the next fresh seed
(the same seed for all, so the comparison is paired by seed); after `min_seeds` rounds, at
every round's *look*, a candidate whose difference from the current leader is beyond noise
stops running. The race ends when one candidate is left or after `max_seeds` rounds.

The statistics (all pure functions of the recorded values, so a race is replayed from the
stored runs on every call and needs no state of its own):

* **Paired, by seed.** The survivors' values on the seeds they all ran form a
  candidates x seeds table (a randomised block design: the seed is the block). The noise of a
  difference between two candidates is estimated from the table's residuals after removing
  candidate and seed effects (two-way ANOVA without interaction): the mean square MSE with
  (k-1)(n-1) degrees of freedom, so SE(mean_a - mean_b) = sqrt(2 MSE / n). With two
  candidates this is exactly the paired t-test on the per-seed differences; with more, the
  pooled estimate has more degrees of freedom than any single pair (Conover's post-hoc
  comparisons of the Friedman / F-race family use the same pooling). It assumes every
  candidate's seed noise is alike.
* **Optional stopping.** Looking after every round and stopping when something looks settled
  inflates the error rate of a fixed-n test. The race plans its looks in advance (rounds
  `min_seeds` .. `max_seeds`, L of them) and spends alpha / L at each (Bonferroni over the
  looks): the chance that any look wrongly settles something is at most alpha.
* **Multiple comparisons.** At one look the leader is compared with each of the m other
  survivors; Holm's step-down procedure at the look's alpha / L controls the chance of any
  wrong "settled" among them: sorted p-values p(1) <= ... <= p(m) are settled while
  p(j) <= (alpha / L) / (m - j + 1). A settled candidate stops; its verdict is final.

Candidates are identified by an integer (a sweep's trial number; `REFERENCE` for the alpha=0
reference of a KD study, which races beside them but is never the winner).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

REFERENCE = -1  # the alpha=0 reference's candidate id (keys.REFERENCE_SOURCE)
ALPHA = 0.05  # family-wise error of the whole race
MIN_SEEDS = 3  # rounds before the first look
MAX_SEEDS = 8  # rounds at most


def t_two_sided_p(t: Sequence[float], df: int) -> list[float]:
    """Two-sided p-values of Student's t statistics with `df` degrees of freedom."""
    import numpy as np
    from scipy.stats import t as student

    return [float(p) for p in 2 * student.sf(np.abs(np.asarray(t, dtype=float)), df)]


def t_quantile(q: float, df: int) -> float:
    from scipy.stats import t as student

    return float(student.ppf(q, df))


@dataclass(frozen=True)
class Comparison:
    """leader - other on `n` shared seeds, tested at level `level` (two-sided)."""

    leader: int
    other: int
    n: int
    mean: float  # mean paired difference leader - other (in the metric's better direction)
    se: float
    df: int
    p: float
    level: float  # the Holm threshold this comparison was judged at
    settled: bool

    @property
    def interval(self) -> tuple[float, float]:
        """The (1 - level) interval of the difference: excludes 0 exactly when settled."""
        if self.df < 1 or not math.isfinite(self.se):
            return float("-inf"), float("inf")
        half = t_quantile(1 - self.level / 2, self.df) * self.se
        return self.mean - half, self.mean + half

    @property
    def confidence(self) -> float:
        return 1 - self.level


def block_noise(table: Mapping[int, Sequence[float]]) -> tuple[float, int]:
    """The standard error of a difference of two row means of a candidates x seeds `table`
    (same seed order in every row) and its degrees of freedom: sqrt(2 MSE / n), MSE the
    residual mean square of the two-way (candidate, seed) layout, (k-1)(n-1) df."""
    ids = list(table)
    k, n = len(ids), len(table[ids[0]])
    if k < 2 or n < 2:
        return float("inf"), 0
    row = {c: statistics.fmean(table[c]) for c in ids}
    col = [statistics.fmean(table[c][s] for c in ids) for s in range(n)]
    grand = statistics.fmean(row.values())
    ss = sum((table[c][s] - row[c] - col[s] + grand) ** 2 for c in ids for s in range(n))
    df = (k - 1) * (n - 1)
    return math.sqrt(2 * (ss / df) / n), df


def holm(pvalues: Sequence[float], alpha: float) -> list[tuple[bool, float]]:
    """Holm's step-down: for each p-value (in the given order) whether it is rejected and the
    threshold it was judged at, alpha / (m - j + 1) for the j-th smallest (j from 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out: list[tuple[bool, float]] = [(False, alpha / m)] * m
    going = True
    for j, i in enumerate(order):
        level = alpha / (m - j)
        going = going and pvalues[i] <= level
        out[i] = (going, level)
    return out


def look(table: Mapping[int, Sequence[float]], alpha: float, maximize: bool = True,
         ) -> tuple[int, list[Comparison]]:
    """One look at the survivors' table: the leader (best mean) and every pair of survivors
    compared (better minus worse), Holm-corrected together at `alpha` (the look's share of the
    race's error).

    Every pair, not only the leader's: the leader is chosen by the same values, so "leader vs
    each other" alone would compare the luckiest mean with the rest and settle too often when
    many candidates are equal (measured: 11% of null races of 12 equal candidates instead of
    <= 5%). Holm over all pairs holds whichever pairs the data make interesting.
    """
    sign = 1.0 if maximize else -1.0
    signed = {c: [sign * v for v in vals] for c, vals in table.items()}
    means = {c: statistics.fmean(v) for c, v in signed.items()}
    # Ties broken by the lower id: a deterministic leader, the same on every replay.
    order = sorted(signed, key=lambda c: (-means[c], c))
    se, df = block_noise(signed)
    n = len(next(iter(table.values())))
    pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]
    diffs = [means[a] - means[b] for a, b in pairs]
    if df > 0 and se > 0:
        ps = t_two_sided_p([d / se for d in diffs], df)
    else:  # no noise at all across the seeds: any difference is real; none without seeds to tell
        ps = [0.0 if df > 0 and d != 0 else 1.0 for d in diffs]
    return order[0], [Comparison(a, b, n, d, se, df, p, level, settled and d > 0)
                      for (a, b), d, p, (settled, level) in zip(pairs, diffs, ps, holm(ps, alpha), strict=True)]


@dataclass
class Race:
    """A race replayed from the values recorded so far (`replay`)."""

    candidates: list[int]
    max_seeds: int
    rounds: int = 0  # rounds every survivor has finished
    survivors: list[int] = field(default_factory=list)
    stopped: dict[int, Comparison] = field(default_factory=dict)  # candidate -> the comparison that settled it
    last: list[Comparison] = field(default_factory=list)  # the latest look's comparisons among survivors
    leader: int | None = None
    means: dict[int, float] = field(default_factory=dict)  # on the survivors' shared seeds (stopped: theirs)
    maximize: bool = True

    def _key(self, c: int) -> float:
        return self.means[c] if self.maximize else -self.means[c]

    @property
    def finished(self) -> bool:
        return len(self.survivors) <= 1 or self.rounds >= self.max_seeds

    def wanted(self) -> list[tuple[int, int]]:
        """(candidate, round index) of the runs the next round needs; empty once finished."""
        if self.finished:
            return []
        return [(c, self.rounds) for c in self.survivors]

    def runs(self) -> int:
        """Runs the race has used: every candidate's rounds until it stopped."""
        return sum(self.rounds if c in self.survivors else self.stopped[c].n for c in self.candidates)

    def winner(self, exclude: Sequence[int] = (REFERENCE,)) -> int | None:
        """The race's answer: the best survivor by mean on the seeds all survivors share;
        without any eligible survivor, the one stopped last (ties: higher mean)."""
        alive = [c for c in self.survivors if c not in exclude]
        if alive:
            return max(alive, key=lambda c: (self._key(c), -c))
        gone = [c for c in self.stopped if c not in exclude]
        return max(gone, key=lambda c: (self.stopped[c].n, self._key(c)), default=None)

    def ranking(self) -> list[int]:
        """Survivors by mean, then the stopped ones, the last stopped first."""
        alive = sorted(self.survivors, key=lambda c: (-self._key(c), c))
        gone = sorted(self.stopped, key=lambda c: (-self.stopped[c].n, -self._key(c), c))
        return alive + gone


def replay(values: Mapping[int, Sequence[float | None]], max_seeds: int = MAX_SEEDS,
           min_seeds: int = MIN_SEEDS, alpha: float = ALPHA, maximize: bool = True) -> Race:
    """Replay the race over `values` (candidate -> its value on round 0, 1, ... ; None or a
    shorter list where a run has not finished): the looks, who stopped and who survives.

    The looks are planned in advance: rounds min_seeds .. max_seeds, each at alpha / L.
    """
    if not values:
        raise ValueError("a race needs at least one candidate")
    if not 2 <= min_seeds <= max_seeds:
        raise ValueError(f"need 2 <= min_seeds <= max_seeds, got {min_seeds} and {max_seeds}")
    looks = max_seeds - min_seeds + 1
    per_look = alpha / looks
    race = Race(list(values), max_seeds, survivors=list(values), maximize=maximize)

    def has(c: int, r: int) -> bool:
        vals = values[c]
        return r < len(vals) and vals[r] is not None and math.isfinite(vals[r])

    while not race.finished and all(has(c, race.rounds) for c in race.survivors):
        race.rounds += 1
        if race.rounds >= min_seeds and len(race.survivors) > 1:
            table = {c: [float(values[c][r]) for r in range(race.rounds)] for c in race.survivors}
            race.leader, comps = look(table, per_look, maximize)
            # A candidate stops when any survivor beats it beyond noise; its verdict names the
            # leader's comparison where that one settled it, else the clearest one.
            for comp in sorted(comps, key=lambda c: (c.leader != race.leader, c.p)):
                if comp.settled and comp.other not in race.stopped:
                    race.stopped[comp.other] = comp
            race.survivors = [c for c in race.survivors if c not in race.stopped]
            race.last = [c for c in comps if c.leader == race.leader and c.other in race.survivors]
    shared = race.rounds
    for c in race.candidates:
        n = shared if c in race.survivors else race.stopped[c].n
        got = [float(v) for v in values[c][:n] if v is not None]
        race.means[c] = statistics.fmean(got) if got else float("nan")
    if race.leader is None or race.leader not in race.survivors:
        alive = [c for c in race.survivors if not math.isnan(race.means[c])]
        race.leader = max(alive, key=lambda c: (race._key(c), -c)) if alive else None
    return race
