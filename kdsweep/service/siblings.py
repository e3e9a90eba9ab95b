"""Sibling studies of a sweep: `<study>.verify` (seed verification) and `<study>.baseline`.

A sibling lives in the sweep's storage, copies its definition (so ordinary workers run it
through the same objective) and holds only runs queued by name: fixed params, a fixed seed
each (`keys.VERIFY_SEED`), never pruned, and never a sampled point. A failed run does not stop
the others and is not replaced by a sampled one; the next request (`--verify`, a launch) queues
it again, and then it runs (`Sweep.is_sibling`: siblings have no failure limit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from kdsweep.service import keys
from kdsweep.service.spec import StudyError

if TYPE_CHECKING:
    from kdsweep.service.sweep import Sweep

VERIFY_SUFFIX = ".verify"
BASELINE_SUFFIX = ".baseline"  # kdsweep/service/baseline.py
COPIED = (keys.DEFINITION, keys.SCHEMA, keys.UID, keys.SEED)  # workers of both must agree


def find(sweep: Sweep, suffix: str) -> Sweep | None:
    from kdsweep.service.sweep import Sweep, SweepNotFound

    try:
        return Sweep.load(sweep._storage, sweep.name + suffix, sweep.spec)
    except SweepNotFound:
        return None


def make(sweep: Sweep, suffix: str) -> Sweep:
    """The study `<name><suffix>` in the same storage (created if missing), as a Sweep."""
    from kdsweep.service.sweep import Sweep

    study = optuna.create_study(study_name=sweep.name + suffix, storage=sweep._storage,
                                direction=sweep.study.direction, load_if_exists=True)
    return Sweep(study, sweep.spec)


def copy_definition(sweep: Sweep, sibling: Sweep) -> None:
    for key in COPIED:
        if key in sweep.attrs:
            sibling.study.set_user_attr(key, sweep.attrs[key])


def verify(sweep: Sweep, top: int, seeds: Sequence[int]) -> tuple[Sweep, int]:
    """Create (or top up) `<sweep>.verify` with one waiting run per (top config, seed) (the
    fixed grid). Returns the sibling and the number of runs of this request."""
    best = sweep.top(top)
    if not best and sweep.verifies is None and sweep.definition:
        raise StudyError(f"study {sweep.name!r} has no complete trial to verify yet.")
    queue(sweep, [(t.params, t.number, seed) for t in best for seed in seeds])
    sibling = find(sweep, VERIFY_SUFFIX)
    assert sibling is not None  # queue made it
    return sibling, len(best) * len(seeds)


def queue(sweep: Sweep, runs: Sequence[tuple[Mapping[str, Any], int, int]]) -> int:
    """Queue verification runs (params, source trial, seed) in `<sweep>.verify`, creating it.

    Runs already complete, running or waiting are not added again; failed ones are. The
    sibling's N is the number of runs asked for so far, so its workers run exactly those
    (never sampled points); it grows under the sibling's lock (a race adds one round at a
    time). A run keeps no rank: the verification ranks by the sweep as it is when read.
    Returns how many runs were added.
    """
    if sweep.verifies is not None:
        raise StudyError(f"study {sweep.name!r} is itself a verification; verify {sweep.verifies!r}.")
    if not sweep.definition:
        raise StudyError(f"study {sweep.name!r} was not created by kdsweep, so its workers cannot re-train it.")
    sibling = make(sweep, VERIFY_SUFFIX)
    study = sibling.study
    if sibling.verifies not in (None, sweep.name):
        raise StudyError(f"study {sibling.name!r} exists and verifies another study; delete it first.")
    added = 0
    with sibling.lock():
        copy_definition(sweep, sibling)
        study.set_user_attr(keys.VERIFY_OF, sweep.name)
        study.set_user_attr(keys.DESCRIPTION, f"seed verification of {sweep.name!r}")
        present = {(t.user_attrs.get(keys.VERIFY_SOURCE), t.user_attrs.get(keys.VERIFY_SEED))
                   for t in sibling.trials() if t.state != TrialState.FAIL}
        for params, source, seed in runs:
            if (source, seed) not in present:
                user = {keys.VERIFY_SOURCE: source, keys.VERIFY_SEED: seed}
                if source == keys.REFERENCE_SOURCE:
                    user[keys.BASELINE_REFERENCE] = True
                study.enqueue_trial(dict(params), skip_if_exists=False, user_attrs=user)
                present.add((source, seed))
                added += 1
        # Its own N: every run asked for so far that has not failed.
        study.set_user_attr(keys.N_TRIALS, len(present))
    return added
