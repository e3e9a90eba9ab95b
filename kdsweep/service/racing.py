"""`kdsweep best --verify`: the race over a sweep's stored runs (statistics in `race`).

The candidates are the sweep's top configs that its one-seed paired intervals cannot separate
from the winner (at most `top`, the winner included), plus the alpha=0 reference of a KD study.
The race's runs are ordinary queued trials of the `<study>.verify` sibling (any worker on any
host runs them): round r is every surviving candidate on seed `seeds_for(...)[r]`. The race
keeps no state of its own: every call rebuilds it from the runs stored so far (`state`), so
asking again continues where the last call stopped, and a sweep that found a better trial since
re-ranks the candidates by the sweep as it is now.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import keys, race, stats
from kdsweep.service.spec import StudyError
from kdsweep.service.sweep import VERIFY_SUFFIX, Sweep

REFERENCE = keys.REFERENCE_SOURCE
SEED_OFFSET = 1000  # verification seeds are fresh: the sweep trained every trial with its own seed
DEFAULT_TOP = 8  # candidates of a race at most (the winner included)


def seeds_for(n: int, base: int = 0) -> list[int]:
    """`n` fresh seeds, distinct from the seed the sweep trained with (`base`)."""
    return [base + SEED_OFFSET + i for i in range(n)]


def candidates(ranked: list[FrozenTrial], top: int) -> list[FrozenTrial]:
    """The winner and the next configs its one-seed paired interval cannot separate from it
    (a config beyond validation noise of the winner is left out), at most `top` in all.

    `ranked`: complete trials, best first. A trial without per-image scores cannot be judged,
    so it is kept (the race judges it)."""
    if not ranked:
        return []
    out = [ranked[0]]
    for t in ranked[1:]:
        if len(out) >= top:
            break
        diff = stats.compare_trials(ranked[0], t)
        if diff is None or not diff.exceeds_noise:
            out.append(t)
    return out


def percent(confidence: float) -> str:
    """A confidence level as a percentage with one decimal, rounded down: 0.9997 reads 99.9%,
    never 100.0%, which no finite sample gives."""
    return f"{math.floor(confidence * 1000 + 1e-9) / 10:.1f}%"


def _label(c: int) -> str:
    return "the alpha=0 reference" if c == REFERENCE else f"trial {c}"


@dataclass
class RaceState:
    """The race as the stored runs make it: candidates, values per round, the replayed race."""

    sweep: Sweep
    trials: dict[int, FrozenTrial]  # candidate id -> the sweep trial (the reference: absent)
    seeds: list[int]
    values: dict[int, list[float | None]]
    pending: int  # runs of the sibling waiting or running
    race: race.Race
    reference_params: dict[str, Any] | None

    @property
    def winner(self) -> int | None:
        return self.race.winner()

    def text(self) -> str:
        """What the race answered so far: one line per candidate, then what is settled."""
        r, lines = self.race, []
        for rank, c in enumerate(r.ranking(), 1):
            got = [v for v in self.values[c] if v is not None]
            sd = f" ± {statistics.stdev(got):.4f}" if len(got) > 1 else ""
            mean = statistics.fmean(got) if got else float("nan")
            t = self.trials.get(c)
            sweep = f", sweep {t.value:.4f}" if t is not None and t.value is not None else ""
            where = "running" if c in r.survivors and not r.finished else (
                "left" if c in r.survivors else f"stopped after {r.stopped[c].n} seeds")
            lines.append(f"#{rank} {_label(c)}: {mean:.4f}{sd} over {len(got)} seeds ({where}{sweep})")
        lines += self.verdicts()
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        r, out = self.race, []
        for c, comp in r.stopped.items():
            low, high = comp.interval
            out.append(f"{_label(comp.leader)} vs {_label(c)}: {comp.mean:+.4f} ({percent(comp.confidence)} CI "
                       f"{low:+.4f} .. {high:+.4f}), settled after {comp.n} seeds")
        for comp in r.last:
            verb = "not separated after" if r.finished else "not separated yet after"
            out.append(f"{_label(comp.leader)} vs {_label(comp.other)}: {verb} {comp.n} seeds "
                       f"({comp.mean:+.4f}, p = {comp.p:.3g} against {comp.level:.2g})")
        if not r.last and len(r.survivors) > 1 and r.rounds:
            out.append(f"{len(r.survivors)} candidates after {r.rounds} seeds: no look yet "
                       f"(the first after {race.MIN_SEEDS} seeds)")
        if r.finished:
            win = r.winner()
            out.append(f"race finished after {r.rounds} rounds, {r.runs()} runs: "
                       + (f"verified winner trial {win}." if win is not None else "no winner."))
        else:
            out.append(f"race running: round {r.rounds + 1} of at most {r.max_seeds}, "
                       f"{len(r.survivors)} candidates left, {r.runs()} runs so far")
        if REFERENCE in self.values:
            out.append(self.reference_verdict())
        return out

    def reference_verdict(self) -> str:
        """Distillation against the student alone (alpha=0): settled, or not shown."""
        r = self.race
        comp = r.stopped.get(REFERENCE)
        if comp is not None and comp.leader != REFERENCE:
            low, high = comp.interval
            return (f"distillation helps: {_label(comp.leader)} beats the student alone (alpha=0) by "
                    f"{comp.mean:+.4f} ({percent(comp.confidence)} CI {low:+.4f} .. {high:+.4f}), "
                    f"settled after {comp.n} seeds")
        if REFERENCE in r.survivors and len(r.survivors) == 1:
            return (f"distillation not shown: the student alone (alpha=0) beat every distilled "
                    f"candidate beyond noise after {r.rounds} seeds")
        return f"distillation not shown: the student alone (alpha=0) is not separated from the leader after {r.rounds} seeds"


def reference_params(sweep: Sweep) -> dict[str, Any] | None:
    from kdsweep.service import baseline

    return baseline._reference(sweep)


def state(sweep: Sweep, top: int = DEFAULT_TOP, max_seeds: int = race.MAX_SEEDS) -> RaceState:
    """Rebuild the race from the sweep's current ranking and the sibling's stored runs."""
    chosen = candidates(sweep.top(10_000), top)
    if not chosen:
        raise StudyError(f"study {sweep.name!r} has no complete trial to verify yet.")
    ref = reference_params(sweep)
    return _build(sweep, chosen, ref, max_seeds)


def stored(sweep: Sweep, sibling: Sweep) -> RaceState:
    """The race as it was asked for, from the runs stored: its candidates are the configs that
    have runs (ranked by the sweep as it is now), its rounds the stored `--max-seeds`."""
    sources = {t.user_attrs.get(keys.VERIFY_SOURCE) for t in sibling.trials()}
    chosen = [t for t in sweep.top(10_000) if t.number in sources]
    # Only its runs are read here (nothing is queued): the point itself is not needed, so a
    # study file that cannot be found from here does not matter.
    ref = {"kd.alpha": 0.0} if REFERENCE in sources else None
    return _build(sweep, chosen, ref, int(sibling.attrs.get(keys.RACE_MAX_SEEDS, race.MAX_SEEDS)))


def _build(sweep: Sweep, chosen: list[FrozenTrial], ref: dict[str, Any] | None, max_seeds: int) -> RaceState:
    base = int(chosen[0].user_attrs.get(keys.TRAIN_SEED, 0)) if chosen else 0
    seeds = seeds_for(max_seeds, base)
    trials = {t.number: t for t in chosen}
    ids: list[int] = list(trials)
    if ref is not None:
        ids.append(REFERENCE)
    by_seed = {s: i for i, s in enumerate(seeds)}
    values: dict[int, list[float | None]] = {c: [None] * max_seeds for c in ids}
    pending = 0
    sibling = sweep.sibling(VERIFY_SUFFIX)
    if sibling is not None:
        for t in sibling.trials():
            src, seed = t.user_attrs.get(keys.VERIFY_SOURCE), t.user_attrs.get(keys.VERIFY_SEED)
            if src not in values or seed not in by_seed:
                continue
            if t.state in (TrialState.WAITING, TrialState.RUNNING):
                pending += 1
            elif t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
                values[src][by_seed[seed]] = float(t.value)
    replayed = race.replay(values, max_seeds=max_seeds, maximize=sweep.maximize)
    return RaceState(sweep, trials, seeds, values, pending, replayed, ref)


def queue_round(st: RaceState) -> int:
    """Queue the runs the race's next round needs and has not queued yet; how many were added.
    The sibling's N grows by those runs, under its lock."""
    wanted = [(c, st.seeds[r]) for c, r in st.race.wanted()]
    if not wanted:
        return 0
    runs = [(st.reference_params if c == REFERENCE else st.trials[c].params, c, seed) for c, seed in wanted]
    return st.sweep.queue_verification(runs)


def run(sweep: Sweep, top: int, max_seeds: int, start: Callable[[Sweep], None] | None,
        echo: Callable[[str], Any]) -> RaceState:
    """Race until it ends (queue a round, let `start` run the sibling's waiting trials with
    workers here, look again); with `start` None queue the next round only."""
    while True:
        st = state(sweep, top, max_seeds)
        if st.race.finished:
            return st
        added = queue_round(st)
        sibling = sweep.sibling(VERIFY_SUFFIX)
        if sibling is not None:  # how `best` and `report` replay this race later
            sibling.study.set_user_attr(keys.VERIFY_MODE, "race")
            sibling.study.set_user_attr(keys.RACE_MAX_SEEDS, max_seeds)
        if added:
            echo(f"round {st.race.rounds + 1}: {added} run(s) queued in {sweep.name + VERIFY_SUFFIX!r} "
                 f"({len(st.race.survivors)} candidates)")
        if start is None:
            return state(sweep, top, max_seeds)
        start(sibling)
        after = state(sweep, top, max_seeds)
        if after.values == st.values:
            return after  # the workers finished nothing (failed runs, or stopped): the caller says so
