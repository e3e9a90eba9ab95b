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
the reference beside the top configs on fresh seeds (see `verify.prepare`).

Hooks (who calls what): launch calls `prepare` after creating the sweep and runs the
sibling's waiting trial with a worker (`run`); `best`, `status` and the report print
`difference_line`; `verify.prepare` enqueues `reference_point` as one more configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import stats

SUFFIX = ".baseline"
OF = "kdsweep.baseline_of"  # study user attr of a sibling: the sweep it is the reference of
REFERENCE = "baseline.reference"  # trial user attr: this run is the α=0 reference
# The student alone: no soft term. T does nothing at α=0; 1.0 is inside q2's range.
POINT = {"kd.alpha": 0.0, "kd.temperature": 1.0}


def sibling_name(study_name: str) -> str:
    return study_name + SUFFIX


def reference_point(space: Sequence[Any]) -> dict[str, Any] | None:
    """The α=0 point of a KD search space (checked against it), or None for other studies."""
    from kdsweep.service import space as sp

    names = {p.name for p in space}
    if not set(POINT) <= names:
        return None
    return sp.validate_point(list(space), dict(POINT))


def sweep_seed(sweep: optuna.Study) -> int:
    """The seed every trial of the sweep trains with (its base config's)."""
    from kdsweep.service.worker import DEFINITION

    config = (sweep.user_attrs.get(DEFINITION) or {}).get("config") or {}
    return int(config.get("seed", 0))


def _space(sweep: optuna.Study) -> list[Any] | None:
    from kdsweep.service import spec as studies
    from kdsweep.service.worker import DEFINITION

    definition = sweep.user_attrs.get(DEFINITION) or {}
    if "study" not in definition or "preset" not in definition:
        return None
    study_def = studies.load(definition["study"])
    return study_def.space_for(definition["preset"], definition.get("overrides") or {})


def prepare(sweep: optuna.Study, storage: BaseStorage) -> optuna.Study | None:
    """Create `<sweep>.baseline` with its one waiting α=0 run, unless it is there already.

    Returns the sibling, or None when the sweep is not a KD study (its space has no kd.alpha)
    or is itself a sibling. A failed run is queued again; a complete, running or waiting one
    is left alone, so calling this on every launch (a resume) adds nothing.
    """
    from kdsweep.service.verify import OF as VERIFY_OF
    from kdsweep.service.verify import SEED
    from kdsweep.service.worker import MAX_FAILURES

    if OF in sweep.user_attrs or VERIFY_OF in sweep.user_attrs:
        return None
    space = _space(sweep)
    point = reference_point(space) if space is not None else None
    if point is None:
        return None
    sibling = optuna.create_study(study_name=sibling_name(sweep.study_name), storage=storage,
                                  direction=sweep.direction, load_if_exists=True)
    for key, value in sweep.user_attrs.items():  # definition, overrides: workers must agree
        if key.startswith("kdsweep."):
            sibling.set_user_attr(key, value)
    sibling.set_user_attr(OF, sweep.study_name)
    sibling.set_user_attr("description", f"the student alone (alpha=0), reference of {sweep.study_name!r}")
    sibling.set_user_attr(MAX_FAILURES, 0)  # a failed run is re-queued by the next launch
    live = [t for t in sibling.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    if not live:
        sibling.enqueue_trial(point, user_attrs={SEED: sweep_seed(sweep), REFERENCE: True},
                              skip_if_exists=False)
    return sibling


def find(sweep: optuna.Study) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=sibling_name(sweep.study_name), storage=sweep._storage)
    except KeyError:
        return None


def result(sweep: optuna.Study) -> FrozenTrial | None:
    """The complete α=0 reference run of `sweep`, or None while there is none."""
    sibling = find(sweep)
    if sibling is None:
        return None
    done = [t for t in sibling.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return done[-1] if done else None


def difference_line(winner: FrozenTrial, reference: FrozenTrial | None, study_name: str) -> str:
    """The winner against the student alone, paired on the validation images, one seed each."""
    if reference is None or reference.value is None:
        return (f"student alone (alpha=0): not run yet (it runs in {sibling_name(study_name)!r} "
                "with the sweep's workers).")
    head = (f"winner trial {winner.number} {winner.value:.4f} vs the student alone (alpha=0) "
            f"{reference.value:.4f}: ")
    diff = stats.compare_trials(winner, reference)
    body = diff.text() if diff is not None else f"{winner.value - reference.value:+.4f} (no per-image scores)"
    return head + body + (f"; one seed each, so seed noise is not in this interval: "
                          f"`kdsweep best {study_name} --verify` re-trains both on fresh seeds.")


def run(sibling: optuna.Study, worker_args: list[str], plans: Sequence[Any],
        echo: Callable[[str], None], extra_env: Mapping[str, str] | None = None) -> None:
    """Run the sibling's waiting reference run with launch's worker processes (one is enough)."""
    from kdsweep.service import launch as launcher

    waiting = sibling.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting:
        return
    echo(f"training the student alone (alpha=0) once, in {sibling.study_name!r}")
    launcher.run(sibling, [*worker_args, "--study-name", sibling.study_name], list(plans)[:1], 1, echo,
                 extra_env=extra_env)
