"""Storage: passwords never leak, heartbeat settings, safe loading, the dashboard's bind address,
and the docker-compose file.

The leak test runs a real sweep against the throwaway PostgreSQL cluster (password
authentication) and searches everything it produced for the password: the launch's output
(progress and the workers' logs), `status`, `best` (printed and exported), TensorBoard event
files, every row the storage holds, and the workers' command lines.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from click.testing import CliRunner
from pgcluster import Cluster, free_port, pg_cluster, pg_url, wait_until  # noqa: F401

from kdsweep.cli import main
from kdsweep.service import storage
from kdsweep.service.storage import (
    StorageError,
    errors,
    open_storage,
    password_of,
    redact,
    redact_text,
)
from kdsweep.service.storage.retrying import with_retries

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).resolve().parent / "studies" / "tiny.py"


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://kd:s3cret@db:5432/kd", "postgresql+psycopg://kd:***@db:5432/kd"),
    ("postgresql+psycopg://kd:p%40ss:w/rd@db/kd", "postgresql+psycopg://kd:***@db/kd"),
    ("postgres//kd:s3cret@db/kd", "postgres//kd:***@db/kd"),  # malformed, still hidden
    ("postgresql+psycopg://kd@db/kd", "postgresql+psycopg://kd@db/kd"),
    ("sqlite:////tmp/a@b/sweep.db", "sqlite:////tmp/a@b/sweep.db"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_text_hides_the_password_alone_too() -> None:
    url = "postgresql+psycopg://kd:s3cret-pw@db/kd"
    text = 'connection to "db" failed for kd (password s3cret-pw) via postgresql://x:other@h/d'
    out = redact_text(text, url)
    assert "s3cret-pw" not in out and "other" not in out and password_of(url) == "s3cret-pw"


def test_heartbeat_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "2")
    monkeypatch.setenv("KDSWEEP_GRACE", "7")
    st = storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    assert st.get_heartbeat_interval() == 2
    monkeypatch.setenv("KDSWEEP_GRACE", "2")
    with pytest.raises(StorageError, match="must be longer than KDSWEEP_HEARTBEAT"):
        storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    monkeypatch.delenv("KDSWEEP_HEARTBEAT")
    monkeypatch.delenv("KDSWEEP_GRACE")
    assert (storage.heartbeat_interval(), storage.grace_period()) == (storage.HEARTBEAT_S, storage.GRACE_S)


def test_every_torch_load_is_weights_only() -> None:
    """Checkpoints and caches are data, never code: every torch.load passes weights_only=True."""
    calls = []
    for path in sorted((ROOT / "kdsweep").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load") \
                    and "torch" in ast.unparse(node.func):
                calls.append((path.name, node))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((path.name, node))
    assert calls, "no torch.load found: the check looks in the wrong place"
    for name, node in calls:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{name}:{node.lineno} torch.load without weights_only=True"
    # np.load of user data must not unpickle either.
    for path in sorted((ROOT / "kdsweep").rglob("*.py")):
        for m in re.finditer(r"np\.load\(([^)]*)\)", path.read_text()):
            assert "allow_pickle=False" in m.group(1), f"{path.name}: {m.group(0)}"


def test_dashboard_binds_to_loopback_by_default(tmp_path: Path) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=False))  # reads need one
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep", "dashboard", "--port", str(port), "--storage", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_until(listening, 60, 0.2, "the dashboard to listen")
        # /proc/net/tcp lists listening sockets (state 0A) as hex address:port.
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        local = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
        assert local == [f"0100007F:{port:04X}"], local  # 127.0.0.1 only, not 0.0.0.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_password_never_leaks(tmp_path: Path, pg_cluster: Cluster, fmnist_dir: Path) -> None:  # noqa: F811
    password = pg_cluster.password
    url = pg_cluster.url()
    env = {**os.environ, "KDSWEEP_STORAGE": url, "KDSWEEP_HEARTBEAT": "1", "KDSWEEP_GRACE": "5"}
    cmd = [sys.executable, "-m", "kdsweep", "launch", str(TINY), "--preset", "quick", "--n-trials", "2",
           "--workers", "2", "--device", "cpu", "--study-name", "leak", "--artifacts", str(tmp_path / "art")]
    launch = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path)
    # The workers get the URL through their environment, never their command line (`ps`).
    children: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.monotonic() + 90
    while launch.poll() is None and time.monotonic() < deadline and len(children) < 2:
        try:
            kids = Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()
            for pid in map(int, kids):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"worker" in cmdline:  # exec'd: a child is launch's copy until then
                    children.setdefault(pid, (cmdline, Path(f"/proc/{pid}/environ").read_bytes()))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out, _ = launch.communicate(timeout=150)
    assert launch.returncode == 0, out[-3000:]
    assert len(children) == 2
    for cmdline, environ in children.values():
        assert password.encode() not in cmdline
        assert f"KDSWEEP_STORAGE={url}".encode() in environ.split(b"\0")

    runner = CliRunner()
    status = runner.invoke(main, ["status", "leak", "--storage", url])
    best = runner.invoke(main, ["best", "leak", "--storage", url, "-o", str(tmp_path / "best.yaml")])
    printed = runner.invoke(main, ["best", "leak", "--storage", url, "--format", "json"])
    wrong = runner.invoke(main, ["status", "leak", "--storage", pg_cluster.url(database="nosuchdb")])
    assert status.exit_code == best.exit_code == printed.exit_code == 0, status.output + best.output
    assert wrong.exit_code == 1 and "nosuchdb" in wrong.output and "kdsweep:***@" in wrong.output
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert exported["config"]["epochs"] == 2  # a real export was searched

    texts = {"launch output": out, "status": status.output, "best": best.output, "best json": printed.output,
             "error": wrong.output}
    for what, text in texts.items():
        assert password not in text, what
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files), "no TensorBoard files were written"
    for p in files:
        assert password.encode() not in p.read_bytes(), p
    engine = sqlalchemy.create_engine(url)
    try:
        meta = sqlalchemy.MetaData()
        meta.reflect(engine)
        with engine.connect() as con:
            for table in meta.tables.values():
                for row in con.execute(table.select()):
                    assert password not in repr(row), table.name
    finally:
        engine.dispose()


COMPOSE = ROOT / "docker-compose.yml"


def test_compose_commands_exist_and_hold_no_credentials() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"postgres", "dashboard", "worker", "create"} <= set(services)
    used = set()
    for service in services.values():
        command = service.get("command") or doc["x-kdsweep"].get("command", "")
        text = " ".join(command) if isinstance(command, list) else str(command)
        used |= set(re.findall(r"\bkdsweep (\w+)", text))
    assert used >= {"create", "worker", "dashboard"}
    assert used <= set(main.commands), used - set(main.commands)
    text = COMPOSE.read_text()
    assert "change-me" not in text and not re.search(r"(?m)^\s*\w*PASSWORD:\s*[^$\s]", text)
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    assert services["postgres"].get("healthcheck") and services["postgres"].get("volumes")
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def compose_command() -> list[str] | None:
    """The docker compose client that works here: `docker-compose`, or `docker compose` when
    the docker binary has the compose plugin (a bare docker binary answers "unknown command")."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_parses(tmp_path: Path) -> None:
    client = compose_command()
    if client is None:
        pytest.skip("no docker compose client (docker-compose, or docker with the compose plugin): "
                    "apt-get install docker-compose to check the file parses")
    cmd = [*client, "--env-file", str(ROOT / ".env.example"), "-f", str(COMPOSE), "config"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    for name in ("worker", "create", "dashboard"):
        env = config["services"][name]["environment"]
        assert env["KDSWEEP_STORAGE"] == "postgresql+psycopg://kdsweep:change-me@postgres:5432/kdsweep", name
    assert config["services"]["worker"]["environment"]["KDSWEEP_STUDY"] == "q2"


def test_retries_are_bounded_and_end_in_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy.exc

    monkeypatch.setenv("KDSWEEP_RETRIES", "2")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def down() -> None:
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("server closed"))

    with pytest.raises(StorageError, match=r"did not answer get_trial after 2 retries"):
        with_retries(down, "get_trial")()
    assert len(calls) == 3

    def broken() -> None:  # not a connection problem: raised at once, never retried
        calls.append(1)
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate"))

    calls.clear()
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with_retries(broken, "add_trial")()
    assert len(calls) == 1


def test_compose_client_needs_the_compose_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker binary without the compose plugin (`unknown command`) is no compose client, so
    test_compose_file_parses skips there instead of failing on `unknown flag: --env-file`."""
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "docker: unknown command: docker $1" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert compose_command() is None
    fake.write_text('#!/bin/sh\necho "Docker Compose version v2.29.0"\n')
    assert compose_command() == ["docker", "compose"]


def test_git_ignores_the_sqlite_slot_lock_files() -> None:
    """study_lock leaves `<file>.db.slots-<id>.lock` beside a SQLite file; git must not offer it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "sweeps/kdsweep.db.slots-1.lock"], cwd=ROOT)
    assert result.returncode == 0


# ---------------------------------------------------------------- the storage location


def test_a_raw_at_or_slash_in_a_password_is_redacted_whole_and_never_a_host() -> None:
    url = "postgresql+psycopg://kdsweep:p@ss%w0rd/x@db.example:5433/kd"
    assert redact(url) == "postgresql+psycopg://kdsweep:***@db.example:5433/kd"
    assert redact_text(f"could not connect to {url}: boom p@ss%w0rd/x", url).count("***") == 2
    where = storage.location(url)
    parsed = where.sqlalchemy_url()
    assert (parsed.host, parsed.port, parsed.database) == ("db.example", 5433, "kd")
    assert (parsed.username, parsed.password) == ("kdsweep", "p@ss%w0rd/x")
    # Percent-encoded passwords are decoded, as the README tells users to write them.
    assert storage.location("postgresql://u:a%40b@h/d").sqlalchemy_url().password == "a@b"
    assert storage.location("postgresql://u:a%40b@h/d").sqlalchemy_url().drivername == "postgresql+psycopg"


def test_location_knows_the_sqlite_file_and_the_folders_beside_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDSWEEP_RUNS", raising=False)
    where = storage.location(f"sqlite:///{tmp_path}/a/k.db")
    assert where.sqlite_path == tmp_path / "a" / "k.db"
    assert where.artifacts("q2") == tmp_path / "a" / "kdsweep-artifacts" / "q2"
    assert where.artifacts("q2", tmp_path / "shared") == tmp_path / "shared" / "q2"
    assert where.runs() == tmp_path / "a" / "runs"
    server = storage.location("postgresql+psycopg://u:pw@h/db")
    assert server.sqlite_path is None and server.artifacts("q2") == Path("kdsweep-artifacts/q2")
    assert storage.location("sqlite:///:memory:").sqlite_path is None
    for bad in ("../x", "a/b", ".hidden", "", "x" * 101, "a b", "é"):
        with pytest.raises(storage.StorageURLError, match="is not allowed"):
            where.artifacts(bad)
    assert where.artifacts("q2.verify").name == "q2.verify"  # the verify sibling's name is fine
    with pytest.raises(storage.StorageURLError, match="is not a storage URL"):
        storage.location("mysqlite:/x.db")


def test_only_the_storage_module_parses_a_storage_url() -> None:
    """One parser. Other modules call StorageLocation; none slices 'sqlite:///'."""
    offenders = []
    for path in sorted((ROOT / "kdsweep").rglob("*.py")):
        if path.name == "location.py" or path.name == "opening.py" and path.parent.name == "storage":
            continue  # the parser, and the module that opens what it parses
        text = path.read_text()
        if re.search(r"startswith\(\s*[\"'](sqlite|postgres)", text) or 'len("sqlite:///")' in text:
            offenders.append(path.name)
    assert offenders == []


# ---------------------------------------------------------------- errors sorted


def _wrapped(exc: BaseException) -> BaseException:
    """`exc` as Optuna hands it on: a StorageInternalError raised from SQLAlchemy's wrapper."""
    import optuna
    import sqlalchemy.exc

    try:
        try:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, exc)
        except sqlalchemy.exc.OperationalError as inner:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from inner
    except optuna.exceptions.StorageInternalError as outer:
        return outer


def sqlite_error(kind: str, folder: Path) -> sqlite3.Error:
    """A real SQLite error of `kind`, raised by SQLite itself on files in `folder`."""
    db = folder / f"{kind}.db"
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    con.execute("CREATE TABLE IF NOT EXISTS t (x)")
    try:
        if kind == "locked":
            other = sqlite3.connect(db, timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            con.execute("BEGIN IMMEDIATE")
        elif kind == "full":  # SQLite's own page limit says what a full disk says
            con.execute(f"PRAGMA max_page_count = {con.execute('PRAGMA page_count').fetchone()[0]}")
            con.execute("INSERT INTO t VALUES (zeroblob(100000))")
        elif kind == "read-only":
            sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("INSERT INTO t VALUES (1)")
        elif kind == "damaged":
            (folder / "damaged.txt").write_bytes(b"not a database, " * 512)
            sqlite3.connect(folder / "damaged.txt").execute("SELECT * FROM sqlite_master")
        elif kind == "no such column":
            con.execute("SELECT datetime_complete FROM t")
        elif kind == "cannot open":
            sqlite3.connect(folder / "missing" / "x.db").execute("SELECT 1")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError(f"no {kind} error")


@pytest.mark.parametrize("kind, transient", [
    ("locked", True), ("full", False), ("read-only", False), ("damaged", False), ("no such column", False),
    ("cannot open", False),
])
def test_sqlite_errors_are_sorted(kind: str, transient: bool, tmp_path: Path) -> None:
    assert errors.transient(_wrapped(sqlite_error(kind, tmp_path))) is transient


def test_an_error_raised_while_handling_another_is_judged_on_its_own(tmp_path: Path) -> None:
    locked, full = sqlite_error("locked", tmp_path), sqlite_error("full", tmp_path)
    try:
        try:
            raise locked
        except sqlite3.OperationalError:
            raise full from None
    except sqlite3.OperationalError as exc:
        assert exc.__context__ is not None and not errors.transient(exc)
    try:
        try:
            raise locked
        except sqlite3.OperationalError:
            raise ValueError("a bug in the caller")  # noqa: B904
    except ValueError as exc:
        assert not errors.transient(exc)


def test_permanent_errors_end_at_once_in_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("a permanent error was retried"))
    where = storage.location("sqlite:////data/sweep.db")
    for kind, fragment in [("full", "the disk holding the database is full"),
                           ("read-only", "the database is read-only"), ("damaged", "damaged")]:
        error = sqlite_error(kind, tmp_path)

        def fail(error: sqlite3.Error = error) -> None:
            raise _wrapped(error)

        with pytest.raises(StorageError, match=fragment) as caught:
            with_retries(fail, "set_trial_state_values", where)()
        assert str(error) in str(caught.value) and str(caught.value).count(". ") == 0


def test_server_errors_are_sorted_by_sqlstate(pg_url: str) -> None:  # noqa: F811
    """PostgreSQL's own errors, raised by the server: SQLSTATE decides, not the message."""
    import psycopg

    con = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    try:
        for sql, cause in [("SELECT * FROM no_such_table", "do not match this Optuna version"),
                           ("SELECT * FROM version_info", "holds no Optuna studies"),
                           ("SET TRANSACTION READ ONLY; CREATE TABLE x (y int)", None)]:
            with pytest.raises(psycopg.Error) as caught:
                with con.transaction():
                    for statement in sql.split("; "):
                        con.execute(statement)
            rule = errors.rule_for(caught.value)
            assert rule is not None and rule.verdict == errors.STOP, (sql, rule)
            assert cause is None or cause in rule.what, (sql, rule.what)
        cancelled = psycopg.OperationalError("the connection is lost")
        assert errors.transient(cancelled)  # no SQLSTATE: a connection that failed
        # What the session of a connection lost mid-transaction says next (seen from launch
        # when the server stopped): retried like the loss itself, then "did not answer".
        assert errors.transient(_wrapped(sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid "
                                                                              "transaction is rolled back.")))
    finally:
        con.close()


def test_mysql_urls_are_refused_as_usage_errors() -> None:
    """kdsweep's study lock and schema creation are written (and tested) for SQLite and PostgreSQL."""
    with pytest.raises(storage.StorageURLError, match="is not a storage URL"):
        storage.location("mysql+pymysql://u:pw@db/kd")


def test_outage_past_the_budget_is_storage_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy.exc

    monkeypatch.setenv("KDSWEEP_RETRIES", "1")
    monkeypatch.setattr(time, "sleep", lambda s: None)

    def down() -> None:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(storage.StorageUnavailable, match="did not answer get_trial after 1 retries"):
        with_retries(down, "get_trial")()
    monkeypatch.setenv("KDSWEEP_RETRIES", "many")
    with pytest.raises(StorageError, match="KDSWEEP_RETRIES must be a whole number of retries"):
        storage.retries()


# ---------------------------------------------------------------- SQLite readers


PROBE_READER = """
import sys, time
from kdsweep.service.storage import open_storage
import optuna
st = open_storage(sys.argv[1], heartbeat=False)
study = optuna.load_study(study_name="probe", storage=st)
end = time.monotonic() + float(sys.argv[2])
reads = 0
while time.monotonic() < end:
    study.get_trials(deepcopy=False)  # what status and the dashboard do, as fast as it can
    st.get_study_user_attrs(study._study_id)
    reads += 1
print(reads)
"""


def test_sqlite_readers_never_take_the_write_lock(tmp_path: Path) -> None:
    """A probe writer that never waits (busy timeout 0) beside a reader polling as fast as it
    can: with reads in BEGIN IMMEDIATE the writer finds the file locked again and again."""
    import sqlite3

    import optuna

    url = f"sqlite:///{tmp_path / 'probe.db'}"
    study = optuna.create_study(study_name="probe", storage=storage.open_storage(url, heartbeat=False))
    for _ in range(20):
        study.enqueue_trial({})
    reader = subprocess.Popen([sys.executable, "-c", PROBE_READER, url, "8"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ), cwd=tmp_path)
    con = sqlite3.connect(tmp_path / "probe.db", timeout=0, isolation_level=None)
    locked = writes = 0
    time.sleep(3)  # the reader has started polling
    while reader.poll() is None:
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("UPDATE studies SET study_name = study_name")
            con.execute("COMMIT")
            writes += 1
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc) or "busy" in str(exc), exc
            locked += 1
            with contextlib.suppress(sqlite3.OperationalError):
                con.execute("ROLLBACK")
        time.sleep(0.002)
    out, err = reader.communicate()
    assert reader.returncode == 0, err[-2000:]
    reads = int(out.strip())
    assert reads > 50 and writes > 50, (reads, writes)
    assert locked == 0, f"the writer found the file locked {locked} times in {writes + locked} ({reads} reads)"


# ---------------------------------------------------------------- the study lock


LOCK_HOLDER = """
import sys, time
import optuna
from kdsweep.service import storage
from kdsweep.service.storage import open_storage, study_lock
storage.locks.LOCK_IDLE_S = float(sys.argv[3])
st = open_storage(sys.argv[1], heartbeat=False)
study = optuna.load_study(study_name="locked", storage=st)
with study_lock(st, study._study_id):
    study.set_user_attr("holder", "in")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def test_a_worker_waiting_for_the_study_lock_says_who_holds_it(pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import optuna

    monkeypatch.setattr(storage.locks, "LOCK_LOG_S", 1.0)
    st = storage.open_storage(pg_url, heartbeat=False)
    study = optuna.create_study(study_name="locked", storage=st)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, pg_url, "6", "60"], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ), cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING, logger="kdsweep.service.storage"):
            with storage.study_lock(st, study._study_id):
                got_it = time.monotonic()
                # Never stolen: the holder's block had committed and let go before this one began.
                assert holder.wait(timeout=30) == 0 and holder.stdout.read().strip() == "released"
                assert study.user_attrs["holder"] == "in"
        del got_it
    finally:
        if holder.poll() is None:
            holder.kill()
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waits) >= 2, waits  # every second (LOCK_LOG_S) while it waited
    assert f"kdsweep {socket.gethostname()} pid {holder.pid}" in waits[-1] and "since" in waits[-1], waits[-1]


def test_a_stopped_lock_holder_does_not_stall_the_others(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """A holder stopped mid-block (SIGSTOP, a paused VM) loses the lock after LOCK_IDLE_S: the
    server ends its transaction, its half-done block is not stored, and the others go on."""
    import signal

    import optuna

    st = storage.open_storage(pg_url, heartbeat=False)
    study = optuna.create_study(study_name="locked", storage=st)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, pg_url, "600", "4"], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ), cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)

        def take() -> None:
            with storage.study_lock(st, study._study_id):
                pass

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        waiter.join(timeout=150)  # a 4 s idle limit, with slack for a loaded machine
        stalled = waiter.is_alive()
    finally:
        holder.kill()  # (its connection closes, so a stalled waiter gets the lock and ends)
        holder.wait()
    assert not stalled, "a stopped holder stalled the study lock"
    assert "holder" not in optuna.load_study(study_name="locked", storage=st).user_attrs


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_study_lock_block_is_one_transaction(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What a block stores under the lock is stored whole or not at all, on every backend."""
    url = f"sqlite:///{tmp_path / 'atomic.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    st = storage.open_storage(url, heartbeat=False)
    study = optuna.create_study(study_name="atomic", storage=st)
    with pytest.raises(RuntimeError, match="boom"), storage.study_lock(st, study._study_id):
        study.enqueue_trial({})
        study.enqueue_trial({})
        raise RuntimeError("boom")
    fresh = optuna.load_study(study_name="atomic", storage=storage.open_storage(url, heartbeat=False))
    assert fresh.trials == []
    with storage.study_lock(st, study._study_id):
        study.enqueue_trial({})
    assert len(optuna.load_study(study_name="atomic", storage=storage.open_storage(url, heartbeat=False)).trials) == 1


# ---------------------------------------------------------------- concurrent first starts


CREATE_AT = """
import sys, time
import psycopg, optuna  # noqa: E401  everything imported before the common start time
from kdsweep.cli import main
import kdsweep.service.worker, kdsweep.service.storage  # noqa: E401
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
main(sys.argv[2:])
"""


RACE = """
import sys, time
from pathlib import Path
import optuna
from kdsweep.service.storage import open_storage
Path(sys.argv[3]).touch()  # imported: ready
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
optuna.create_study(study_name=sys.argv[4], storage=open_storage(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", ["no file", "an empty file"])
def test_concurrent_first_starts_on_a_new_sqlite_database(tmp_path: Path, start: str) -> None:
    """Four processes open a new SQLite database at the same instant, each to create a study:
    each succeeds (one makes the schema, the others wait for it), round after round."""
    procs_n = 4
    for round_ in range(2):
        db = tmp_path / f"round-{round_}.db"
        if start == "an empty file":
            db.touch()
        url, go = f"sqlite:///{db}", tmp_path / f"go-{round_}"
        ready = [tmp_path / f"ready-{round_}-{i}" for i in range(procs_n)]
        procs = [subprocess.Popen([sys.executable, "-c", RACE, url, str(go), str(ready[i]), f"s{i}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
                 for i in range(procs_n)]
        def started(ready: list[Path] = ready, procs: list[subprocess.Popen] = procs) -> bool:
            return all(r.exists() for r in ready) or any(p.poll() is not None for p in procs)

        wait_until(started, 120, 0.05, "every process to import kdsweep")
        go.touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        failed = [o for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
        assert not failed, f"round {round_}: {len(failed)} of {procs_n} failed:\n{failed[0][-3000:]}"
        assert sorted(storage.study_names(open_storage(url, heartbeat=False))) == [f"s{i}" for i in range(procs_n)]
    assert not list(tmp_path.glob("*.lock")), "a lock file was left beside the database"


@pytest.mark.slow
def test_concurrent_first_starts_on_an_empty_postgres_database(tmp_path: Path) -> None:
    """Several `kdsweep create` at the same instant on an empty database: each succeeds."""
    from pgcluster import machine_database

    tiny = str(TINY)
    for round_ in range(2):
        with machine_database() as url:
            start = time.time() + 15  # every process has imported kdsweep by then, even on a busy machine
            # Studies of their own: the race is Optuna's schema, made by whoever comes first.
            procs = [subprocess.Popen([sys.executable, "-c", CREATE_AT, str(start), "create", tiny, "--preset",
                                       "quick", "--storage", url, "-n", "3", "--study-name", f"tiny-{i}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                                      env=dict(os.environ))
                     for i in range(5)]
            outs = [p.communicate(timeout=180)[0] for p in procs]
            failed = [o for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
            assert not failed, f"round {round_}: {len(failed)} of 5 failed:\n{failed[0][-3000:]}"


# ---------------------------------------------------------------- study names from the study file


def test_a_study_name_from_the_study_file_is_checked_like_study_name(tmp_path: Path) -> None:
    evil = tmp_path / "evil.py"
    evil.write_text(f"import dataclasses, runpy\nSTUDY = dataclasses.replace(runpy.run_path({str(TINY)!r})"
                    "['STUDY'], name='../evil')\n")
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    for command in (["create", str(evil)], ["launch", str(evil), "--device", "cpu"]):
        result = runner.invoke(main, [*command, "--preset", "quick", "--storage", url, "-n", "2"])
        assert result.exit_code == 2, result.output
        assert "'../evil' is not allowed" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "k.db").exists()  # nothing stored
    # With --study-name the file's own name is still refused: it is stored as the study's spec.
    named = runner.invoke(main, ["create", str(evil), "--preset", "quick", "--storage", url, "-n", "2",
                                 "--study-name", "fine"])
    assert named.exit_code == 2 and "'../evil' is not allowed" in named.output, named.output


def test_rm_deletes_a_stored_study_whose_name_is_not_allowed(tmp_path: Path) -> None:
    """A name stored before names were checked (or by plain Optuna) can still be deleted, and
    rm never follows it out of the artifacts folder."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    optuna.create_study(study_name="../evil", storage=open_storage(url, heartbeat=False))
    optuna.create_study(study_name="good", storage=open_storage(url, heartbeat=False))
    outside = tmp_path / "evil"  # kdsweep-artifacts/../evil, had rm followed the name
    outside.mkdir()
    (outside / "precious").write_text("x")
    runner = CliRunner()
    listed = runner.invoke(main, ["ls", "--storage", url])
    assert listed.exit_code == 0 and "../evil" in listed.output, listed.output
    removed = runner.invoke(main, ["rm", "../evil", "--storage", url, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert storage.study_names(open_storage(url, heartbeat=False)) == ["good"]
    assert (outside / "precious").exists()


# ---------------------------------------------------------------- staleness on the server's clock


@pytest.fixture
def skewed_clock(monkeypatch: pytest.MonkeyPatch):
    """Set this process's wall clock (as Optuna's storage reads it, and time.time) `skew` seconds
    off; the database's own clock (SQLite's C library, the PostgreSQL server) is left as it is."""
    import datetime as real

    import optuna.storages._rdb.storage as rdb_module

    original = real.datetime

    def skew(seconds: float) -> None:
        class Skewed(original):
            @classmethod
            def now(cls, tz=None):  # noqa: ANN001, ANN206
                return original.now(tz) + real.timedelta(seconds=seconds)

        monkeypatch.setattr(rdb_module, "datetime", Skewed)  # what stamps a trial's start
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + seconds)

    return skew


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("skew_s", [-3600.0, 0.0, 3600.0])
def test_dead_workers_are_judged_on_the_database_clock(backend: str, skew_s: float, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, skewed_clock,
                                                       request: pytest.FixtureRequest) -> None:
    """A worker's clock an hour behind or ahead changes nothing: a trial just taken is alive, one
    silent for a grace period is dead, with or without a heartbeat yet."""
    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "2")
    url = f"sqlite:///{tmp_path / 'clock.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    st = open_storage(url)
    study = optuna.create_study(study_name="clock", storage=st)
    skewed_clock(skew_s)
    for _ in range(2):
        study.enqueue_trial({})
    silent, beating = (t._trial_id for t in study.get_trials(deepcopy=False))
    for trial_id in (silent, beating):  # taken by a worker with this clock (Optuna stamps its start)
        assert st.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    st.record_heartbeat(beating)
    assert storage.dead_trial_ids(st, study._study_id) == []  # just taken: alive
    deadline = time.monotonic() + 20
    while (dead := storage.dead_trial_ids(st, study._study_id)) != [silent]:
        assert dead == [] and time.monotonic() < deadline, dead  # the beating one is never dead
        st.record_heartbeat(beating)
        time.sleep(0.3)
    while (dead := storage.dead_trial_ids(st, study._study_id)) != [silent, beating]:
        assert dead == [silent] and time.monotonic() < deadline + 10, dead  # it stopped beating
        time.sleep(0.3)
