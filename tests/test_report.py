"""`kdsweep report`: figures chosen from the params present, each holding the study's data.

Studies are built with Optuna's ask/tell and known values (no training), so every number a
figure should hold is known in advance.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from PIL import Image

from kdsweep import cli
from kdsweep.service import report
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep

Q1_TRIALS = [  # params, curve (val_acc per epoch), pruned
    ({"model.family": "mlp", "optim.lr": 0.05}, [0.50, 0.60, 0.62], False),
    ({"model.family": "mlp", "optim.lr": 0.20}, [0.40, 0.45, 0.50], False),
    ({"model.family": "cnn", "optim.lr": 0.10, "reg.kind": "none"}, [0.55, 0.66, 0.70], False),
    ({"model.family": "cnn", "optim.lr": 0.08, "reg.kind": "dropblock", "dropblock.size": 3}, [0.52, 0.68, 0.74], False),
    ({"model.family": "cnn", "optim.lr": 0.03, "reg.kind": "dropblock", "dropblock.size": 5}, [0.50, 0.64, 0.72], False),
    ({"model.family": "cnn", "optim.lr": 0.30, "reg.kind": "dropblock", "dropblock.size": 5}, [0.20], True),
    ({"model.family": "cnn", "optim.lr": 0.02, "reg.kind": "dropout"}, [0.45, 0.61, 0.69], False),
]
Q1_DIST = {
    "model.family": optuna.distributions.CategoricalDistribution(["mlp", "cnn"]),
    "optim.lr": optuna.distributions.FloatDistribution(0.01, 0.4, log=True),
    "reg.kind": optuna.distributions.CategoricalDistribution(["none", "dropout", "spatial_dropout", "dropblock"]),
    "dropblock.size": optuna.distributions.CategoricalDistribution([3, 5, 7]),
}


def _study(name: str, rows: list, dists: dict, storage: object = None) -> optuna.Study:
    study = optuna.create_study(study_name=name, direction="maximize", storage=storage)
    study.set_user_attr("kdsweep.definition", {"study": name, "preset": "smoke", "metric": "val_acc",
                                                "config": {"model": {"budget": 30000}}})
    for params, curve, pruned in rows:
        study.add_trial(optuna.create_trial(
            params=params, distributions={k: dists[k] for k in params},
            intermediate_values=dict(enumerate(curve, 1)),
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            value=None if pruned else curve[-1], user_attrs={"epochs_run": len(curve)},
        ))
    return study


@pytest.fixture
def q1() -> optuna.Study:
    return _study("q1", Q1_TRIALS, Q1_DIST)


@pytest.fixture
def q2() -> optuna.Study:
    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
             "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
    rows = [({"kd.alpha": a, "kd.temperature": t}, [0.5, 0.6 + a / 10 - abs(t - 6) / 100], False)
            for a, t in [(0.1, 2), (0.5, 4), (0.9, 8), (0.3, 15), (0.7, 12), (0.2, 6)]]
    rows.append(({"kd.alpha": 0.95, "kd.temperature": 19}, [0.1], True))
    return _study("q2", rows, dists)


def test_figures_follow_the_params_present(q1: optuna.Study, q2: optuna.Study) -> None:
    assert report.applicable(q1) == ["history", "intermediate", "importance", "family", "dropblock", "parallel",
                                     "slice"]
    assert report.applicable(q2) == ["history", "intermediate", "importance", "kd_contour", "parallel", "slice"]


def test_q1_figure_data(q1: optuna.Study) -> None:
    data = report.figure_data(q1)
    assert data["history"]["value"] == [0.62, 0.50, 0.70, 0.74, 0.72, 0.69]
    assert data["history"]["best"] == [0.62, 0.62, 0.70, 0.74, 0.74, 0.74]
    pruned = [t for t in data["intermediate"]["trials"] if t["pruned"]]
    assert [(t["trial"], t["step"], t["value"]) for t in pruned] == [(5, [1], [0.20])]
    assert len(data["intermediate"]["trials"]) == 7
    groups = data["family"]["groups"]
    assert list(groups) == ["mlp", "cnn/dropblock", "cnn/dropout", "cnn/none"]
    assert groups["mlp"] == [0.62, 0.50] and groups["cnn/dropblock"] == [0.74, 0.72]
    assert data["family"]["budget"] == 30000
    assert data["dropblock"]["sizes"] == {3: [0.74], 5: [0.72]}  # the pruned block-5 trial is left out
    assert data["family"]["pruned"] == {"cnn/dropblock": 1} and data["dropblock"]["pruned"] == {5: 1}
    assert set(data["importance"]) == {"model.family", "optim.lr", "reg.kind", "dropblock.size"}
    assert sum(data["importance"].values()) == pytest.approx(1.0)


def test_q2_contour_holds_every_complete_trial(q2: optuna.Study) -> None:
    d = report.figure_data(q2)["kd_contour"]
    assert d["alpha"] == [0.1, 0.5, 0.9, 0.3, 0.7, 0.2]
    assert d["temperature"] == [2, 4, 8, 15, 12, 6]
    assert d["bounds"] == {"kd.alpha": [0, 1], "kd.temperature": [1, 20]}
    fig = report.plotly_figure(q2, "kd_contour", d)
    xs = sorted(x for tr in fig.data if tr.type == "scatter" and tr.x is not None
                and not (tr.name or "").startswith(("pruned", "alpha=0")) for x in tr.x)
    assert xs == sorted(d["alpha"])  # Optuna's contour plots every complete trial (pruned ones: apart)


def test_plotly_figures_mark_pruned_trials_and_groups(q1: optuna.Study) -> None:
    data = report.figure_data(q1)
    inter = report.plotly_figure(q1, "intermediate", data["intermediate"])
    pruned = [tr for tr in inter.data if "pruned" in tr.name]
    assert [tr.name for tr in pruned] == ["trial 5 (pruned)"] and pruned[0].marker.symbol[-1] == "x"
    fam = report.plotly_figure(q1, "family", data["family"])
    assert {tr.name: list(tr.y) for tr in fam.data} == data["family"]["groups"]
    assert "30,000 parameters" in fam.layout.title.text
    hist = report.plotly_figure(q1, "history", data["history"])
    assert sorted(hist.data[0].y) == sorted(data["history"]["value"])


def test_write_report_files(q2: optuna.Study, tmp_path: Path) -> None:
    files = report.write_report(Sweep(q2), tmp_path / "r")
    out = tmp_path / "r"
    for name in ("history", "intermediate", "importance", "kd_contour"):
        assert files[name] == [f"{name}.html", f"{name}.png"]
        assert "plotly" in (out / f"{name}.html").read_text()[:2000].lower()
        with Image.open(out / f"{name}.png") as im:
            im.verify()
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (800, 500)
    assert (out / "plotly.min.js").stat().st_size > 100_000  # offline: no CDN
    summary = (out / "summary.md").read_text()
    best = max(q2.trials, key=lambda t: t.value or 0)
    assert f"| 1 | {best.number} | {best.value:.4f} |" in summary
    assert json.loads((out / "data.json").read_text())["kd_contour"]["trial"] == [0, 1, 2, 3, 4, 5]


def test_report_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    _study("q1", Q1_TRIALS, Q1_DIST, storage=open_storage(url, heartbeat=False))
    result = CliRunner().invoke(cli.main, ["report", "q1", "--storage", url, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "family.png" in result.output and (tmp_path / "out" / "family.png").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| cnn/dropblock | 2 | 0.7300 | 0.7400 | 1 |" in summary and "| 5 | 1 | 0.7200 | 0.7200 | 1 |" in summary
    missing = CliRunner().invoke(cli.main, ["report", "nope", "--storage", url, "-o", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "no study named 'nope'" in missing.output


def test_report_of_an_empty_study_is_one_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/e.db"
    optuna.create_study(study_name="empty", storage=open_storage(url, heartbeat=False))
    result = CliRunner().invoke(cli.main, ["report", "empty", "--storage", url, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no finished trial" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_report_of_one_complete_and_one_pruned_trial(tmp_path: Path) -> None:
    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
             "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
    study = _study("q2", [({"kd.alpha": 0.5, "kd.temperature": 3.0}, [0.6, 0.7], False),
                          ({"kd.alpha": 0.9, "kd.temperature": 3.0}, [0.2], True)], dists)
    files = report.write_report(Sweep(study), tmp_path)  # too few trials for importances: still a report
    assert set(files) == {"history", "intermediate", "importance", "kd_contour", "parallel", "slice"}
    assert report.figure_data(study)["importance"] == {}
    assert all((tmp_path / f"{name}.png").exists() for name in files)


def test_the_summary_counts_requeued_attempts_apart_from_failures(tmp_path: Path) -> None:
    from kdsweep.service import keys

    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0, 1),
             "kd.temperature": optuna.distributions.FloatDistribution(1, 20)}
    study = _study("q2", [({"kd.alpha": 0.5, "kd.temperature": 3.0}, [0.6, 0.7], False)], dists)
    point = {"kd.alpha": 0.1, "kd.temperature": 2.0}
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL, params=point, distributions=dists,
                                        user_attrs={keys.REQUEUED: "worker died (no heartbeat)"}))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL, params=point, distributions=dists,
                                        user_attrs={keys.FAIL_REASON: "RuntimeError: boom"}))
    report.write_report(Sweep(study), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "complete 1, failed 1, requeued 1." in summary


def test_family_figures_keep_a_group_whose_every_trial_was_pruned() -> None:
    """A regulariser whose every trial the pruner stopped is a finding, not a missing group."""
    rows = Q1_TRIALS + [({"model.family": "cnn", "optim.lr": 0.35, "reg.kind": "spatial_dropout"}, [0.1], True)]
    study = _study("q1", rows, Q1_DIST)
    data = report.figure_data(study)["family"]
    fig = report.plotly_figure(study, "family", data)
    assert [tr.name for tr in fig.data][-1] == "cnn/spatial_dropout"
    png = report.png_figure(study, "family", data)
    labels = [t.get_text() for t in png.axes[0].get_xticklabels()]
    assert "cnn/spatial_dropout\n(n=0, +1 pruned)" in labels, labels


def test_history_shows_pruned_trials_and_marks_the_winner(q1: optuna.Study) -> None:
    data = report.figure_data(q1)["history"]
    assert (data["pruned_trial"], data["pruned_value"]) == ([5], [0.20])  # at its last epoch
    assert data["winner"] == {"trial": 3, "value": 0.74}


def test_the_top_table_states_constant_columns_once() -> None:
    dists = {"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.4, log=True)}
    study = optuna.create_study(direction="maximize")
    for lr, v in [(0.05, 0.6), (0.1, 0.7)]:
        study.add_trial(optuna.create_trial(params={"optim.lr": lr}, distributions=dists, value=v,
                                            user_attrs={"epochs_run": 3, "params": 1000, "flops": 2e6}))
    table = report.top_table(study)
    assert table.splitlines()[0] == "| rank | trial | value | optim.lr |"
    assert table.rstrip().endswith("Every row: epochs 3, params 1,000, MFLOPs/image 2.00.")


def _legend(ax) -> list[str]:  # noqa: ANN001
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_kd_contour_shows_pruned_trials_and_the_alpha_0_reference(q2: optuna.Study) -> None:
    d = report.figure_data(q2)["kd_contour"]
    assert d["pruned"] == {"alpha": [0.95], "temperature": [19], "value": [0.1], "trial": [6]}
    assert d["reference"] is None  # write_report fills it in from the .baseline sibling
    d["reference"] = 0.6123
    fig = report.plotly_figure(q2, "kd_contour", d)
    named = {tr.name: tr for tr in fig.data if tr.name}
    assert list(named["pruned (1)"].x) == [0.95] and named["pruned (1)"].marker.symbol == "x"
    ref = named["alpha=0 reference (student alone): 0.6123"]
    assert list(ref.x) == [0.0, 0.0] and list(ref.y) == [1, 20]  # across the searched T
    png = report.png_figure(q2, "kd_contour", d)
    ax = png.axes[0]
    assert _legend(ax) == ["complete (6)", "pruned (1)", "alpha=0 reference (student alone): 0.6123"]
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [0.0]
    points = [[list(map(float, p)) for p in c.get_offsets()] for c in ax.collections]
    assert [[0.95, 19.0]] in points  # the pruned trial, apart from the 6 complete ones
    d["reference"] = None
    assert "alpha=0 reference: not run yet" in _legend(report.png_figure(q2, "kd_contour", d).axes[0])


def test_the_report_takes_the_contour_reference_from_the_baseline_sibling(
        q2: optuna.Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.service import baseline

    ref = optuna.trial.create_trial(value=0.577, params={}, distributions={})
    monkeypatch.setattr(baseline, "find", lambda sweep: object())
    monkeypatch.setattr(baseline, "result", lambda sweep: ref)
    report.write_report(Sweep(q2), tmp_path / "r")
    data = json.loads((tmp_path / "r" / "data.json").read_text())
    assert data["kd_contour"]["reference"] == 0.577 and data["history"]["reference"] == 0.577


def test_accuracy_against_flops_has_one_series_per_family_with_binomial_errors() -> None:
    study = optuna.create_study(study_name="q1", direction="maximize")
    flops = [2.0e5, 2.1e5, 3.0e6, 2.5e6, 4.0e6, 1.0e6, 3.5e6]  # MLPs cost less per image than CNNs
    for i, ((params, curve, pruned), f) in enumerate(zip(Q1_TRIALS, flops, strict=True)):
        attrs = {"epochs_run": len(curve), "flops": f, **({"val_n": 1000} if i == 0 else {})}  # else val_size
        study.add_trial(optuna.create_trial(
            params=params, distributions={k: Q1_DIST[k] for k in params},
            intermediate_values=dict(enumerate(curve, 1)), user_attrs=attrs,
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            value=None if pruned else curve[-1]))
    study.set_user_attr("kdsweep.definition", {"study": "q1", "metric": "val_acc",
                                                "config": {"model": {"budget": 30000}, "data": {"val_size": 500}}})
    assert "flops" in report.applicable(study)
    d = report.figure_data(study)["flops"]
    assert list(d["series"]) == ["mlp", "cnn"]  # the pruned CNN is left out: it has no final value
    assert d["series"]["mlp"]["flops"] == [2.0e5, 2.1e5] and d["series"]["cnn"]["trial"] == [2, 3, 4, 6]
    assert d["series"]["mlp"]["se"] == pytest.approx([(0.62 * 0.38 / 1000) ** 0.5, (0.5 * 0.5 / 500) ** 0.5])
    assert d["winner"] == {"trial": 3, "family": "cnn", "flops": 2.5e6, "value": 0.74}
    fig = report.plotly_figure(study, "flops", d)
    assert [tr.name for tr in fig.data] == ["mlp", "cnn", "winner (trial 3, cnn)"]
    assert list(fig.data[0].error_y.array) == pytest.approx(d["series"]["mlp"]["se"])
    assert fig.layout.xaxis.type == "log"
    ax = report.png_figure(study, "flops", d).axes[0]
    assert ax.get_xscale() == "log"
    assert sorted(_legend(ax)) == ["cnn (n=4)", "mlp (n=2)", "winner (trial 3, cnn)"]
    assert len(ax.containers) == 2  # one error-bar series per family
    # A study whose trials hold no FLOPs (older ones) has no such figure.
    assert "flops" not in report.applicable(_study("q1", Q1_TRIALS, Q1_DIST))
