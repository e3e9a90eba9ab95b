"""`kdsweep enqueue`: known points checked against the study's search space before any is stored."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from kdsweep import cli
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep


def _waiting_points(url: str, name: str) -> list[dict]:
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return [t.system_attrs.get("fixed_params", {}) for t in waiting]


def _run(*args: str) -> object:
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture
def q2(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/e.db"
    result = _run("create", "q2", "--preset", "smoke", "-n", "2", "--storage", url)
    assert result.exit_code == 0, result.output
    assert _waiting_points(url, "q2") == []  # workers make the 2 slots as they need them
    return url


def test_good_point_is_queued_normalised(q2: str) -> None:
    result = _run("enqueue", "q2", "kd.alpha=0.9", "kd.temperature=10", "--storage", q2)
    assert result.exit_code == 0, result.output
    points = _waiting_points(q2, "q2")
    assert {"kd.alpha": 0.9, "kd.temperature": 10.0} in points
    assert isinstance([p for p in points if p][0]["kd.temperature"], float)  # 10 -> 10.0
    again = _run("enqueue", "q2", "kd.alpha=0.9", "kd.temperature=10", "--storage", q2)
    assert again.exit_code == 0 and len(_waiting_points(q2, "q2")) == len(points)  # not twice


def test_baselines_come_from_the_study_file(q2: str) -> None:
    result = _run("enqueue", "q2", "--baselines", "--storage", q2)
    assert result.exit_code == 0, result.output
    points = [p for p in _waiting_points(q2, "q2") if p]
    assert {"kd.alpha": 0.0, "kd.temperature": 1.0} in points and len(points) == 2
    # The two points are the study's two trials, not two more.
    study = optuna.load_study(study_name="q2", storage=open_storage(q2, heartbeat=False))
    c = Sweep(study).counts()
    assert (c.waiting, c.unmade) == (2, 0)


@pytest.mark.parametrize(("args", "message"), [
    (["kd.alpha=1.5", "kd.temperature=4"], "outside the space"),
    (["kd.alpha=0.5"], "'kd.temperature' needs a value"),
    (["kd.alpha=0.5", "kd.temperature=4", "kd.beta=1"], "unknown parameter 'kd.beta'"),
    (["kd.alpha=0.5", "kd.temperature=hot"], "outside the space"),
    (["kd.alpha"], "is not key=value"),
    ([], "give key=value pairs or --baselines"),
])
def test_bad_points_are_refused_and_nothing_is_stored(q2: str, args: list[str], message: str) -> None:
    result = _run("enqueue", "q2", *args, "--baselines", "--storage", q2) if args else \
        _run("enqueue", "q2", "--storage", q2)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert _waiting_points(q2, "q2") == []  # not even the (valid) baselines


def test_conditional_parameters_of_q1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q1.db"
    assert _run("create", "q1", "--preset", "smoke", "-n", "1", "--storage", url).exit_code == 0
    cnn = ["model.family=cnn", "optim.lr=0.05", "cnn.width=8", "cnn.factorized=false"]
    ok = _run("enqueue", "q1", *cnn, "reg.kind=dropblock", "reg.rate=0.1", "dropblock.size=3", "--storage", url)
    assert ok.exit_code == 0, ok.output
    assert {"model.family": "cnn", "optim.lr": 0.05, "cnn.width": 8, "cnn.factorized": False,
            "reg.kind": "dropblock", "reg.rate": 0.1, "dropblock.size": 3} in _waiting_points(url, "q1")
    bad = _run("enqueue", "q1", *cnn, "reg.kind=dropout", "reg.rate=0.1", "dropblock.size=3", "--storage", url)
    assert bad.exit_code == 2 and "'dropblock.size' does not apply" in bad.output
    wide = _run("enqueue", "q1", "model.family=cnn", "optim.lr=0.05", "cnn.width=64", "cnn.factorized=false",
                "reg.kind=none", "--storage", url)
    assert wide.exit_code == 2 and "cnn.width" in wide.output  # the smoke preset narrows the widths


def test_unknown_study_is_one_clear_error(q2: str) -> None:
    result = _run("enqueue", "nope", "kd.alpha=0.5", "--storage", q2)
    assert result.exit_code == 2 and "no study named 'nope'" in result.output
