"""How a launch ends: its closing sentence and an exit code a script can act on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kdsweep.service.launch import ending
from kdsweep.service.sweep import Counts


def sweep(stop_requested: bool = False, n_trials: int = 4) -> SimpleNamespace:
    return SimpleNamespace(stop_requested=stop_requested, n_trials=n_trials)


@pytest.mark.parametrize("how, stop", [("timeout", False), ("done", True)], ids=["timeout", "drained"])
def test_a_study_stopped_short_exits_with_the_resume_code(how: str, stop: bool) -> None:
    """--timeout and `kdsweep stop` leave a study short of N: neither success (0) nor failure (1)."""
    message, code = ending(sweep(stop), Counts(complete=1), how)
    assert code == 75  # EX_TEMPFAIL, documented in the CLI help
    assert "run the same command again" in message


def test_a_finished_study_exits_0_and_one_short_after_failures_exits_1() -> None:
    assert ending(sweep(), Counts(complete=3, pruned=1), "done") == ("", 0)
    assert ending(sweep(), Counts(complete=2, failed=2), "done")[1] == 1
    assert ending(sweep(), Counts(complete=1), "interrupted")[1] == 130
