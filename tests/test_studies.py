"""Study files, their definitions, the q1 budget narrowing, and exact trial slots (no training)."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from pgcluster import machine_database

import kdsweep
from kdsweep.core import budget
from kdsweep.service import spec as studies
from kdsweep.service.objective import INFEASIBLE
from kdsweep.service.spec import StudyError
from kdsweep.service.storage import open_storage
from kdsweep.service.worker import (
    DEFINITION,
    WINDOW,
    check_definition,
    counted,
    counts,
    create_or_resume,
    pop_slot,
    top_up,
)


@pytest.fixture(scope="module")
def q1() -> studies.Study:
    return studies.load("q1")


@pytest.fixture(scope="module")
def q2() -> studies.Study:
    return studies.load("q2")


@pytest.fixture()
def storage(tmp_path: Path):
    return open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=False)


def test_parameter_names_are_namespaced_and_stable(q1: studies.Study, q2: studies.Study) -> None:
    # Names are database keys of live studies: this list changes only with a new study name.
    assert [p.name for p in q1.space] == [
        "model.family", "optim.lr", "mlp.dropout", "cnn.width", "cnn.factorized", "reg.kind",
        "reg.rate", "dropblock.size"]
    assert [p.name for p in q2.space] == ["kd.alpha", "kd.temperature"]


def test_q1_conditions(q1: studies.Study) -> None:
    by = {p.name: p for p in q1.space}
    assert dict(by["dropblock.size"].when) == {"model.family": ["cnn"], "reg.kind": ["dropblock"]}
    assert "none" not in by["reg.rate"].when["reg.kind"]
    assert set(by["reg.kind"].choices) == {"none", "dropout", "spatial_dropout", "dropblock"}
    assert by["model.family"].choices == ["mlp", "cnn"]


def test_q2_space_is_the_assignments(q2: studies.Study) -> None:
    alpha, temperature = q2.space
    assert (alpha.low, alpha.high, temperature.low, temperature.high) == (0.0, 1.0, 1.0, 20.0)


@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_q1_space_holds_only_widths_that_meet_the_budget(q1: studies.Study, preset: str) -> None:
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


@pytest.mark.parametrize("name", ["q2"])
def test_pruner_is_hyperband_over_the_epochs(name: str) -> None:
    study = studies.load(name)
    for preset in study.presets:
        config = study.preset(preset).config
        pruner = study.pruner(config)
        assert isinstance(pruner, optuna.pruners.HyperbandPruner)
        assert pruner._max_resource == config.epochs and pruner._min_resource == 1


def test_q1_pruner_is_the_curve_pruner_over_the_epochs() -> None:
    from kdsweep.service.pruners import CurvePruner

    study = studies.load("q1")
    for preset in study.presets:
        config = study.preset(preset).config
        pruner = study.pruner(config)
        assert isinstance(pruner, CurvePruner)
        assert pruner.max_epochs == config.epochs and 1 <= pruner.min_epoch < config.epochs


def test_sampler_is_seeded_tpe(q2: studies.Study) -> None:
    a, b = q2.sampler(7), q2.sampler(7)
    assert isinstance(a, optuna.samplers.TPESampler)
    s1 = optuna.create_study(sampler=a)
    s2 = optuna.create_study(sampler=b)
    assert s1.ask().suggest_float("x", 0, 1) == s2.ask().suggest_float("x", 0, 1)


def test_definition_records_space_preset_data_and_version(q2: studies.Study) -> None:
    d = q2.definition("smoke", {"epochs": 2})
    assert d["study"] == "q2" and d["preset"] == "smoke" and d["overrides"] == {"epochs": 2}
    assert d["kdsweep_version"] == kdsweep.__version__
    assert set(d["space"]) == {"kd.alpha", "kd.temperature"}
    assert d["config"]["data"]["dataset"] == "fashion-mnist" and d["config"]["epochs"] == 2
    for runtime in ("device", "threads", "cache_dir"):
        assert runtime not in d["config"]
    assert "root" not in d["config"]["data"]


@pytest.mark.parametrize("overrides, message", [
    ({"kd.alpha": 0.5}, "is sampled"),
    ({"device": "cpu"}, "per-host"),
    ({"data.root": "/x"}, "per-host"),
    ({"nope": 1}, "unknown setting"),
    ({"epochs": 0}, "at least 1"),
])
def test_bad_overrides_are_refused(q2: studies.Study, overrides: dict, message: str) -> None:
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


def test_create_sets_n_and_makes_slots_a_few_at_a_time(q2: studies.Study, storage) -> None:
    study = create_or_resume(q2, "smoke", storage, "kd", 6, seed=1, overrides={"epochs": 2})
    assert study.user_attrs[DEFINITION] == q2.definition("smoke", {"epochs": 2})
    c = counts(study)
    assert (c.waiting, c.unmade, len(study.get_trials())) == (6, 6, 0)  # workers make the slots
    assert top_up(study) == WINDOW and top_up(study) == 0  # a few at a time
    c = counts(study)
    assert (c.waiting, c.unmade, len(study.get_trials())) == (6, 6 - WINDOW, WINDOW)
    create_or_resume(q2, "smoke", storage, "kd", 6, overrides={"epochs": 2})
    assert len(study.get_trials()) == WINDOW and counts(study).waiting == 6  # resumed, nothing added
    create_or_resume(q2, "smoke", storage, "kd", 9, overrides={"epochs": 2})
    assert counts(study).waiting == 9  # a larger N: the study runs more


def test_slots_are_made_as_trials_start_and_a_failure_is_replaced(q2: studies.Study, storage) -> None:
    study = create_or_resume(q2, "smoke", storage, "kd", 6, max_failures=1)
    numbers = []
    while (trial_id := pop_slot(study)) is not None or (top_up(study) and (trial_id := pop_slot(study))):
        number = study._storage.get_trial(trial_id).number
        numbers.append(number)
        # trial 1 fails twice over (it and its replacement), beyond max_failures=1
        trial = optuna.Trial(study, trial_id)
        if number in (1, 6):
            trial.set_user_attr("fail_reason", "RuntimeError: boom")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, 0.5)
        assert len(study.get_trials(states=(TrialState.WAITING,))) <= WINDOW
    c = counts(study)
    # 6 slots, 2 failed: the first is replaced, the second is over the limit and is not.
    assert (c.complete, c.failed, c.waiting, c.running) == (5, 2, 0, 0)
    assert numbers == list(range(7))


TOP_UP_WORKER = """
import sys, optuna
from kdsweep.service.storage import open_storage
from kdsweep.service.worker import pop_slot, top_up
study = optuna.load_study(study_name="race", storage=open_storage(sys.argv[1], heartbeat=False))
while (tid := pop_slot(study)) is not None or (top_up(study) and (tid := pop_slot(study))):
    study.tell(optuna.Trial(study, tid), 1.0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_on_one_database_never_make_more_than_n(q2: studies.Study, tmp_path: Path, backend: str) -> None:
    # Four processes race to make and take slots; the study lock keeps them to exactly N.
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite"
               else stack.enter_context(machine_database()))
        create_or_resume(q2, "smoke", open_storage(url, heartbeat=False), "race", 40)
        procs = [subprocess.Popen([sys.executable, "-c", TOP_UP_WORKER, url]) for _ in range(4)]
        assert [p.wait(timeout=300) for p in procs] == [0] * 4
        study = optuna.load_study(study_name="race", storage=open_storage(url, heartbeat=False))
        assert len(study.get_trials()) == 40
        assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_a_different_definition_is_refused_and_nothing_changes(q2: studies.Study, storage) -> None:
    study = create_or_resume(q2, "smoke", storage, "kd", 3)
    before = (study.user_attrs, len(study.get_trials()))
    for preset, overrides in (("paper", None), ("smoke", {"epochs": 1})):
        with pytest.raises(StudyError, match="different definition"):
            create_or_resume(q2, preset, storage, "kd", 9, overrides=overrides)
    other = dataclasses.replace(q2, space=[dataclasses.replace(q2.space[0], high=0.5), q2.space[1]])
    with pytest.raises(StudyError, match=r"different definition \(space.kd.alpha.high"):
        check_definition(study, other.definition("smoke"), "kd")
    assert (study.user_attrs, len(study.get_trials())) == before
    optuna.create_study(study_name="foreign", storage=storage)
    with pytest.raises(StudyError, match="not created by kdsweep"):
        create_or_resume(q2, "smoke", storage, "foreign", 3)


def test_infeasible_and_failed_trials_do_not_count(storage) -> None:
    study = optuna.create_study(study_name="c", storage=storage, direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(value=0.5, params={"x": 0.1}, distributions=dist))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"x": 0.2}, distributions=dist,
                                        intermediate_values={1: 0.1}))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"x": 0.3}, distributions=dist,
                                        user_attrs={INFEASIBLE: "too big"}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.4}, distributions=dist))
    c = counts(study)
    assert (c.complete, c.pruned, c.infeasible, c.failed, c.finished) == (1, 1, 1, 1, 2)
    assert [counted(t) for t in study.get_trials()] == [True, True, False, False]


def test_a_checkpoint_of_another_study_with_the_same_name_is_not_resumed(
        q2: studies.Study, tmp_path: Path) -> None:
    from kdsweep.service.objective import UID, Objective

    objective = Objective(q2, "smoke", {}, tmp_path / "artifacts")
    old = optuna.create_study(study_name="q2")
    old.set_user_attr(UID, "old")
    path = objective._checkpoint(old.ask())
    path.write_bytes(b"old study's epoch 2")
    new = optuna.create_study(study_name="q2")
    new.set_user_attr(UID, "new")
    assert objective._checkpoint(new.ask()) == path and not path.exists()  # same path, old file gone
    path.write_bytes(b"new study's epoch 1")
    again = optuna.create_study(study_name="q2")
    again.set_user_attr(UID, "new")
    assert objective._checkpoint(again.ask()) == path and path.exists()  # its own file is kept


@pytest.mark.parametrize(("epochs", "state"), [(2, TrialState.PRUNED), (1, TrialState.COMPLETE)])
def test_the_pruner_is_never_asked_at_the_last_epoch(fmnist_dir: Path, tmp_path: Path, epochs: int,
                                                     state: TrialState) -> None:
    # A pruner that prunes whatever it is asked about: it stops a 2-epoch trial after epoch 1,
    # but a trial that has run its last epoch completes (its value is paid for).
    from kdsweep.service.objective import Objective

    tiny = studies.load(str(Path(__file__).parent / "studies" / "tiny.py"))
    objective = Objective(tiny, "quick", {"device": "cpu", "threads": 1}, tmp_path / "artifacts",
                          overrides={"epochs": epochs})
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == state and sorted(trial.intermediate_values) == [1]
