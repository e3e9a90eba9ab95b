"""A sweep in words and JSON: the progress line, the best line, the summary table, status.

What `kdsweep status`, `ls`, `best` and `launch` print about a `Sweep`; reads only.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from kdsweep.service import keys

if TYPE_CHECKING:
    from kdsweep.service.sweep import Counts, Sweep


def fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def best_line(sweep: Sweep) -> str:
    best = sweep.best_trial
    if best is None:
        return "no finished trial yet"
    params = " ".join(f"{k}={fmt(v)}" for k, v in best.params.items())
    return f"best {best.value:.4f} (trial {best.number}: {params})"


def progress_line(sweep: Sweep, c: Counts | None = None) -> str:
    c = c or sweep.counts()
    requeued = f", re-queued {c.requeued}" if c.requeued else ""
    return (f"[{c.finished}/{c.target}] complete {c.complete}, pruned {c.pruned}, "
            f"failed {c.failed}{requeued}, running {c.running} | {best_line(sweep)}")


def summary_table(sweep: Sweep, top: int = 5) -> str:
    """The best `top` trials as a fixed-width table."""
    done = sweep.top(top)
    if not done:
        return "no complete trials."
    names = sorted({k for t in done for k in t.params})
    header = ["trial", "value", "epochs"] + names
    rows = [[str(t.number), f"{t.value:.4f}", str(t.user_attrs.get(keys.EPOCHS_RUN, ""))]
            + [fmt(t.params.get(k, "-")) for k in names] for t in done]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [header] + rows)


def last_activity(sweep: Sweep) -> datetime.datetime | None:
    stamps = [s for t in sweep.trials() for s in (t.datetime_complete, t.datetime_start) if s]
    return max(stamps) if stamps else None


def summary(sweep: Sweep) -> dict[str, Any]:
    """What `kdsweep ls` and `status --json` show: counts, N, best value, last activity."""
    best, last = sweep.best_trial, last_activity(sweep)
    return {"study": sweep.name, "spec": sweep.spec_name, "preset": sweep.preset,
            "n_trials": sweep.n_trials, **sweep.counts().as_dict(),
            "best": None if best is None else {"trial": best.number, "value": best.value,
                                               "params": best.params},
            "last_activity": None if last is None else last.isoformat(timespec="seconds"),
            "stopped": sweep.stop_requested, "verifies": sweep.verifies}


def status(sweep: Sweep) -> dict[str, Any]:
    """`kdsweep status --json`: the summary, the running trials, the last failures."""
    from kdsweep.service.sweep import failed_for_good

    running = [{"trial": t.number, "epoch": max(t.intermediate_values, default=0), "params": t.params}
               for t in sweep.trials(TrialState.RUNNING)]
    failed = [{"trial": t.number, "reason": t.user_attrs.get(keys.FAIL_REASON, "?")}
              for t in sweep.trials(TrialState.FAIL) if failed_for_good(t)][-5:]
    return {**summary(sweep), "running_trials": running, "last_failures": failed}


def status_text(sweep: Sweep) -> str:
    s, c = status(sweep), sweep.counts()
    requeued = f", {c.requeued} re-queued" if c.requeued else ""
    lines = [f"study {sweep.name!r}: {c.complete} complete, {c.pruned} pruned, {c.failed} failed{requeued}, "
             f"{c.infeasible} infeasible, {c.running} running, {c.waiting} waiting (N={sweep.n_trials})"
             + (" - stopped (`kdsweep stop`)" if s["stopped"] else ""),
             best_line(sweep)]
    stop = sweep.stop_reason(c)
    if stop:
        lines.append(f"  {stop}")
    lines += [f"  running trial {r['trial']}: epoch {r['epoch']}, {json.dumps(r['params'])}"
              for r in s["running_trials"]]
    lines += [f"  failed trial {f['trial']}: {f['reason']}" for f in s["last_failures"]]
    return "\n".join(lines)
