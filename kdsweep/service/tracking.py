"""Experiment trackers: each trial as one MLflow run (`kdsweep launch/worker --track mlflow`).

The MLflow layout, through MLflow's own client (`mlflow.tracking.MlflowClient`, which reads
the standard `MLFLOW_TRACKING_URI`; unset, MLflow's default, `sqlite:///mlflow.db` in the
worker's folder):

* one **experiment per study**, named after it (a `<study>.verify` sibling gets its own);
* one **run per trial**, named `trial-N` after the trial's first number (`origin`). A trial
  that kdsweep re-queues (an interrupt, a dead worker, `kdsweep stop`) comes back under a new
  Optuna number; its retry finds the run by its tags (`kdsweep.study_uid`, `kdsweep.trial`)
  and continues it, so a re-queued trial is still one run;
* **params**: the sampled values and the training seed; **metrics** each epoch, step = epoch,
  from the same report that feeds the pruner; at the end `value` (the trial's value) and
  `value_se` (its binomial standard error, when the per-image validation scores are known);
* the end in the tag `state` (COMPLETE, PRUNED, FAILED, or REQUEUED while it waits for its
  retry) and the run status (FINISHED, FINISHED, FAILED, KILLED).

Tracking is a side channel: a tracking server that stops answering costs a warning and the
rest of that trial's run, never the trial. Nothing here imports MLflow until a run is opened,
and nothing else in kdsweep imports it at all; the training core never knows of it.
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("kdsweep.service.tracking")

TRACKERS = ("mlflow",)  # the names `--track` takes
INSTALL = {"mlflow": "pip install 'kdsweep[mlflow]'"}
# The run tags that find a trial's run again (on a retry) and say how it ended.
STUDY_TAG = "kdsweep.study"
UID_TAG = "kdsweep.study_uid"  # tells this study's runs from a namesake's (keys.UID)
TRIAL_TAG = "kdsweep.trial"  # the trial's first number: the same for every attempt
NUMBER_TAG = "kdsweep.number"  # the Optuna number of the latest attempt
STATE_TAG = "state"
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAILED": "FAILED", "REQUEUED": "KILLED"}


class TrackingError(Exception):
    """A tracker was asked for that cannot be used here (a usage error)."""


def check(tracker: str | None) -> None:
    """Raise TrackingError when `tracker`'s package is not installed (imports nothing)."""
    if tracker is None:
        return
    if tracker not in TRACKERS:
        raise TrackingError(f"unknown tracker {tracker!r}; use one of: {', '.join(TRACKERS)}.")
    if importlib.util.find_spec(tracker) is None:
        raise TrackingError(f"--track {tracker} needs {tracker}, which is not installed here; "
                            f"install it with {INSTALL[tracker]}.")


def _millis() -> int:
    return int(time.time() * 1000)


class MlflowTrial:
    """One trial's MLflow run: opened (or continued) when the trial is configured, fed each
    epoch, ended once. Every call goes through `_call`, which turns a tracking failure into a
    warning and stops this run's tracking."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.ended = False

    @classmethod
    def open(cls, study_name: str, study_uid: str, origin: int, number: int,
             params: Mapping[str, Any]) -> MlflowTrial | None:
        """The trial's run, continued if an earlier attempt created it; None (with a warning)
        when the tracking server cannot be reached."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            experiment_id = _experiment(client, study_name)
            found = client.search_runs(
                [experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                filter_string=f"tags.`{UID_TAG}` = '{study_uid}' and tags.`{TRIAL_TAG}` = '{origin}'")
            if found:
                run = found[0]
                client.update_run(run.info.run_id, status="RUNNING")
                logged = run.data.params
            else:
                run = client.create_run(experiment_id, run_name=f"trial-{origin}", tags={
                    STUDY_TAG: study_name, UID_TAG: study_uid, TRIAL_TAG: str(origin)})
                logged = {}
            tracked = cls(client, run.info.run_id)
            from mlflow.entities import Param, RunTag

            # Params cannot change once logged; a retry has its first attempt's values.
            new = [Param(k, str(v)) for k, v in params.items() if k not in logged]
            client.log_batch(tracked.run_id, params=new,
                             tags=[RunTag(NUMBER_TAG, str(number)), RunTag(STATE_TAG, "RUNNING")])
            return tracked
        except Exception as exc:
            log.warning("trial %d is not tracked in MLflow: %s", number, _reason(exc))
            return None

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """One epoch's metrics, step = epoch."""
        from mlflow.entities import Metric

        now = _millis()
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if _number(v)]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def end(self, state: str, value: float | None = None, se: float | None = None,
            extra: Mapping[str, float] | None = None) -> None:
        """End the run: its final value (and standard error) and how the trial ended."""
        if self.ended:
            return
        self.ended = True
        from mlflow.entities import Metric, RunTag

        now = _millis()
        finals = {"value": value, "value_se": se, **(extra or {})}
        batch = [Metric(k, float(v), now, 0) for k, v in finals.items() if _number(v)]

        def send() -> None:
            self.client.log_batch(self.run_id, metrics=batch, tags=[RunTag(STATE_TAG, state)])
            self.client.set_terminated(self.run_id, STATUS[state])

        self._call(send)

    def _call(self, fn: Any) -> None:
        if self.client is None:
            return
        try:
            fn()
        except Exception as exc:
            log.warning("MLflow run %s stopped tracking: %s", self.run_id, _reason(exc))
            self.client = None


def _experiment(client: Any, name: str) -> str:
    """The experiment named after the study, created by the first worker that needs it."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another worker created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
