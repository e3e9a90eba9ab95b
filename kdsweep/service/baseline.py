"""The reference every KD sweep is read against: the student trained alone (α = 0).

"α=0.62, T=5 is best" means little unless it beats not distilling at all, so a Q2 sweep also
trains the student alone, once, in a sibling study `<study>.baseline` in the same storage —
like the seed verification's `<study>.verify` (kdsweep/service/verify.py), and for the same
reasons: inside the sweep it would count toward N, feed the sampler, enter the pruner's
rungs (its incumbent) and could become `best`. The sibling copies the sweep's definition, so
ordinary `kdsweep worker` processes run its one trial through the same objective; it has a
fixed seed (the sweep's own, so it starts like every sweep trial: same initialisation, batch
order and augmentation stream), is never pruned, and also scores the test set.

The comparison is paired on the validation images (kdsweep/service/stats.py) but uses one
seed per side, so seed-to-seed noise is not in its interval; `kdsweep best --verify` re-trains
the reference beside the top configs on fresh seeds (see `add_to_verification`).

Hooks (who calls what): launch calls `prepare` after creating the sweep and runs the
sibling's waiting trial with a worker (`run`); `best`, `status` and the report print
`difference_line`; `verifying.run` queues it beside the top configs (`add_to_verification`), seed-paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import keys, siblings, stats
from kdsweep.service.sweep import Sweep

SUFFIX = ".baseline"
OF = keys.BASELINE_OF  # study user attr of a sibling: the sweep it is the reference of
REFERENCE = keys.BASELINE_REFERENCE  # trial user attr: this run is the alpha=0 reference
# The student alone: no soft term. T does nothing at alpha=0; 1.0 is inside q2's range.
POINT = {"kd.alpha": 0.0, "kd.temperature": 1.0}


def sibling_name(study_name: str) -> str:
    return study_name + SUFFIX


def reference_point(space: Sequence[Any]) -> dict[str, Any] | None:
    """The alpha=0 point of a KD search space (checked against it), or None for other studies."""
    from kdsweep.service import space as sp

    names = {p.name for p in space}
    if not set(POINT) <= names:
        return None
    return sp.validate_point(list(space), dict(POINT))


def sweep_seed(sweep: Sweep) -> int:
    """The training seed every trial of the sweep uses (its base config's)."""
    return int((sweep.definition.get("config") or {}).get("seed", 0))


def _reference(sweep: Sweep) -> dict[str, Any] | None:
    from kdsweep.service import spec as studies

    definition = sweep.definition
    if "study" not in definition or "preset" not in definition:
        return None
    spec = sweep.spec or studies.load(definition["study"])
    return reference_point(spec.space_for(sweep.preset, sweep.overrides))


def prepare(sweep: Sweep) -> Sweep | None:
    """Create `<sweep>.baseline` with its one waiting alpha=0 run, unless it is there already.

    Returns the sibling, or None when the sweep is not a KD study (its space has no kd.alpha)
    or is itself a sibling. A failed run is queued again; a complete, running or waiting one
    is left alone, so calling this on every launch (a resume) adds nothing.
    """
    if OF in sweep.attrs or sweep.verifies is not None:
        return None
    point = _reference(sweep)
    if point is None:
        return None
    sibling = sweep.make_sibling(SUFFIX)
    study = sibling.study
    with sibling.lock():
        siblings.copy_definition(sweep, sibling)
        study.set_user_attr(OF, sweep.name)
        study.set_user_attr(keys.DESCRIPTION, f"the student alone (alpha=0), reference of {sweep.name!r}")
        study.set_user_attr(keys.N_TRIALS, 1)  # its one run: workers never sample a point here
        if not [t for t in sibling.trials() if t.state != TrialState.FAIL]:
            study.enqueue_trial(point, skip_if_exists=False,
                                user_attrs={keys.VERIFY_SEED: sweep_seed(sweep), REFERENCE: True})
    return sibling


def find(sweep: Sweep) -> Sweep | None:
    return sweep.sibling(SUFFIX)


def result(sweep: Sweep) -> FrozenTrial | None:
    """The complete alpha=0 reference run of `sweep`, or None while there is none."""
    sibling = find(sweep)
    if sibling is None:
        return None
    done = [t for t in sibling.trials(TrialState.COMPLETE) if t.value is not None]
    return done[-1] if done else None


def difference_line(winner: FrozenTrial, reference: FrozenTrial | None, study_name: str,
                    verified: bool = False) -> str:
    """The winner against the student alone, paired on the validation images, one seed each
    (`verified`: a seed verification, which races the reference too, exists)."""
    if reference is None or reference.value is None:
        return (f"student alone (alpha=0): not run yet (it runs in {sibling_name(study_name)!r} "
                "with the sweep's workers).")
    head = (f"winner trial {winner.number} {winner.value:.4f} vs the student alone (alpha=0) "
            f"{reference.value:.4f}: ")
    diff = stats.compare_trials(winner, reference)
    body = diff.text() if diff is not None else f"{winner.value - reference.value:+.4f} (no per-image scores)"
    then = (stats.VERIFIED if verified else
            f"`kdsweep best {study_name} --verify` re-trains both on fresh seeds.")
    return head + body + f"; one seed each, so seed noise is not in this interval: {then}"


def add_to_verification(sweep: Sweep, sibling: Sweep, seeds: Sequence[int], rank: int) -> int:
    """Queue the alpha=0 reference in `<sweep>.verify` on `seeds` (one more configuration,
    seed-paired with the top configs); how many runs that request holds (0: not a KD study)."""
    REFERENCE_SOURCE = keys.REFERENCE_SOURCE
    point = _reference(sweep)
    if point is None:
        return 0
    with sibling.lock():
        present = {(t.user_attrs.get(keys.VERIFY_SOURCE), t.user_attrs.get(keys.VERIFY_SEED))
                   for t in sibling.trials() if t.state != TrialState.FAIL}
        for seed in seeds:
            if (REFERENCE_SOURCE, seed) not in present:
                sibling.study.enqueue_trial(point, skip_if_exists=False, user_attrs={
                    keys.VERIFY_SOURCE: REFERENCE_SOURCE, keys.VERIFY_SEED: seed, keys.VERIFY_RANK: rank,
                    REFERENCE: True})
                present.add((REFERENCE_SOURCE, seed))
        sibling.study.set_user_attr(keys.N_TRIALS, len(present))
    return len(seeds)
