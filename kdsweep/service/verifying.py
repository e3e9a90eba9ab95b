"""Running a seed verification: `kdsweep best STUDY --verify`.

A race (the default) or a fixed grid (`--grid`) of the sweep's top configs on fresh seeds, run
as ordinary queued trials of the sibling `<study>.verify` by `kdsweep worker` processes started
here (or by workers on other hosts: `--no-run` only queues). After every verification the
verdict is written to the study's note in optuna-dashboard. What the runs found, and what
`best` exports from them, is `kdsweep.service.verify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from kdsweep.service import keys, race, racing
from kdsweep.service.sweep import VERIFY_SUFFIX, Sweep
from kdsweep.service.verify import (
    GRID_TOP,
    REFERENCE_SOURCE,
    VerifyError,
    VerifyIncomplete,
    seeds_for,
    summary_text,
)


def load_spec(sweep: Sweep) -> Any:
    """The sweep's study file: the one it was launched from (recorded path), else by name."""
    from kdsweep.service import spec as studies

    path = sweep.study_file
    return studies.load(path if path and Path(path).exists() else sweep.spec_name)


def run(sweep: Sweep, storage_url: str, top: int | None, seeds: int, workers: int, device: str,
        data: str | None, echo: Any, start_workers: bool = True, grid: bool = False,
        max_seeds: int = race.MAX_SEEDS) -> str:
    """Verify the sweep's top over fresh seeds in `<sweep>.verify`: a race (default) or a fixed
    grid (top K x `seeds`), its trials run by `workers` ordinary `kdsweep worker` processes here
    (unless `start_workers` is False: then only the next runs are queued, for other hosts'
    workers). Returns the verification text."""
    from kdsweep.service import launch as launcher
    from kdsweep.service.dashboard import write_verdict

    if not sweep.definition or "preset" not in sweep.definition:
        raise VerifyError(f"study {sweep.name!r} was not created by kdsweep, so its workers cannot re-train it.")
    best = sweep.top(1)
    if not best:
        raise VerifyError(f"study {sweep.name!r} has no complete trial to verify yet.")
    sweep.spec = load_spec(sweep)
    # The workers would refuse a study whose definition differs from the local study file;
    # say so now, before anything is stored.
    sweep.check(sweep.spec)
    plan = launcher.plan_workers(workers, device, storage_url)

    def start(sibling: Sweep) -> None:
        if not sibling.trials(TrialState.WAITING):
            return
        args = [sweep.spec.source, "--study-name", sibling.name]
        if data:
            args += ["--data", data]
        launcher.run(sibling, args, plan, echo)

    if grid:
        k = top or GRID_TOP
        chosen = seeds_for(seeds, int(best[0].user_attrs.get(keys.TRAIN_SEED, 0)))
        sibling, n = sweep.verify_sibling(k, chosen)
        n_top = n // max(seeds, 1)
        sibling.study.set_user_attr(keys.VERIFY_MODE, "grid")
        ref = racing.reference_params(sweep)
        if ref is not None:
            sweep.queue_verification([(ref, REFERENCE_SOURCE, s) for s in chosen])
            n += len(chosen)
        echo(f"verifying the top {n_top} configs of {sweep.name!r} with {seeds} seeds each in study "
             f"{sibling.name!r} ({n} runs, a fixed grid)")
        if start_workers:
            start(sibling)
            left = len(sibling.trials(TrialState.WAITING, TrialState.RUNNING))
            write_verdict(sweep)
            if left:
                raise VerifyIncomplete(
                    f"{left} of {n} verification runs did not finish; see the workers' messages above, "
                    "then run the same command again (finished runs are kept)."
                )
        write_verdict(sweep)
        return summary_text(sweep) or ""
    k = top or racing.DEFAULT_TOP
    st = racing.state(sweep, k, max_seeds)
    echo(f"racing {len(st.values)} candidates of {sweep.name!r} over at most {max_seeds} fresh seeds in "
         f"study {sweep.name + VERIFY_SUFFIX!r}: trials {', '.join(str(c) for c in st.trials)}"
         + (" and the alpha=0 reference" if racing.REFERENCE in st.values else ""))
    st = racing.run(sweep, k, max_seeds, start if start_workers else None, echo)
    write_verdict(sweep)  # the study's note in optuna-dashboard: what the race settled so far
    if start_workers and not st.race.finished:
        raise VerifyIncomplete(
            f"the race stopped in round {st.race.rounds + 1} with runs unfinished; see the workers' "
            "messages above, then run the same command again (finished runs are kept).\n" + st.text())
    return st.text()
