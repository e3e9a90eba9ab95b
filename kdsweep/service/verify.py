"""Seed verification of a sweep's winner: is it really better than the runner-up, or luck?

The best of many trials is biased upwards (the winner's curse): its one seed may simply have
been lucky. `kdsweep best STUDY --verify` re-trains the top configs on fresh seeds and compares
them *paired*: config A and config B on seed s share their initialisation seed, batch order and
augmentation stream, so the per-seed difference cancels much of the seed-to-seed noise.

Two ways to spend the runs: a race (the default; `kdsweep.service.racing` and the statistics
in `kdsweep.service.race`), which stops a candidate once it is beaten beyond noise, and the
fixed grid (`--grid`: top K x S seeds, every config to the end).

The runs live in a sibling study, `<study>.verify`, in the same storage: never in the sweep
itself, where they would change its trial count, feed its sampler and could become `best`.
The sibling copies the sweep's definition, so ordinary `kdsweep worker` processes run its
trials (fixed params, a fixed seed each, never pruned) through the same objective.

Running one (workers, rounds, the dashboard note) is `kdsweep.service.verifying`; this module
reads what the runs found. Once a verification exists, `best` exports its winner (`export`): the race's, or the grid's best
mean on the seeds its configs share; never the alpha=0 reference, which is the comparison.

Grid statistics: per config the mean and sample standard deviation over seeds; per runner-up
the mean paired difference d = winner - runner-up with its two-sided 95% t-interval over the
seed pairs, mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n). The difference "exceeds seed noise"
when that interval excludes zero (uncorrected, per pair: the race corrects).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from kdsweep.service import keys, racing
from kdsweep.service.spec import StudyError
from kdsweep.service.sweep import VERIFY_SUFFIX, Sweep

REFERENCE_SOURCE = keys.REFERENCE_SOURCE
SEED_OFFSET = racing.SEED_OFFSET
GRID_TOP = 3  # configs of a fixed grid (--grid) unless --top says


VerifyError = StudyError  # a verification cannot be prepared; one sentence saying why


class VerifyIncomplete(RuntimeError):
    """The workers stopped before every verification run finished."""


def sibling_name(study_name: str) -> str:
    return study_name + VERIFY_SUFFIX


seeds_for = racing.seeds_for


@dataclass
class ConfigRuns:
    """One verified config: the sweep trial it came from and its value per seed."""

    trial: int
    rank: int
    params: dict[str, Any]
    sweep_value: float | None
    values: dict[int, float] = field(default_factory=dict)  # seed -> final metric
    tests: dict[int, float] = field(default_factory=dict)  # seed -> held-out test accuracy

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else float("nan")


@dataclass
class Paired:
    """winner - other over the seeds both ran: the mean difference and its 95% t-interval."""

    other: int  # trial number of the runner-up
    n: int
    mean: float
    low: float
    high: float

    @property
    def exceeds_noise(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (SciPy ships with scikit-learn, a kdsweep dependency)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired(a: dict[int, float], b: dict[int, float], other: int) -> Paired | None:
    """The paired comparison of `a` against `b` on their common seeds; None without any."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(other, 1, mean, float("-inf"), float("inf"))
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Paired(other, len(d), mean, mean - half, mean + half)


def collect(sweep: Sweep, sibling: Sweep) -> list[ConfigRuns]:
    """Complete verification runs grouped by the sweep trial they re-train, ranked by the sweep
    as it is now (a run keeps no rank of its own: the sweep may have found a better trial since
    it was queued); the alpha=0 reference comes last."""
    by: dict[int, ConfigRuns] = {}
    ranked = sweep.top(10_000)
    rank = {t.number: i for i, t in enumerate(ranked, 1)}
    numbers = {t.number: t for t in sweep.trials()}
    for t in sibling.trials(TrialState.COMPLETE):
        src = t.user_attrs.get(keys.VERIFY_SOURCE)
        if src is None or t.value is None:
            continue
        if src not in by:
            original = numbers.get(src)
            by[src] = ConfigRuns(src, rank.get(src, len(ranked) + 1), dict(t.params),
                                 original.value if original is not None else None)
        by[src].values[int(t.user_attrs[keys.VERIFY_SEED])] = t.value
        if t.user_attrs.get(keys.TEST_ACC) is not None:
            by[src].tests[int(t.user_attrs[keys.VERIFY_SEED])] = float(t.user_attrs[keys.TEST_ACC])
    if REFERENCE_SOURCE in by:
        by[REFERENCE_SOURCE].rank = max((c.rank for c in by.values() if c.trial != REFERENCE_SOURCE), default=0) + 1
    return sorted(by.values(), key=lambda c: (c.trial == REFERENCE_SOURCE, c.rank))


def compare(runs: Sequence[ConfigRuns]) -> list[Paired]:
    """The sweep's winner (rank 1) against each runner-up, paired by seed."""
    if not runs or runs[0].rank != 1:
        return []
    out = []
    for other in runs[1:]:
        p = paired(runs[0].values, other.values, other.trial)
        if p is not None:
            out.append(p)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_text(runs: Sequence[ConfigRuns], pairs: Sequence[Paired], pending: int = 0) -> str:
    """The verification as lines of text: one per config, one per paired comparison."""
    if not runs:
        return "no verification run has finished yet." + (f" ({pending} pending)" if pending else "")
    lines = []
    for c in runs:
        sweep = f"sweep {c.sweep_value:.4f}" if c.sweep_value is not None else "sweep -"
        std = f"{c.std:.4f}" if not math.isnan(c.std) else "n/a"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in c.params.items())
        name = "alpha=0 reference (student alone)" if c.trial == REFERENCE_SOURCE else f"trial {c.trial}"
        lines.append(f"#{c.rank} {name}: {c.mean:.4f} ± {std} over {len(c.values)} seeds "
                     f"({sweep})  {params}")
    if runs[0].rank == 1 and runs[0].tests:
        tests = list(runs[0].tests.values())
        sd = f" ± {statistics.stdev(tests):.4f}" if len(tests) > 1 else ""
        lines.append(f"winner trial {runs[0].trial} on the held-out test set: {statistics.fmean(tests):.4f}{sd} "
                     f"over {len(tests)} seeds")
    for p in pairs:
        if p.n < 2:
            verdict = "one seed pair: no interval, run more seeds"
        elif p.exceeds_noise:
            verdict = "exceeds seed noise"
        else:
            verdict = "within seed noise"
        ci = f"95% CI {p.low:+.4f} .. {p.high:+.4f}, " if p.n > 1 else ""
        other = "the alpha=0 reference" if p.other == REFERENCE_SOURCE else f"trial {p.other}"
        lines.append(f"winner trial {runs[0].trial} vs {other}: {p.mean:+.4f} "
                     f"({ci}{p.n} paired seeds): {verdict}")
    if pending:
        lines.append(f"{pending} verification run(s) not finished yet.")
    return "\n".join(lines)


def mode(sibling: Sweep) -> str:
    """How the sibling's runs were asked for: "race" (the default) or "grid"."""
    return str(sibling.attrs.get(keys.VERIFY_MODE, "grid"))


def summary_text(sweep: Sweep) -> str | None:
    """The verification of `sweep` as text, or None when it was never verified."""
    sibling = sweep.sibling(VERIFY_SUFFIX)
    if sibling is None:
        return None
    if mode(sibling) == "race":
        return racing.stored(sweep, sibling).text()
    runs = collect(sweep, sibling)
    pending = len(sibling.trials(TrialState.WAITING, TrialState.RUNNING))
    return format_text(runs, compare(runs), pending)


def verified_winner(sweep: Sweep) -> tuple[int, int] | None:
    """(the trial verification ranks first, how many seeds that rests on), or None without a
    verification: a race's winner, or the grid's best mean on the seeds its configs share.
    The alpha=0 reference is the comparison, never the winner."""
    sibling = sweep.sibling(VERIFY_SUFFIX)
    if sibling is None:
        return None
    if mode(sibling) == "race":
        st = racing.stored(sweep, sibling)
        win = st.race.winner()
        return None if win is None else (win, len([v for v in st.values[win] if v is not None]))
    runs = [c for c in collect(sweep, sibling) if c.trial != REFERENCE_SOURCE and c.values]
    if not runs:
        return None
    shared = set.intersection(*(set(c.values) for c in runs))
    if not shared:
        shared = set(runs[0].values)
        runs = [c for c in runs if shared <= set(c.values)]
    best = max(runs, key=lambda c: (sweep.maximize * 2 - 1) * statistics.fmean(c.values[x] for x in shared))
    return best.trial, len(shared)


def noise_summary(sweep: Sweep) -> list[str]:
    """Lines on the top trials' noise (kdsweep/service/stats.py) and, for KD studies, the winner
    against the student trained alone (kdsweep/service/baseline.py); once a seed verification
    exists they point to it rather than ask for one."""
    from kdsweep.service import baseline, stats

    if keys.BASELINE_OF in sweep.attrs or sweep.verifies is not None:
        return []  # a sibling: its runs are a reference or a verification, not a sweep to verify
    ranked = sweep.top(len(sweep.trials()))
    if not ranked:
        return ["no complete trial yet."]
    verified = verified_winner(sweep) is not None
    lines = stats.noise_lines(ranked, sweep.name, verified=verified)
    if baseline.find(sweep) is not None:
        lines.append(baseline.difference_line(ranked[0], baseline.result(sweep), sweep.name, verified))
    return lines


def export(sweep: Sweep) -> tuple[dict[str, Any], Any, list[str]]:
    """What `kdsweep best` exports: the verified winner once a verification exists (else the
    sweep's one-seed winner), its trial, and lines for stderr saying which and why."""
    one_seed = sweep.best_trial
    verified = verified_winner(sweep)
    trial = one_seed
    checked = summary_text(sweep)
    notes = [f"seed verification ({sibling_name(sweep.name)}):\n{checked}"] if checked else []
    notes += noise_summary(sweep)
    if verified is not None:
        numbers = {t.number: t for t in sweep.trials(TrialState.COMPLETE)}
        trial = numbers.get(verified[0], one_seed)
    doc = sweep.export_best(trial)
    seed = doc["config"].get("seed", (trial.user_attrs.get(keys.CONFIG) or {}).get("seed"))
    doc["seed"] = seed
    if verified is None:
        notes.append(f"not verified over seeds: this is the one-seed winner; `kdsweep best {sweep.name} --verify` "
                     "races the top configs on fresh seeds and then exports the verified one.")
        return doc, trial, notes
    win, n = verified
    doc["verified"] = {"trial": win, "seeds": n, "one_seed_winner": {"trial": one_seed.number, "value": one_seed.value}}
    sibling = sweep.sibling(VERIFY_SUFFIX)
    if sibling is not None and mode(sibling) == "race" and not racing.stored(sweep, sibling).race.finished:
        doc["verified"]["race_finished"] = False
        notes.append(f"the race has not finished: trial {win} leads it so far; `kdsweep best {sweep.name} --verify` "
                     "runs it on.")
    if one_seed.number != win:
        notes.append(f"exporting the verified winner, trial {win} (first over {n} fresh seeds), not the sweep's "
                     f"one-seed winner trial {one_seed.number} ({one_seed.value:.4f}).")
    else:
        notes.append(f"trial {win} is the sweep's winner and verification's ({n} fresh seeds).")
    notes.append(f"its config carries the sweep's training seed {seed} (the seed of trial {win}'s sweep run).")
    return doc, trial, notes
