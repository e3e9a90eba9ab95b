"""Heartbeat, grace period and retry budget: defaults, each overridable from the environment."""

from __future__ import annotations

import os

from kdsweep.service.location import StorageError

HEARTBEAT_S = 10  # seconds between a running trial's heartbeats (env KDSWEEP_HEARTBEAT)
GRACE_S = 30  # a RUNNING trial silent this long belongs to a dead worker (env KDSWEEP_GRACE)
RETRIES = 12  # retries per call (env KDSWEEP_RETRIES); back-off doubles up to 10 s: about 75 s


def _whole(env: str, default: int, least: int = 1, unit: str = "seconds") -> int:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise StorageError(f"{env} must be a whole number of {unit}, at least {least}; got {raw!r}.")
    return value


def heartbeat_interval() -> int:
    """Seconds between heartbeats: $KDSWEEP_HEARTBEAT, else HEARTBEAT_S (Optuna wants an int)."""
    return _whole("KDSWEEP_HEARTBEAT", HEARTBEAT_S)


def grace_period() -> int:
    """Seconds of silence after which a RUNNING trial is declared dead: $KDSWEEP_GRACE, else GRACE_S.

    Every worker of a study must use the same value; it must exceed the heartbeat interval by
    enough to ride out a database restart (a worker retries its heartbeat meanwhile).
    """
    grace = _whole("KDSWEEP_GRACE", GRACE_S)
    if grace <= heartbeat_interval():
        raise StorageError(
            f"KDSWEEP_GRACE ({grace} s) must be longer than KDSWEEP_HEARTBEAT ({heartbeat_interval()} s)."
        )
    return grace


def retries() -> int:
    """Retries of a storage call on a transient error: $KDSWEEP_RETRIES, else RETRIES."""
    return _whole("KDSWEEP_RETRIES", RETRIES, least=0, unit="retries")
