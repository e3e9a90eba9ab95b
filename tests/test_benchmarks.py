"""The benchmark suite's plumbing: a quick entry writes JSON with the required fields, a GPU
entry on a CPU is skipped with a reason, and the Markdown page says GPU figures are missing.
Timings are not asserted: they depend on the machine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

# benchmarks/ is a top-level package of the repository, not of the installed kdsweep.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import ENTRIES, main  # noqa: E402
from benchmarks.pruning import epochs_to  # noqa: E402

REQUIRED = ("name", "value", "unit", "baseline", "ratio", "goal", "device")
ISSUE_ENTRIES = ("core_vs_reference", "q2_vs_plain_ce", "teacher_setups", "pruning_epoch_savings",
                 "worker_scaling", "storage_overhead_ms")


def test_every_entry_of_the_issue_is_registered() -> None:
    assert set(ISSUE_ENTRIES) <= set(ENTRIES)


@pytest.mark.slow
def test_quick_core_entry_writes_json_and_markdown(tmp_path: Path, fmnist_dir: Path) -> None:
    out, md = tmp_path / "r.json", tmp_path / "b.md"
    result = CliRunner().invoke(main, [
        "--quick", "--only", "core_vs_reference", "--only", "gpu_resnet50_teacher_224px",
        "--output", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["quick"] is True
    core, gpu = data["entries"]
    for key in REQUIRED:
        assert key in core
    assert core["name"] == "core_vs_reference" and core["device"] == "cpu"
    assert core["value"] > 0 and core["baseline"] > 0
    assert math.isclose(core["ratio"], core["details"]["kdsweep_images_per_s"][0]
                        / core["details"]["reference_images_per_s"][0])
    assert core["met"] == (core["ratio"] >= 1.0)
    if not torch.cuda.is_available():
        assert "CUDA" in gpu["skipped"]
        assert "GPU figures are not yet measured" in md.read_text()
    assert "core_vs_reference" in result.output  # the printed table


def test_only_replaces_its_entries_in_the_results_file_and_keeps_the_others(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.common import Entry

    def fake(name: str, value: float):
        return lambda device, quick: Entry(name=name, value=value, unit="s", baseline=1.0, ratio=1.0,
                                           goal="-", device=device)

    a, b = "cli_startup_s", "trial_dead_time"
    monkeypatch.setitem(ENTRIES, a, (fake(a, 2.0), 1))
    monkeypatch.setitem(ENTRIES, b, (fake(b, 3.0), 1))
    out = tmp_path / "r.json"
    stored = [{"name": b, "value": 1.0}, {"name": "x", "value": 7.0, "details": {"kept": True}}]
    out.write_text(json.dumps({"machine": {}, "entries": stored}))
    result = CliRunner().invoke(main, ["--only", a, "--only", b, "--output", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())["entries"]
    assert [(e["name"], e["value"]) for e in entries] == [(b, 3.0), ("x", 7.0), (a, 2.0)]
    assert entries[1] == stored[1]
    out.write_text("not json")
    result = CliRunner().invoke(main, ["--only", a, "--output", str(out)])
    assert result.exit_code == 1 and "is not a results file" in result.output and out.read_text() == "not json"


def test_epochs_to_target_counts_pruned_epochs_and_ignores_pruned_values() -> None:
    trials = [(9, 0.80), (1, None), (3, None), (9, 0.86), (9, 0.90)]
    assert epochs_to(trials, 0.85) == 9 + 1 + 3 + 9
    assert epochs_to(trials, 0.95) is None


@pytest.mark.slow
def test_replay_equals_a_real_pruned_run(tmp_path: Path, fmnist_dir: Path) -> None:
    """The replay behind pruning_epoch_savings is what a real sweep through the objective does."""
    from benchmarks.pruning import real_vs_replay

    out = real_vs_replay(tmp_path)
    assert any(v is None for _, v in out["real"]), out  # the pruner stopped something
    assert out["replayed"] == out["real"], out


def test_a_miss_is_charged_as_a_loss_and_the_oracle_is_a_ceiling() -> None:
    from benchmarks.pruning import oracle, score

    curves = [[0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.3, 0.6, 0.9]]
    miss = score(curves, [(3, 0.7), (1, None), (1, None)])  # the 0.9 trial was pruned
    assert miss.e_none == 9 and miss.e_pruned is None and miss.charged == 5 + 9 and miss.ratio < 1
    hit = score(curves, [(3, 0.7), (1, None), (3, 0.9)])
    assert hit.e_pruned == 7 and math.isclose(hit.ratio, 9 / 7)
    assert oracle(curves, 1).e_pruned == 1 + 1 + 3


@pytest.mark.slow
def test_curve_recording_resumes_and_refuses_another_draw(tmp_path: Path, fmnist_dir: Path) -> None:
    from benchmarks import curves

    study = str(Path(__file__).parent / "studies" / "tiny.py")
    out = tmp_path / "t.json"
    args = ["--study", study, "--preset", "quick", "--n", "2", "--out", str(out)]
    first = CliRunner().invoke(curves.main, [*args, "--limit", "1"])
    assert first.exit_code == 0, first.output
    assert [c["id"] for c in json.loads(out.read_text())["configs"]] == [0]
    again = CliRunner().invoke(curves.main, args)  # an interrupted recording goes on where it was
    assert again.exit_code == 0, again.output
    table = json.loads(out.read_text())
    assert [c["id"] for c in table["configs"]] == [0, 1]
    assert all(len(c["curve"]) == 2 and not c["diverged"] for c in table["configs"])
    assert table["configs"][0]["params"] != table["configs"][1]["params"]
    other = CliRunner().invoke(curves.main, [*args, "--seed", "1"])
    assert other.exit_code == 2 and "another study definition or seed" in other.output
    assert [c["id"] for c in json.loads(out.read_text())["configs"]] == [0, 1]  # nothing changed


def test_racing_replay_judges_on_held_out_seeds_and_counts_runs() -> None:
    import random

    from benchmarks import racing

    seeds = list(range(12))
    # Config 1 is far ahead on every seed; 2 and 3 are tied far behind: the race settles both
    # at its first look (3 seeds) and spends 3 x 3 runs where the grid spends 3 x 8.
    values = {1: {s: 0.9 + 0.001 * (s % 3) for s in seeds}, 2: {s: 0.5 + 0.002 * (s % 2) for s in seeds},
              3: {s: 0.5 + 0.001 * (s % 4) for s in seeds}}
    out = racing.replay(values, seeds, [1, 2, 3], 50, random.Random(0))
    assert out["grid_runs"] == 24 and out["race_runs_mean"] == 9 and out["runs_ratio"] == 0.375
    assert out["grid_picks_held_out_best"] == out["race_picks_held_out_best"] == 1.0
    assert out["race_agrees_with_grid"] == 1.0 and out["held_out_seeds"] == 4


def test_a_tables_trials_carry_the_space_it_was_recorded_on() -> None:
    # q1's smoke preset narrowed the learning rate to 0.01-0.2 after q1.json was recorded on
    # 0.01-0.4: its configurations must be replayed (and stored) in the recorded distributions.
    import optuna

    from benchmarks.pruning import TABLE, distributions, load, recorded_space

    meta, configs = load(TABLE)
    dists = distributions(recorded_space(meta))
    for c in configs:
        optuna.trial.create_trial(params=c["params"], distributions={k: dists[k] for k in c["params"]}, value=0.5)
    assert max(c["params"]["optim.lr"] for c in configs) > 0.2


def test_the_shipped_q1_prior_is_every_tuning_curve_and_no_held_out_one() -> None:
    # ForecastPruner's prior is fitted on tuning curves only: a table that was once held out and
    # joined the tuning set must be in it (regenerated by `python -m benchmarks.curves_prior`),
    # and the tables now held out must not.
    from benchmarks.pruning import ALSO_TUNING, HOLDOUT, TABLE, halves, load, prior_of
    from kdsweep.service import priors

    meta, tune, _, held, _ = halves(TABLE)
    assert not set(HOLDOUT[TABLE.name]) & set(ALSO_TUNING[TABLE.name])
    assert priors.Q1 == prior_of(tune, meta["epochs"])
    shipped = {tuple(p["curve"]) for p in priors.Q1}
    assert not shipped & {tuple(c["curve"]) for c in held}
    assert len(tune) == sum(len(load(t)[1]) for t in (TABLE, *ALSO_TUNING[TABLE.name]))
    assert len(held) == sum(len(load(t)[1]) for t in HOLDOUT[TABLE.name])


def test_a_held_out_table_still_being_recorded_is_refused(tmp_path, monkeypatch) -> None:
    # benchmarks.curves merges each configuration into its table as it finishes: a run scored on a
    # table half recorded would quote figures of a held-out set that is not the one it names.
    from benchmarks import pruning

    meta, configs = pruning.load(pruning.TABLE)
    for c in configs:
        del c["replay"]
    held = tmp_path / "held.json"
    held.write_text(json.dumps({"meta": {**meta, "n": 8}, "configs": configs[:5]}))
    monkeypatch.setitem(pruning.HOLDOUT, pruning.TABLE.name, (held,))
    monkeypatch.setitem(pruning.ALSO_TUNING, pruning.TABLE.name, ())
    with pytest.raises(ValueError, match="holds 5 of its 8 configurations"):
        pruning.halves(pruning.TABLE)
    held.write_text(json.dumps({"meta": {**meta, "n": 5}, "configs": configs[:5]}))
    assert len(pruning.halves(pruning.TABLE)[3]) == 5
