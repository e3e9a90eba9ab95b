"""Study files (specs): their spaces, presets, definitions and the q1 budget narrowing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

import kdsweep
from kdsweep.core import budget
from kdsweep.service import spec as studies
from kdsweep.service.spec import StudyError


@pytest.fixture(scope="module")
def q1() -> studies.StudySpec:
    return studies.load("q1")


@pytest.fixture(scope="module")
def q2() -> studies.StudySpec:
    return studies.load("q2")


def test_parameter_names_are_namespaced_and_stable(q1: studies.StudySpec, q2: studies.StudySpec) -> None:
    # Names are database keys of live studies: this list changes only with a new study name.
    assert [p.name for p in q1.space] == [
        "model.family", "optim.lr", "mlp.dropout", "cnn.width", "cnn.factorized", "reg.kind",
        "reg.rate", "dropblock.size"]
    assert [p.name for p in q2.space] == ["kd.alpha", "kd.temperature"]


def test_q1_conditions(q1: studies.StudySpec) -> None:
    by = {p.name: p for p in q1.space}
    assert dict(by["dropblock.size"].when) == {"model.family": ["cnn"], "reg.kind": ["dropblock"]}
    assert "none" not in by["reg.rate"].when["reg.kind"]
    assert set(by["reg.kind"].choices) == {"none", "dropout", "spatial_dropout", "dropblock"}
    assert by["model.family"].choices == ["mlp", "cnn"]


def test_q2_space_is_the_assignments(q2: studies.StudySpec) -> None:
    alpha, temperature = q2.space
    assert (alpha.low, alpha.high, temperature.low, temperature.high) == (0.0, 1.0, 1.0, 20.0)


@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_q1_space_holds_only_widths_that_meet_the_budget(q1: studies.StudySpec, preset: str) -> None:
    candidates = next(p for p in q1.space if p.name == "cnn.width").choices
    kept = next(p for p in q1.space_for(preset) if p.name == "cnn.width").choices
    config = q1.preset(preset).config
    in_shape, classes = ((1, 28, 28), 10) if config.data.dataset == "fashion-mnist" else ((3, 32, 32), 10)
    assert kept, "no width left"
    for width in candidates:
        ok = all(budget.feasible(dataclasses.replace(config.model, width=width, factorized=f),
                                 in_shape, classes) for f in (False, True))
        assert (width in kept) == ok, width
    if preset == "paper":
        assert set(kept) < set(candidates)  # the narrowing really removes widths here


def test_q2_prunes_only_the_setting_its_table_was_recorded_on() -> None:
    # studies/q2.py: CurvePruner where benchmarks/curves/q2.json was recorded (the smoke preset
    # as it is), NopPruner on every other setting.
    from kdsweep.service.pruners import CurvePruner

    study = studies.load("q2")
    smoke = study.pruner(study.base_config("smoke"))
    assert isinstance(smoke, CurvePruner)
    assert (smoke.max_epochs, smoke.margin, smoke.min_epoch, smoke.confidence, smoke.slope_weight) == (3, 0.005, 2, 0.8, 0.5)
    for other in (study.base_config("smoke", {"epochs": 4}), study.base_config("smoke", {"data.train_subset": 500}),
                  study.preset("paper").config):
        assert isinstance(study.pruner(other), optuna.pruners.NopPruner)


def test_q1_forecasts_from_its_prior_only_at_the_setting_its_curves_were_recorded_on() -> None:
    # studies/q1.py: ForecastPruner with the recorded curves as its prior at their setting;
    # CurvePruner (the study's own curves) on every preset as it is, the smoke preset's chosen on
    # its own recorded curves.
    from benchmarks.pruning import HOLDOUT, TABLE, load
    from kdsweep.service import priors
    from kdsweep.service.pruners import CurvePruner, ForecastPruner

    study = studies.load("q1")
    meta = load(HOLDOUT[TABLE.name][0])[0]  # the setting of the recorded curves, from the table itself
    recorded = study.base_config(meta["preset"], meta["overrides"])
    forecast = study.pruner(recorded)
    assert isinstance(forecast, ForecastPruner)
    assert forecast.max_epochs == recorded.epochs == 9 and len(forecast.prior) == len(priors.Q1) > 0
    for preset in study.presets:
        config = study.preset(preset).config
        pruner = study.pruner(config)
        assert isinstance(pruner, CurvePruner)
        assert pruner.max_epochs == config.epochs and 1 <= pruner.min_epoch < config.epochs
    # The smoke preset's own, chosen on its recorded curves (benchmarks/curves/q1_smoke.json).
    smoke = study.pruner(study.preset("smoke").config)
    assert (smoke.min_epoch, smoke.confidence, smoke.slope_weight) == (2, 0.8, 0.5)
    assert isinstance(study.pruner(study.base_config(meta["preset"], {**meta["overrides"], "epochs": 8})), CurvePruner)


def test_sampler_is_seeded_tpe(q2: studies.StudySpec) -> None:
    a, b = q2.sampler(7), q2.sampler(7)
    assert isinstance(a, optuna.samplers.TPESampler)
    s1 = optuna.create_study(sampler=a)
    s2 = optuna.create_study(sampler=b)
    assert s1.ask().suggest_float("x", 0, 1) == s2.ask().suggest_float("x", 0, 1)


def test_definition_records_space_preset_data_and_version(q2: studies.StudySpec) -> None:
    d = q2.definition("smoke", {"epochs": 2})
    assert d["study"] == "q2" and d["preset"] == "smoke" and d["overrides"] == {"epochs": 2}
    assert d["kdsweep_version"] == kdsweep.__version__
    assert set(d["space"]) == {"kd.alpha", "kd.temperature"}
    assert d["config"]["data"]["dataset"] == "fashion-mnist" and d["config"]["epochs"] == 2
    for runtime in ("device", "threads", "cache_dir", "precision"):
        assert runtime not in d["config"]
    assert "root" not in d["config"]["data"]


@pytest.mark.parametrize("overrides, message", [
    ({"kd.alpha": 0.5}, "is sampled"),
    ({"device": "cpu"}, "per-host"),
    ({"data.root": "/x"}, "per-host"),
    ({"precision": "bf16"}, "KDSWEEP_PRECISION=fp32 or bf16 where the workers run"),
    ({"nope": 1}, "unknown setting"),
    ({"epochs": 0}, "at least 1"),
])
def test_bad_overrides_are_refused(q2: studies.StudySpec, overrides: dict, message: str) -> None:
    with pytest.raises(StudyError, match=message):
        q2.check_overrides("smoke", overrides)


def test_parse_overrides() -> None:
    assert studies.parse_overrides(["epochs=2", "data.val_size = 300", "kd.cache_logits=false"]) == {
        "epochs": 2, "data.val_size": 300, "kd.cache_logits": False}
    with pytest.raises(StudyError, match="KEY=VALUE"):
        studies.parse_overrides(["epochs"])


def test_load_by_path_unknown_and_broken(tmp_path: Path) -> None:
    source = Path(studies.load("q2").source).read_text()
    mine = tmp_path / "mine.py"
    mine.write_text(source.replace('name="q2"', 'name="mine"'))
    assert studies.load(str(mine)).name == "mine"
    with pytest.raises(StudyError, match="unknown study 'nope'; available: .*q1.*q2"):
        studies.load("nope")
    broken = tmp_path / "broken.py"
    broken.write_text("import nothing_here\n")
    with pytest.raises(StudyError, match="failed to load: ModuleNotFoundError"):
        studies.load(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(StudyError, match="must define STUDY"):
        studies.load(str(empty))
    with pytest.raises(StudyError, match="no preset 'nope'; choose one of: paper, smoke"):
        studies.load("q2").preset("nope")
