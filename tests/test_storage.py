"""Storage: passwords never leak, heartbeat settings, safe loading, the dashboard's bind address,
and the docker-compose file.

The leak test runs a real sweep against the throwaway PostgreSQL cluster (password
authentication) and searches everything it produced for the password: the launch's output
(progress and the workers' logs), `status`, `best` (printed and exported), TensorBoard event
files, every row the storage holds, and the workers' command lines.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from click.testing import CliRunner
from pgcluster import Cluster, free_port, pg_cluster, wait_until  # noqa: F401

from kdsweep.cli import main
from kdsweep.service import storage
from kdsweep.service.storage import StorageError, open_storage, password_of, redact, redact_text

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
                children.setdefault(pid, (Path(f"/proc/{pid}/cmdline").read_bytes(),
                                          Path(f"/proc/{pid}/environ").read_bytes()))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out, _ = launch.communicate(timeout=150)
    assert launch.returncode == 0, out[-3000:]
    assert len(children) == 2
    for cmdline, environ in children.values():
        assert password.encode() not in cmdline and b"worker" in cmdline
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

    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def down() -> None:
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("server closed"))

    with pytest.raises(StorageError, match=r"did not answer get_trial after 2 retries"):
        storage._retrying(down, "get_trial")()
    assert len(calls) == 3

    def broken() -> None:  # not a connection problem: raised at once, never retried
        calls.append(1)
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate"))

    calls.clear()
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        storage._retrying(broken, "add_trial")()
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
