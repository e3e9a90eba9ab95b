"""End to end: `kdsweep launch` runs 2-worker smoke sweeps of q1 and q2 on real Fashion-MNIST
subsets, into SQLite and into a fresh PostgreSQL database, and the storage holds exactly what the
issue promises: N finished trials (COMPLETE + PRUNED), real pruning after at least one epoch,
intermediate values, no trial left RUNNING, full per-trial attributes, read back by plain
`optuna.load_study`; `kdsweep best` exports a config that `kdsweep train --config` runs.

The smoke presets are shrunk with `--set` (recorded in the study like any override) so the
whole file takes a couple of minutes on 2 cores; q2's teacher trains once, in a cache shared by
the q2 tests.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

import kdsweep
from kdsweep.cli import main
from kdsweep.core.config import TrainConfig, from_dict, to_dict
from kdsweep.service import keys
from kdsweep.service import spec as studies
from kdsweep.service.launch import cpu_cores

pytestmark = pytest.mark.slow

N = 6  # with Hyperband over 4 epochs (rungs at 1 and 3, not the last), 6 trials see some pruned
EPOCHS = 4
SETS = {
    # Small subsets: trials must only differ enough for the pruner to rank them.
    "q1": [f"epochs={EPOCHS}", "data.train_subset=600", "data.val_size=300"],
    # One augmentation view (no shifts, no flips): the teacher's logits are all cached after
    # the first epoch instead of one per shift and flip; a 1-epoch teacher on the student's
    # images is enough here, where only the sweep machinery is under test.
    "q2": [f"epochs={EPOCHS}", "data.train_subset=200", "data.val_size=100", "kd.teacher_epochs=1",
           "kd.teacher_train_subset=200", "data.pad=0", "data.flip=false"],
}
PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One KDSWEEP_CACHE for the q2 sweeps, so their teacher trains once."""
    return tmp_path_factory.mktemp("kdsweep-cache")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name on 127.0.0.1:5432, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432 as user postgres ({str(exc).strip()[:80]}); "
                    "start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) "
                    "to run this test")
    name = f"kdsweep_e2e_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def launch(study: str, url: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    sets = [arg for s in SETS[study] for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "kdsweep", "launch", study, "--preset", "smoke", "--storage", url,
           "--n-trials", str(N), "--workers", "2", "--device", "cpu", "--seed", "0", *sets]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDSWEEP_")}
    env["KDSWEEP_CACHE"] = str(cache)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def lookup(config: dict, path: str) -> object:
    for key in path.split("."):
        config = config[key]
    return config


def check_sweep(study_name: str, url: str, proc: subprocess.CompletedProcess[str],
                artifacts: Path) -> optuna.Study:
    """What the storage must hold after a finished launch; returns the study, read by plain Optuna."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list((artifacts / study_name / "checkpoints").glob("*.pt")), "checkpoints left behind"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"[{N}/{N}] complete" in proc.stdout  # live progress, final line
    assert "trial  value" in proc.stdout  # the summary table

    study = optuna.load_study(study_name=study_name, storage=url)
    trials = study.get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete, pruned = by_state[TrialState.COMPLETE], by_state[TrialState.PRUNED]
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    assert not [t for t in pruned if keys.INFEASIBLE in t.user_attrs], "infeasible points were sampled"
    assert len(complete) + len(pruned) == N  # exactly N, not "N or a few more"
    assert complete, "no trial completed"

    really_pruned = [t for t in pruned if t.intermediate_values and t.user_attrs.get("pruned_reason")]
    spec = studies.load(study_name)
    # The pruner of the sweep as launched: the smoke preset with this file's overrides.
    if isinstance(spec.pruner(spec.base_config("smoke", studies.parse_overrides(SETS[study_name]))),
                  optuna.pruners.NopPruner):
        assert not really_pruned, "a study without a pruner pruned"
    else:
        assert really_pruned, f"the pruner pruned nothing in {N} trials"
    for t in pruned:
        assert 1 <= len(t.intermediate_values) <= EPOCHS
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(1, EPOCHS + 1))
        assert t.value == t.intermediate_values[EPOCHS]  # the reported metric is the one returned

    threads = max(1, cpu_cores() // 2)
    targets = {p.name: p.path for p in studies.load(study_name).space}
    for t in complete + pruned:
        a = t.user_attrs
        for key in ("config", "seed", "params", "dataset", "device", "epochs_run", "wall_time",
                    "kdsweep_version"):
            assert key in a, (t.number, key)
        assert a["dataset"] == "fashion-mnist" and a["device"] == "cpu"
        assert a["kdsweep_version"] == kdsweep.__version__ and a["params"] > 0 and a["wall_time"] > 0
        assert a["epochs_run"] == len(t.intermediate_values)
        config = from_dict(TrainConfig, a["config"])  # complete: rebuilds a runnable config
        assert config.epochs == EPOCHS and config.threads == threads  # its share of the cores
        for name, value in t.params.items():  # the sampled values are the ones it trained with
            assert lookup(a["config"], targets[name]) == value, (t.number, name)

    definition = study.user_attrs["kdsweep.definition"]
    assert definition["preset"] == "smoke" and definition["study"] == study_name
    assert definition["overrides"]["epochs"] == EPOCHS
    assert definition["config"]["data"]["dataset"] == "fashion-mnist"
    return study


def best_then_train(study: optuna.Study, url: str, folder: Path) -> None:
    """`kdsweep best` exports the full winning config; `kdsweep train --config` re-runs it."""
    out = folder / "best.yaml"
    runner = CliRunner()
    result = runner.invoke(main, ["best", study.study_name, "--storage", url, "-o", str(out)],
                           prog_name="kdsweep")
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    best = study.best_trial
    assert doc["trial"] == best.number and doc["value"] == best.value and doc["params"] == best.params
    rebuilt = json.loads(json.dumps(to_dict(from_dict(TrainConfig, doc["config"]))))
    assert rebuilt == best.user_attrs["config"]  # every resolved setting, not only the sampled ones
    result = runner.invoke(main, ["train", "--config", str(out), "--device", "cpu"], prog_name="kdsweep")
    assert result.exit_code == 0, result.output
    assert "test_acc" in result.output and "val_acc" in result.output


def test_q1_sqlite(tmp_path: Path, fmnist_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q1.db'}"
    study = check_sweep("q1", url, launch("q1", url, tmp_path, tmp_path / "cache"), tmp_path / "kdsweep-artifacts")
    assert {t.params["model.family"] for t in study.trials if t.params}, "nothing sampled"
    best_then_train(study, url, tmp_path)


def test_q2_sqlite_and_resume(tmp_path: Path, fmnist_dir: Path, shared_cache: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'q2.db'}"
    study = check_sweep("q2", url, launch("q2", url, tmp_path, shared_cache), tmp_path / "kdsweep-artifacts")
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.user_attrs["teacher_key"]  # a real teacher, trained once and shared
    before = len(study.get_trials())
    again = launch("q2", url, tmp_path, shared_cache)  # the same command resumes a finished study
    check_sweep("q2", url, again, tmp_path / "kdsweep-artifacts")
    assert len(optuna.load_study(study_name="q2", storage=url).get_trials()) == before
    monkeypatch.setenv("KDSWEEP_CACHE", str(shared_cache))
    best_then_train(study, url, tmp_path)


@pytest.mark.postgres
def test_q2_postgresql(tmp_path: Path, fmnist_dir: Path, shared_cache: Path, pg_url: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    study = check_sweep("q2", pg_url, launch("q2", pg_url, tmp_path, shared_cache), tmp_path / "kdsweep-artifacts")
    monkeypatch.setenv("KDSWEEP_CACHE", str(shared_cache))
    best_then_train(study, pg_url, tmp_path)
