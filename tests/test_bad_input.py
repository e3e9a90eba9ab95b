"""Bad input, one table: each case's message fragment and exit code, no traceback, nothing stored.

Every case runs the real command line (in-process, through click's test runner) beside a
SQLite storage that already holds a study with trials, and against the throwaway PostgreSQL
cluster (password authentication) where the case is about PostgreSQL. Before and after each
case every row of every table of both storages is dumped and compared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
import torch
from click.testing import CliRunner
from pgcluster import Cluster, free_port, pg_cluster  # noqa: F401

from kdsweep.cli import main
from kdsweep.service import spec as studies
from kdsweep.service.storage import open_storage
from kdsweep.service.sweep import Sweep

TINY = Path(__file__).resolve().parent / "studies" / "tiny.py"
TINY_TEXT = TINY.read_text()


def study_file(tmp: Path, name: str, old: str, new: str) -> str:
    """A copy of the tiny study file with one edit (its study name stays "tiny")."""
    assert old in TINY_TEXT, old
    text = TINY_TEXT.replace(old, new).replace("import Float, Int", "import Categorical, Float, Int  # noqa: F401")
    path = tmp / f"{name}.py"
    path.write_text(text)
    return str(path)


def config_file(tmp: Path, dataset: str) -> str:
    path = tmp / "config.yaml"
    path.write_text(f"config:\n  data: {{dataset: '{dataset}', val_size: 20}}\n  model: {{arch: mlp}}\n"
                    "  epochs: 1\n  device: cpu\n")
    return str(path)


def corrupt_npz(tmp: Path) -> str:
    path = tmp / "broken.npz"
    np.savez(path, x=np.zeros((50, 8, 8), np.uint8), y=np.zeros(50, np.int64))
    path.write_bytes(path.read_bytes()[:300])
    return str(path)


def unwritable_folder(tmp: Path) -> str:
    if os.geteuid() == 0:  # root writes anywhere mode bits allow nothing; /proc takes no files
        return "/proc/kdsweep-test"
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def sqlite_copy(tmp: Path, source: str, name: str, damage: Callable[[Path], None]) -> str:
    """A copy of the stored SQLite study (WAL folded in), damaged by `damage`; its URL."""
    import shutil
    import sqlite3

    src = Path(source.removeprefix("sqlite:///"))
    con = sqlite3.connect(src)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    path = tmp / name
    shutil.copy(src, path)
    damage(path)
    return f"sqlite:///{path}"


def malformed(path: Path) -> None:
    with open(path, "r+b") as f:  # pages 4-7 (the trials' tables) overwritten
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096 * 4)


def drop_column(path: Path) -> None:
    import sqlite3

    con = sqlite3.connect(path)  # a schema from some other Optuna version
    con.execute("ALTER TABLE trials DROP COLUMN datetime_complete")
    con.commit()
    con.close()


def foreign_sqlite(tmp: Path) -> str:
    import sqlite3

    path = tmp / "crm.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'Ada')")
    con.commit()
    con.close()
    return f"sqlite:///{path}"


RAW_PASSWORD = "p@ss%w0rd/x"  # a raw '@', '%' and '/': redacted whole, never looked up as a host
NO_ACCESS = ("noaccess", "na-pw-4c1e")  # a role of the cluster without privileges on the tables


@dataclass
class Case:
    name: str
    args: Callable[[Path, str, Cluster], list[str]]  # (tmp, sqlite url, cluster) -> argv
    fragment: str
    code: int
    env: dict[str, str] | None = None


CASES = [
    Case("empty choice list",
         lambda t, s, c: ["create", study_file(t, "e", 'Int("mlp.depth", 1, 2,', 'Categorical("mlp.depth", [],'),
                          "--storage", s, "--preset", "quick"],
         "'mlp.depth' has an empty list of choices", 2),
    Case("low bound above high bound",
         lambda t, s, c: ["create", study_file(t, "b", "0.01, 0.3, log=True", "0.3, 0.01, log=True"),
                          "--storage", s, "--preset", "quick"],
         "low 0.3 must be below high 0.01", 2),
    Case("unknown parameter in a preset",
         lambda t, s, c: ["create", study_file(t, "u", '"optim.lr": {"low"', '"optim.rate": {"low"'),
                          "--storage", s, "--preset", "faults"],
         "overrides unknown parameter 'optim.rate'", 2),
    Case("unknown preset",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "huge"],
         "has no preset 'huge'; choose one of: slow, quick, faults", 2),
    Case("negative epochs",
         lambda t, s, c: ["create", study_file(t, "n", "config=_config(2)),", "config=_config(-3)),"),
                          "--storage", s, "--preset", "quick"],
         "epochs must be at least 1, got -3", 2),
    Case("zero trials",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick", "--n-trials", "0"],
         "Invalid value for '-n' / '--n-trials'", 2),
    Case("malformed storage URL",
         lambda t, s, c: ["status", "tiny", "--storage", "postgres//kdsweep:hunter2@db/x"],
         "is not a storage URL; use sqlite:///FILE.db or postgresql+psycopg://", 2),
    Case("wrong PostgreSQL password",
         lambda t, s, c: ["status", "tiny", "--storage", c.url(password="wrong-pw-7f3")],
         "password authentication failed for user \"kdsweep\"", 1),
    Case("database that does not exist",
         lambda t, s, c: ["status", "tiny", "--storage", c.url(database="nosuchdb")],
         "database \"nosuchdb\" does not exist", 1),
    Case("unreachable host (closed loopback port)",
         lambda t, s, c: ["status", "tiny", "--storage",
                          f"postgresql+psycopg://kdsweep:pw-closed@127.0.0.1:{free_port()}/kdsweep"],
         "Connection refused", 1),
    Case("resume with another direction",
         lambda t, s, c: ["create", study_file(t, "d", 'name="tiny",', 'name="tiny", direction="minimize",'),
                          "--storage", s, "--preset", "quick"],
         "was created to maximize, but this study file wants to minimize", 2),
    Case("worker with another study file",
         lambda t, s, c: ["worker", study_file(t, "w", "Float(\"mlp.dropout\", 0.0, 0.3",
                                                "Float(\"mlp.dropout\", 0.0, 0.4"),
                          "--storage", s, "--device", "cpu"],
         "space.mlp.dropout.high: study has 0.3, this study file gives 0.4", 2),
    Case("corrupt npz",
         lambda t, s, c: ["train", "--config", config_file(t, f"npz:{corrupt_npz(t)}")],
         "as a .npz archive", 1),
    Case("unwritable storage folder",
         lambda t, s, c: ["create", str(TINY), "--preset", "quick", "--storage",
                          f"sqlite:///{unwritable_folder(t)}/sweep.db"],
         "sweep.db", 1),
    Case("--device cuda without CUDA",
         lambda t, s, c: ["launch", str(TINY), "--storage", s, "--preset", "quick", "--device", "cuda"],
         "has no usable CUDA GPU; use --device cpu", 2),
    Case("enqueued value outside the space",
         lambda t, s, c: ["enqueue", "tiny", "optim.lr=5", "mlp.depth=1", "mlp.dropout=0.1", "--storage", s,
                          "--study", str(TINY)],
         "value 5.0 for 'optim.lr' is outside the space [0.01, 0.3]", 2),
    Case("enqueued unknown parameter",
         lambda t, s, c: ["enqueue", "tiny", "optim.momentum=0.5", "--storage", s, "--study", str(TINY)],
         "unknown parameter 'optim.momentum'", 2),
    Case("status of a study that does not exist",
         lambda t, s, c: ["status", "tyni", "--storage", s],
         "no study named 'tyni'", 2),
    Case("malformed heartbeat setting",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick"],
         "KDSWEEP_HEARTBEAT must be a whole number of seconds", 1, env={"KDSWEEP_HEARTBEAT": "fast"}),
    Case("--set precision (a per-host setting)",
         lambda t, s, c: ["create", "q2", "--storage", s, "--preset", "smoke", "--set", "precision=bf16"],
         "'precision' is a per-host setting, not part of the study; set KDSWEEP_PRECISION=fp32 or bf16", 2),
    Case("malformed precision setting",
         lambda t, s, c: ["launch", str(TINY), "--storage", s, "--preset", "quick", "--device", "cpu"],
         "KDSWEEP_PRECISION must be fp32 or bf16, got 'fp16'", 2, env={"KDSWEEP_PRECISION": "fp16"}),
    Case("grace period not above the heartbeat",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick"],
         "KDSWEEP_GRACE (5 s) must be longer than KDSWEEP_HEARTBEAT (10 s)", 1, env={"KDSWEEP_GRACE": "5"}),
    # -- hostile or odd input
    Case("raw '@' and '/' in a PostgreSQL password",
         lambda t, s, c: ["status", "tiny", "--storage",
                          f"postgresql+psycopg://kdsweep:{RAW_PASSWORD}@127.0.0.1:{free_port()}/kdsweep"],
         "postgresql+psycopg://kdsweep:***@127.0.0.1:", 1),
    Case("study name that climbs out of the artifacts folder",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick",
                          "--study-name", "../../../elsewhere/x"],
         "study name '../../../elsewhere/x' is not allowed: use at most 100 letters, digits", 2),
    Case("300-character study name",
         lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick", "--study-name", "n" * 300],
         "is not allowed: use at most 100 letters", 2),
    Case("600-character study name on PostgreSQL",
         lambda t, s, c: ["launch", str(TINY), "--storage", c.url(), "--preset", "quick", "--device", "cpu",
                          "--study-name", "p" * 600],
         "is not allowed: use at most 100 letters", 2),
    Case("hidden study name", lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick",
                                               "--study-name", ".tiny"],
         "study name '.tiny' is not allowed", 2),
    Case("--set epochs=nan", lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick",
                                              "--set", "epochs=nan"],
         "epochs takes a whole number, not nan", 2),
    Case("--set epochs=inf", lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick",
                                              "--set", "epochs=inf"],
         "epochs takes a whole number, not inf", 2),
    Case("--set epochs=2.5", lambda t, s, c: ["launch", str(TINY), "--storage", s, "--preset", "quick",
                                              "--device", "cpu", "--set", "epochs=2.5"],
         "epochs takes a whole number, not 2.5", 2),
    Case("--set optim.weight_decay=1e400", lambda t, s, c: ["create", str(TINY), "--storage", s,
                                                            "--preset", "quick", "--set", "optim.weight_decay=1e400"],
         "optim.weight_decay must be a finite number, got inf", 2),
    Case("--set optim.lr=1e400 (q2 does not sample it)",
         lambda t, s, c: ["create", "q2", "--storage", s, "--preset", "smoke", "--set", "optim.lr=1e400"],
         "optim.lr must be a finite number, got inf", 2),
    Case("--set optim.momentum=-0.5", lambda t, s, c: ["create", str(TINY), "--storage", s, "--preset", "quick",
                                                       "--set", "optim.momentum=-0.5"],
         "optim.momentum must be at least 0.0 and below 1, got -0.5", 2),
    Case("damaged SQLite file (database disk image is malformed)",
         lambda t, s, c: ["status", "tiny", "--storage", sqlite_copy(t, s, "torn.db", malformed)],
         "the database file is damaged or not a SQLite database", 1),
    Case("a file that is not SQLite at all",
         lambda t, s, c: ["status", "tiny", "--storage",
                          f"sqlite:///{(t / 'notes.db').write_text('my notes' * 100) and t / 'notes.db'}"],
         "(sqlite:///", 1),
    Case("SQLite schema of another Optuna version (no such column)",
         lambda t, s, c: ["status", "tiny", "--storage", sqlite_copy(t, s, "old.db", drop_column)],
         "the database's tables do not match this Optuna version", 1),
    Case("SQLite file of another application",
         lambda t, s, c: ["create", str(TINY), "--storage", foreign_sqlite(t), "--preset", "quick"],
         "holds tables of another application (customers); kdsweep does not write into it", 1),
    Case("read command on an empty SQLite file",
         lambda t, s, c: ["status", "tiny", "--storage",
                          f"sqlite:///{(t / 'empty.db').write_bytes(b'') or t / 'empty.db'}"],
         "holds no Optuna study", 2),
    Case("PostgreSQL role without privileges on the tables (StorageInternalError)",
         lambda t, s, c: ["status", "tiny", "--storage", c.url().replace(
             f"{c.user}:{c.password}@", f"{NO_ACCESS[0]}:{NO_ACCESS[1]}@")],
         "this user may not use the database's tables or files", 1),
]


def dump(url: str) -> list:
    """Every row of every table, sorted: equal dumps mean nothing stored changed."""
    engine = sqlalchemy.create_engine(url)
    try:
        meta = sqlalchemy.MetaData()
        meta.reflect(engine)
        with engine.connect() as con:
            return [(name, sorted(map(repr, con.execute(table.select()).all())))
                    for name, table in sorted(meta.tables.items())]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Cluster) -> tuple[str, Cluster]:  # noqa: F811
    """A SQLite storage and the cluster's database, each holding study tiny with 3 slots."""
    url = f"sqlite:///{tmp_path_factory.mktemp('bad') / 'sweep.db'}"
    for u in (url, pg_cluster.url()):
        Sweep.create(open_storage(u), studies.load(str(TINY)), "quick", "tiny", 3, seed=0)
    import psycopg

    with psycopg.connect(pg_cluster.url().replace("postgresql+psycopg", "postgresql"), autocommit=True) as con:
        con.execute(f"DROP ROLE IF EXISTS {NO_ACCESS[0]}")
        con.execute(f"CREATE ROLE {NO_ACCESS[0]} LOGIN PASSWORD '{NO_ACCESS[1]}'")
    return url, pg_cluster


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, stored: tuple[str, Cluster], tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    if case.name.startswith("--device cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    url, cluster = stored
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    args = case.args(tmp_path, url, cluster)
    before = [dump(url), dump(cluster.url())]
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code == case.code, out
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert case.fragment in errors[0], out
    for secret in (cluster.password, "wrong-pw-7f3", "hunter2", "pw-closed", RAW_PASSWORD, "ss%w0rd",
                   NO_ACCESS[1]):
        assert secret not in out
    assert [dump(url), dump(cluster.url())] == before


def test_corrupt_teacher_cache_is_rebuilt(tmp_path: Path, tmp_cache: Path, fmnist_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher cache file that is torn or foreign is rebuilt, never loaded."""
    from kdsweep.core import teacher

    monkeypatch.setattr(teacher, "_LOADED", {})  # as in a fresh worker: read the file
    cfg = tmp_path / "kd.yaml"
    cfg.write_text(
        "config:\n"
        "  data: {dataset: fashion-mnist, val_size: 200, train_subset: 400, test_subset: 200, pad: 0, flip: false}\n"
        "  model: {arch: mlp, hidden: [32]}\n"
        "  kd: {alpha: 0.5, temperature: 4.0, teacher: {arch: mlp, hidden: [64]}, teacher_epochs: 1,"
        " cache_logits: false}\n"
        "  epochs: 1\n  batch_size: 100\n  device: cpu\n")
    first = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert first.exit_code == 0, first.output
    cached = [p for p in tmp_cache.rglob("*.pt")]
    assert len(cached) == 1, cached
    good = cached[0].stat().st_size
    cached[0].write_bytes(b"not a torch file" * 10)
    teacher._LOADED.clear()
    second = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert second.exit_code == 0, second.output
    assert "Traceback" not in second.output
    assert "is unreadable" in second.output and "rebuilding it" in second.output
    # Rebuilt: a real checkpoint again, loadable with weights_only=True.
    assert cached[0].stat().st_size > 1000 and abs(cached[0].stat().st_size - good) < good // 10
    stored = torch.load(cached[0], map_location="cpu", weights_only=True)
    assert "state_dict" in stored
