"""Study presets: a preset's own narrowing of the space is what its sweeps sample and accept."""

import optuna
import pytest

from kdsweep.service import space as sp
from kdsweep.service import spec as studies


def test_q1_smoke_samples_and_accepts_only_its_calibrated_learning_rates() -> None:
    q1 = studies.load("q1")
    smoke, paper = q1.space_for("smoke"), q1.space_for("paper")
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rates = [sp.sample(probe.ask(), smoke)["optim.lr"] for _ in range(200)]
    assert 0.01 <= min(rates) and max(rates) <= 0.2
    assert max(rates) > 0.1  # the whole calibrated range is sampled, not a corner of it
    point = {"model.family": "mlp", "mlp.dropout": 0.0, "optim.lr": 0.3}
    with pytest.raises(sp.SpaceError, match="outside the space"):
        sp.validate_point(smoke, point)
    assert sp.validate_point(paper, point)["optim.lr"] == 0.3  # the paper preset keeps its range
