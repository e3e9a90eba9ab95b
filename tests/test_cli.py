"""The kdsweep CLI through click's CliRunner: help for every command, and every bad input of the
issue answered by one sentence, a non-zero exit (2 for usage errors), no traceback, and nothing
stored changed. Nothing here trains a model."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner, Result

from kdsweep.cli import main
from kdsweep.service import spec as studies
from kdsweep.service.launch import gpu_device_files
from kdsweep.service.sweep import Sweep

README = Path(__file__).resolve().parent.parent / "README.md"
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own folder, so the default ./kdsweep.db is a fresh path."""
    monkeypatch.chdir(tmp_path)
    for name in ("KDSWEEP_STORAGE", "KDSWEEP_PRESET", "KDSWEEP_N_TRIALS", "KDSWEEP_DATA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="kdsweep", env=env, input=input)


def user_error(result: Result, code: int, *expected: str) -> str:
    """Assert a one-sentence user error with exit `code`; return the sentence."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    sentence = errors[0][len("Error: "):]
    assert sentence.endswith("."), sentence
    for text in expected:
        assert text in sentence, sentence
    return sentence


def snapshot(url: str) -> list[tuple]:
    """Everything a study stores that a command could change: attrs, trials and their states."""
    storage = optuna.storages.RDBStorage(url)
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        s = optuna.load_study(study_name=summary.study_name, storage=storage)
        out.append((s.study_name, sorted(s.user_attrs.items(), key=str),
                    [(t.number, t.state, t.params, t.user_attrs) for t in s.get_trials()]))
    return out


@pytest.fixture()
def created(in_tmp: Path) -> str:
    """A q2 smoke study with 2 waiting trials and nothing finished; returns its storage URL."""
    url = f"sqlite:///{in_tmp / 'sweep.db'}"
    result = run("create", "q2", "--preset", "smoke", "--set", "epochs=2", "-n", "2", "--storage", url)
    assert result.exit_code == 0, result.output
    assert "2 waiting" in result.output
    return url


# ---------------------------------------------------------------- help


def test_every_command_has_help_with_an_example_and_is_in_the_readme() -> None:
    readme = "\n".join(p.read_text() for p in [README, *sorted((README.parent / "docs").glob("*.md"))])
    assert main.commands, "no commands"
    for name, command in main.commands.items():
        result = run(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert command.help and command.help.strip(), name
        examples = [line for line in result.output.splitlines() if f"kdsweep {name}" in line]
        assert examples, f"`kdsweep {name} --help` shows no example"
        assert re.search(rf"^\| `kdsweep {name}\b", readme, re.M), f"the command tables (README.md, docs/) lack `kdsweep {name}`"
    top = run("--help")
    assert top.exit_code == 0 and "kdsweep launch q2" in top.output


@pytest.mark.parametrize("name", ["launch", "create", "worker", "status", "best", "train", "enqueue",
                                  "dashboard", "studies"])
def test_help_of_each_command(name: str) -> None:
    result = run(name, "-h")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: kdsweep {name}")


def test_sweep_options_name_their_environment_variables() -> None:
    text = run("launch", "--help").output
    for var in ("KDSWEEP_STORAGE", "KDSWEEP_PRESET", "KDSWEEP_DATA", "KDSWEEP_DEVICE", "KDSWEEP_N_TRIALS",
                "KDSWEEP_WORKERS"):
        assert var in text, var


# ---------------------------------------------------------------- bad input


def test_unknown_study(in_tmp: Path) -> None:
    user_error(run("launch", "nope", "--preset", "smoke"), 2, "unknown study 'nope'", "q1", "q2")
    assert not (in_tmp / "kdsweep.db").exists()


def test_unknown_preset(in_tmp: Path) -> None:
    user_error(run("launch", "q2", "--preset", "nope"), 2, "no preset 'nope'", "smoke")
    assert not (in_tmp / "kdsweep.db").exists()


@pytest.mark.parametrize("command", [["launch", "q2", "--preset", "smoke"], ["status", "q2"], ["best", "q2"]])
def test_malformed_storage(command: list[str]) -> None:
    user_error(run(*command, "--storage", "mysqlite:/x.db"), 2, "is not a storage URL", "sqlite:///")


def test_unreachable_storage(in_tmp: Path) -> None:
    user_error(run("launch", "q2", "--preset", "smoke", "--storage", UNREACHABLE_PG, "-n", "1"), 1,
               "cannot open storage", "127.0.0.1")
    user_error(run("status", "q2", "--storage", "sqlite:///no/such/folder/s.db"), 2, "does not exist")
    user_error(run("create", "q2", "--preset", "smoke", "--storage", "sqlite:///no/such/folder/s.db"),
               1, "does not exist")
    assert not (in_tmp / "no").exists()


def test_password_never_shown() -> None:
    result = run("launch", "q2", "--preset", "smoke", "-n", "1",
                 "--storage", "postgresql+psycopg://kd:s3cret@127.0.0.1:1/kd")
    assert result.exit_code == 1
    assert "s3cret" not in result.output and "***" in result.output


@pytest.mark.parametrize("args, option", [
    (["--workers", "0"], "--workers"),
    (["--n-trials", "-3"], "--n-trials"),
    (["--n-trials", "0"], "--n-trials"),
    (["--n-trials", "many"], "--n-trials"),
])
def test_bad_counts(in_tmp: Path, args: list[str], option: str) -> None:
    user_error(run("launch", "q2", "--preset", "smoke", *args), 2, option)
    assert not (in_tmp / "kdsweep.db").exists()


def test_counts_from_the_environment_are_checked_too(in_tmp: Path) -> None:
    user_error(run("create", "q2", "--preset", "smoke", env={"KDSWEEP_N_TRIALS": "-1"}), 2, "--n-trials")
    assert not (in_tmp / "kdsweep.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(in_tmp: Path) -> None:
    user_error(run("launch", "q2", "--preset", "smoke", "--device", "cuda"), 2, "no usable CUDA GPU",
               "--device cpu")
    user_error(run("launch", "q2", "--preset", "paper"), 2, "meant for a CUDA GPU", "--force")
    assert not (in_tmp / "kdsweep.db").exists()


def test_data_missing_offline(in_tmp: Path) -> None:
    empty = in_tmp / "data"
    empty.mkdir()
    result = run("launch", "q1", "--preset", "paper", "--force", "--device", "cpu", "--data", str(empty))
    user_error(result, 2, "holds none of CIFAR-10's files", "--download")
    assert not (in_tmp / "kdsweep.db").exists()


def test_best_without_a_finished_trial(created: str) -> None:
    before = snapshot(created)
    user_error(run("best", "q2", "--storage", created), 1, "no complete trial")
    assert snapshot(created) == before


def test_unknown_study_name_in_a_storage(created: str) -> None:
    before = snapshot(created)
    for command in ("status", "best", "enqueue"):
        user_error(run(command, "kd", "--storage", created), 2, "no study named 'kd'", "q2")
    user_error(run("worker", "q2", "--study-name", "kd", "--storage", created), 2, "no study named 'kd'")
    assert snapshot(created) == before


def test_worker_with_another_study_file_refuses(created: str, in_tmp: Path) -> None:
    source = Path(studies.load("q2").source).read_text()
    changed = in_tmp / "q2.py"
    changed.write_text(source.replace('Float("kd.temperature", 1.0, 20.0)', 'Float("kd.temperature", 1.0, 10.0)'))
    before = snapshot(created)
    user_error(run("worker", str(changed), "--storage", created), 2,
               "different definition", "space.kd.temperature.high")
    user_error(run("worker", "q2", "--preset", "paper", "--storage", created), 2, "preset 'smoke'")
    user_error(run("launch", "q2", "--preset", "smoke", "--set", "epochs=3", "--storage", created), 2,
               "different definition", "epochs: study has 2")
    assert snapshot(created) == before


def test_bad_overrides(in_tmp: Path) -> None:
    user_error(run("launch", "q2", "--preset", "smoke", "--set", "kd.alpha=0.9"), 2, "is sampled")
    user_error(run("launch", "q2", "--preset", "smoke", "--set", "epochs"), 2, "KEY=VALUE")
    user_error(run("create", "q2", "--preset", "smoke", "--set", "wings=2"), 2, "unknown setting 'wings'")
    assert not (in_tmp / "kdsweep.db").exists()


def test_enqueue_checks_every_point_before_storing_any(created: str) -> None:
    before = snapshot(created)
    user_error(run("enqueue", "q2", "kd.alpha=1.5", "kd.temperature=4", "--storage", created), 2,
               "outside the space")
    user_error(run("enqueue", "q2", "kd.alpha=0.5", "--storage", created), 2, "needs a value")
    user_error(run("enqueue", "q2", "--storage", created), 2, "key=value")
    assert snapshot(created) == before
    result = run("enqueue", "q2", "--baselines", "--storage", created)
    assert result.exit_code == 0 and result.output.count("enqueued") == 2


def test_train_with_a_bad_config_file(in_tmp: Path) -> None:
    (in_tmp / "bad.yaml").write_text("config: [1, 2\n")
    user_error(run("train", "--config", "bad.yaml"), 2, "not valid YAML")
    (in_tmp / "list.yaml").write_text("- 1\n")
    user_error(run("train", "--config", "list.yaml"), 2, "must hold a mapping")
    (in_tmp / "unknown.yaml").write_text("config: {epochz: 3}\n")
    user_error(run("train", "--config", "unknown.yaml"), 2, "unknown key 'epochz'")
    user_error(run("train", "--config", "missing.yaml"), 2, "missing.yaml")


# ---------------------------------------------------------------- what works


def test_create_records_overrides_and_resumes(created: str) -> None:
    study = optuna.load_study(study_name="q2", storage=created)
    definition = study.user_attrs["kdsweep.definition"]
    assert definition["overrides"] == {"epochs": 2} and definition["preset"] == "smoke"
    result = run("create", "q2", "--preset", "smoke", "--set", "epochs=2", "-n", "2", "--storage", created)
    assert result.exit_code == 0 and Sweep(study).counts().waiting == 2  # resumed, not doubled


def test_status_reads_the_storage_from_the_environment(created: str) -> None:
    result = run("status", "q2", env={"KDSWEEP_STORAGE": created})
    assert result.exit_code == 0, result.output
    assert "0 complete, 0 pruned, 0 failed, 0 infeasible, 0 running, 2 waiting" in result.output


def test_dry_run_prints_a_table_and_stores_nothing(in_tmp: Path) -> None:
    result = run("launch", "q1", "--preset", "smoke", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["point", "parameter", "sampled", "value", "resolved", "parameters"]
    counts = [int(m.replace(",", "")) for m in re.findall(r" ([\d,]{5,})$", result.output, re.M)]
    assert len(counts) == 4
    assert all(abs(n - 30_000) <= 300 for n in counts), counts  # the smoke preset's matched budget
    assert "channels=" in result.output and "model.family" in result.output
    assert max(len(line) for line in lines) < 160  # a table, not JSON blobs
    assert not (in_tmp / "kdsweep.db").exists()


@pytest.mark.parametrize("study", ["q1", "q2"])
def test_dry_run_needs_no_data(in_tmp: Path, study: str) -> None:
    """The default preset is `paper` (CIFAR-10): its dry run once failed offline without the data."""
    empty = in_tmp / "data"
    empty.mkdir()
    result = run("launch", study, "--dry-run", "--data", str(empty))
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^\d ", result.output, re.M)) == 4
    assert not (in_tmp / "kdsweep.db").exists()


def test_studies_lists_both() -> None:
    result = run("studies")
    assert result.exit_code == 0
    assert re.search(r"^q1 .*smoke", result.output, re.M) and re.search(r"^q2 .*smoke", result.output, re.M)


def test_dashboard_serves_the_storage(created: str) -> None:
    """`kdsweep dashboard` answers optuna-dashboard's API with the study in that storage."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDSWEEP_")}
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep", "dashboard", "--storage", created,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies_json = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the dashboard did not answer within 60 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies_json["study_summaries"]] == ["q2"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_launch_pins_workers_round_robin_and_splits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.service import launch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr(launch, "cpu_cores", lambda: 16)
    plans = launch.plan_workers(3, "auto", "sqlite:///x.db")
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2", "5", "2"]
    assert {p.device for p in plans} == {"cuda"}
    assert [p.env["KDSWEEP_THREADS"] for p in plans] == ["5"] * 3  # 16 cores // 3 workers
    assert all(p.env["KDSWEEP_STORAGE"] == "sqlite:///x.db" for p in plans)
    cpu = launch.plan_workers(4, "cpu", "sqlite:///x.db")
    assert {p.device for p in cpu} == {"cpu"} and all(p.env["KDSWEEP_THREADS"] == "4" for p in cpu)
    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    assert launch.plan_workers(4, "cpu", "sqlite:///x.db")[0].env["KDSWEEP_THREADS"] == "1"


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_launch_threads_never_oversubscribe_by_default(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                        workers: int) -> None:
    from kdsweep.service import launch

    monkeypatch.delenv("KDSWEEP_THREADS", raising=False)
    monkeypatch.setattr(launch, "cpu_cores", lambda: cores)
    plans = launch.plan_workers(workers, "cpu", "sqlite:///x.db")
    threads = {int(p.env["KDSWEEP_THREADS"]) for p in plans}
    assert threads == {int(p.env["OMP_NUM_THREADS"]) for p in plans} and len(threads) == 1
    assert workers * threads.pop() <= max(cores, workers)  # one thread each at least


def test_launch_threads_the_user_set_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsweep.service import launch

    monkeypatch.setattr(launch, "cpu_cores", lambda: 16)
    monkeypatch.setenv("KDSWEEP_THREADS", "1")
    plans = launch.plan_workers(2, "cpu", "sqlite:///x.db")
    assert [(p.env["KDSWEEP_THREADS"], p.env["OMP_NUM_THREADS"]) for p in plans] == [("1", "1")] * 2
    plans = launch.plan_workers(2, "cpu", "sqlite:///x.db", threads=3)  # --threads beats the env
    assert {p.env["KDSWEEP_THREADS"] for p in plans} == {"3"}


# ---------------------------------------------------------------- read commands never write

READ_COMMANDS = [["status", "q2"], ["best", "q2"], ["report", "q2"], ["dashboard"]]


def _tables(url: str) -> set[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: c[0])
def test_read_commands_create_no_tables_in_postgres(command: list[str]) -> None:
    """`kdsweep status q2 --storage postgresql+psycopg://.../postgres` once created Optuna's 13
    tables there; a read command on a database without them says so and creates nothing."""
    from pgcluster import machine_database

    with machine_database() as url:
        user_error(run(*command, "--storage", url), 2, "holds no Optuna study")
        assert _tables(url) == set()


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: c[0])
def test_read_commands_create_no_tables_in_sqlite(in_tmp: Path, command: list[str]) -> None:
    import sqlite3

    path = in_tmp / "other.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    before = path.read_bytes()
    user_error(run(*command, "--storage", f"sqlite:///{path}"), 2, "holds no Optuna study")
    assert _tables(f"sqlite:///{path}") == {"notes"} and path.read_bytes() == before
    user_error(run(*command, "--storage", f"sqlite:///{in_tmp / 'none.db'}"), 2, "does not exist")
    assert not (in_tmp / "none.db").exists()


# ---------------------------------------------------------------- fast to answer


@pytest.mark.parametrize("args", [
    ["--help"], ["launch", "--help"], ["launch", "q2", "--workers", "0"], ["status", "-h"],
    ["best", "q2", "--format", "xml"], ["launch", "nosuch"], ["launch", "q2", "--preset", "smok"],
    ["launch", "q1", "--preset", "smok"], ["launch", "q2", "--preset", "smoke", "--set", "epochs=two"],
    ["launch", "q1", "--preset", "smoke", "--set", "cnn.width=32"], ["create", "q2", "--set", "data.foo=1"],
    ["launch", "q2", "--preset", "smoke", "--data", "/nonexistent-folder"],
    pytest.param(["launch", "q2", "--preset", "paper"], marks=pytest.mark.skipif(
        bool(gpu_device_files()), reason="a GPU device file is present: torch must be asked")),
], ids=" ".join)
def test_help_and_usage_errors_import_neither_torch_nor_optuna(args: list[str]) -> None:
    """Help, parsing errors and every usage error (unknown study, preset or setting, a GPU
    preset on a machine without a GPU) load no heavy library: a fraction of a second, not 4-8 s
    (the time itself is benchmarks' `cli_startup_s`)."""
    import subprocess
    import sys

    code = ("import sys\nfrom kdsweep.cli import main\ntry:\n    main(sys.argv[1:], prog_name='kdsweep')\n"
            "except SystemExit as e:\n    print('exit', e.code, sorted({'torch', 'optuna'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip().splitlines()[-1] in ("exit 0 []", "exit 2 []"), out.stdout + out.stderr


def test_default_storage_url_matches_the_storage_module() -> None:
    from kdsweep import cli
    from kdsweep.service import storage

    assert cli.DEFAULT_URL == storage.DEFAULT_URL


@pytest.mark.parametrize("study, setting, expected", [
    ("q2", "epochs=two", "epochs takes a whole number, not 'two'"),
    ("q2", "data.val_size=1.5", "data.val_size takes a whole number"),
    ("q2", "data.flip=maybe", "data.flip takes true or false"),
    ("q1", "cnn.width=32", "'cnn.width' is sampled by study 'q1'"),
    ("q1", "model.width=99", "'cnn.width' is sampled by study 'q1'"),
    ("q2", "data.foo=1", "unknown setting 'foo' in data"),
    ("q2", "epochs.x=1", "'epochs' has no sub-settings"),
])
def test_set_errors_are_one_sentence(in_tmp: Path, study: str, setting: str, expected: str) -> None:
    user_error(run("launch", study, "--preset", "smoke", "--set", setting), 2, f"--set {setting.split('=')[0]}",
               expected)


# ---------------------------------------------------------------- one meaning per option


def test_a_dataset_given_as_the_data_folder_is_refused(in_tmp: Path, tiny_npz: Path) -> None:
    """Before: `--data npz:...` was stored as data.root and the sweep trained on Fashion-MNIST."""
    sentence = user_error(run("launch", "q1", "--preset", "smoke", "--data", f"npz:{tiny_npz}", "--dry-run"),
                          2, "is a dataset, not a data folder")
    assert f"--dataset npz:{tiny_npz}" in sentence
    user_error(run("launch", "q1", "--preset", "smoke", "--data", str(in_tmp / "nowhere"), "--dry-run"),
               2, "does not exist")
    user_error(run("launch", "q1", "--preset", "smoke", "--dataset", "digits", "--dry-run"), 2,
               "unknown dataset 'digits'")
    user_error(run("launch", "q1", "--preset", "smoke", "--dataset", "npz:/no/such.npz", "--dry-run"), 2,
               "does not exist")
    assert not (in_tmp / "kdsweep.db").exists()


def test_dataset_option_records_the_data_and_its_augmentation(in_tmp: Path, tiny_npz: Path) -> None:
    result = run("launch", "q1", "--preset", "smoke", "--dataset", f"npz:{tiny_npz}", "--dry-run",
                 "--set", "data.val_size=100", "--set", "data.train_subset=500")
    assert result.exit_code == 0, result.output
    assert f'"data.dataset": "npz:{tiny_npz}"' in result.output
    # The preset's pad 2 and flips were chosen for Fashion-MNIST: 8x8 data gets its own defaults.
    assert '"data.pad": 0' in result.output and '"data.flip": false' in result.output
    # From the environment too; --set still wins for what it names.
    result = run("launch", "q1", "--preset", "smoke", "--dry-run", "--set", "data.val_size=100", "--set", "data.train_subset=500",
                 "--set", "data.pad=1", env={"KDSWEEP_DATASET": f"npz:{tiny_npz}"})
    assert result.exit_code == 0, result.output
    assert '"data.pad": 1' in result.output and '"data.flip": false' in result.output


@pytest.mark.slow
def test_launch_trains_on_the_dataset_given_and_says_so(in_tmp: Path, tiny_npz: Path) -> None:
    url = f"sqlite:///{in_tmp / 'd.db'}"
    result = run("launch", "q1", "--preset", "smoke", "--dataset", f"npz:{tiny_npz}", "-n", "2", "-w", "1",
                 "--device", "cpu", "--storage", url, "--no-tensorboard", "--set", "epochs=1",
                 "--set", "data.val_size=100", "--set", "data.train_subset=200")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("data: "))
    assert f"npz:{tiny_npz}" in header and "network input 1x14x14 (native 1x8x8)" in header and "augmentation none" in header
    assert "train 200 (of 1100), val 100, test 300" in header
    study = optuna.load_study(study_name="q1", storage=url)
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        data = t.user_attrs["config"]["data"]
        assert data["dataset"] == f"npz:{tiny_npz}" and (data["pad"], data["flip"]) == (0, False)
        assert t.user_attrs["flops"] > 0 and t.user_attrs["params"] > 0
    assert "biased upwards" in result.output  # the launch summary speaks of noise


@pytest.mark.slow
def test_a_teacher_setting_the_data_cannot_meet_is_refused_before_storing(in_tmp: Path) -> None:
    """Before: the preflight checked the student's data only; every trial then failed, naming
    data.train_subset."""
    result = run("launch", "q2", "--preset", "smoke", "--device", "cpu", "-n", "1", "-w", "1",
                 "--set", "kd.teacher_train_subset=100000")
    user_error(result, 1, "kd.teacher_train_subset=100000 but")
    assert "teacher" not in result.output.split("Error: ")[0] or "data: " not in result.output
    assert not (in_tmp / "kdsweep.db").exists()


def test_an_existing_data_folder_without_the_dataset_is_refused_not_replaced(in_tmp: Path) -> None:
    """Debian's Fashion-MNIST stands in for the default folder only, never for one the user gave."""
    empty = in_tmp / "empty"
    empty.mkdir()
    user_error(run("launch", "q1", "--preset", "smoke", "--data", str(empty), "-n", "1", "--set", "epochs=1"),
               2, f"the data folder {empty} holds none of Fashion-MNIST's files")
    assert not (in_tmp / "kdsweep.db").exists()


def test_rm_asks_one_plain_question_and_leaves_no_lock_files(created: str, in_tmp: Path) -> None:
    """The question names the study, its siblings and its files; the SQLite lock files go too."""
    sweep = Sweep.open(created, "q2", write=True)
    sibling = sweep.make_sibling(".baseline")
    for s in (sweep, sibling):
        with s.lock():  # what a worker leaves beside the database
            pass
    assert sorted(p.name for p in in_tmp.glob("sweep.db.slots-*")), "no lock files to check"
    (in_tmp / "runs" / "q2").mkdir(parents=True)
    result = run("rm", "q2", "--storage", created, input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert result.output.startswith(
        f"delete study 'q2' (0 of 2 trials finished, 0 running), its baseline sibling 'q2.baseline' "
        f"and the folder {in_tmp / 'runs' / 'q2'}? [y/N]"), result.output
    result = run("rm", "q2", "--storage", created, "--yes")
    assert result.exit_code == 0, result.output
    assert "q2.baseline" in result.output
    assert not list(in_tmp.glob("sweep.db.slots-*")), list(in_tmp.glob("sweep.db.slots-*"))
    assert not (in_tmp / "runs" / "q2").exists()
