"""Search spaces as data: checks, conditional sampling, user-given points, values from the shell."""

from __future__ import annotations

import optuna
import pytest

from kdsweep.service import space as sp
from kdsweep.service.space import Categorical, Float, Int, SpaceError

SPACE = [
    Categorical("model.family", ["mlp", "cnn"]),
    Float("optim.lr", 0.01, 0.4, log=True),
    Categorical("reg.kind", ["none", "dropblock"], when={"model.family": ["cnn"]}),
    Int("dropblock.size", 3, 7, when={"model.family": ["cnn"], "reg.kind": ["dropblock"]}),
]


@pytest.mark.parametrize("bad, message", [
    ([Categorical("a.b", [])], "empty list"),
    ([Categorical("a.b", [1, 1])], "twice"),
    ([Float("a.b", 1.0, 1.0)], "below high"),
    ([Float("a.b", 0.0, 1.0, log=True)], "log scale"),
    ([Int("a.b", 1, 2), Int("a.b", 1, 3)], "declared twice"),
    ([Int("a.b", 1, 2, when={"c.d": [1]})], "declared before"),
])
def test_check_space_rejects(bad: list[sp.Param], message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        sp.check_space(bad)


def test_conditional_parameters_exist_only_when_their_condition_holds() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        values = sp.sample(study.ask(), SPACE)
        seen.add((values["model.family"], values.get("reg.kind")))
        assert ("reg.kind" in values) == (values["model.family"] == "cnn")
        assert ("dropblock.size" in values) == (values.get("reg.kind") == "dropblock")
        assert 0.01 <= values["optim.lr"] <= 0.4
    assert seen == {("mlp", None), ("cnn", "none"), ("cnn", "dropblock")}


def test_validate_point_normalises_and_rejects() -> None:
    point = sp.validate_point(SPACE, {"model.family": "cnn", "optim.lr": 0.1, "reg.kind": "dropblock",
                                      "dropblock.size": 5})
    assert point["dropblock.size"] == 5
    assert sp.validate_point(SPACE, {"model.family": "mlp", "optim.lr": 0.1}) == {
        "model.family": "mlp", "optim.lr": 0.1}
    assert isinstance(sp.validate_point([Float("x.y", 0.0, 2.0)], {"x.y": 1})["x.y"], float)
    with pytest.raises(SpaceError, match="unknown parameter"):
        sp.validate_point(SPACE, {"model.family": "mlp", "optim.lr": 0.1, "nope": 1})
    with pytest.raises(SpaceError, match="does not apply"):
        sp.validate_point(SPACE, {"model.family": "mlp", "optim.lr": 0.1, "reg.kind": "none"})
    with pytest.raises(SpaceError, match="needs a value"):
        sp.validate_point(SPACE, {"model.family": "cnn", "optim.lr": 0.1})
    with pytest.raises(SpaceError, match="outside the space"):
        sp.validate_point(SPACE, {"model.family": "mlp", "optim.lr": 0.5})
    with pytest.raises(SpaceError, match="outside the space"):
        sp.validate_point([Categorical("a.b", [1, 2])], {"a.b": True})  # True == 1, but not a choice


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("none", None),
    ("cnn", "cnn"),
])
def test_parse_value(text: str, value: object) -> None:
    parsed = sp.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_describe_is_json_ready_and_keyed_by_name() -> None:
    described = sp.describe(SPACE)
    assert list(described) == [p.name for p in SPACE]
    assert described["dropblock.size"] == {
        "type": "int", "low": 3, "high": 7, "log": False, "target": "dropblock.size",
        "when": {"model.family": ["cnn"], "reg.kind": ["dropblock"]}}
