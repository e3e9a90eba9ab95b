"""The README and the manual say what the code does: generated references, and examples that run.

Every shell line of README.md and docs/ that calls kdsweep is checked: the tutorial's lines run
for real on the tiny study; the lines that would train for minutes (paper presets, the main job)
run with `--dry-run` (listed in DRY_RUN, by their text); every other one is parsed by the real
click commands, so an option that does not exist, a bad type or a bad choice fails here. Lines
that are not kdsweep are listed in NOT_RUN with the reason, or checked against `.ci/run`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
TUTORIAL = DOCS / "tutorial.md"
STUDY_FILE_PAGE = DOCS / "howto" / "study-file.md"

# Lines that would train for minutes or need a GPU: run with --dry-run (samples 4 points,
# resolves them, stores nothing, needs no data).
DRY_RUN = {
    "kdsweep launch q2 --preset smoke --n-trials 50 --workers 4",
    "kdsweep launch q1 --preset smoke -n 50 -w 2",
    "kdsweep launch q1 --preset paper --n-trials 200",
    "CUDA_VISIBLE_DEVICES=0,1 kdsweep launch q2 --preset paper -w 4",
    "kdsweep launch mystudy.py --preset quick --dry-run",
    "kdsweep launch mystudy.py --preset quick -n 20 -w 2",
}

# Shell commands that are not kdsweep, by their first word, and why this file does not run them.
NOT_RUN = {
    "python3": "the install: `.ci/run` runs it on every clean clone (checked below)",
    "pip": "the install: `.ci/run` runs it on every clean clone",
    ".venv/bin/pip": "the install: `.ci/run` runs it on every clean clone",
    ".venv/bin/ruff": "the README's test command: `.ci/run` runs it verbatim (checked below)",
    ".venv/bin/pytest": "the README's test command: `.ci/run` runs it verbatim (checked below)",
    "sudo": "needs a PostgreSQL server's administrator",
    "export": "sets an environment variable for the lines after it",
    "source": "reads the user's own environment file",
    "cp": "copies the compose file's example settings",
    "docker": "needs docker; `.ci/run` checks the compose file with `docker compose config`",
    "for": "a shell loop over the GPUs of a host (its kdsweep line is parsed)",
    "done": "the end of that loop",
    "wait": "the end of that loop",
    "cat": "shows a file",
    "ls": "lists a folder",
    "mlflow": "starts an MLflow server; tests/test_tracking.py starts a real one",
}

# The README's test command, which `.ci/run` must run verbatim.
TEST_COMMAND = ".venv/bin/ruff check . && .venv/bin/pytest -q"


def fenced(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of a Markdown page."""
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", path.read_text(), re.S | re.M)]


def shell_commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            part = re.sub(r"^(exec|do|then)(\s+|$)", "", part.strip())
            part = re.sub(r"\s*&$", "", part)
            if part:
                out.append(re.sub(r"^\.venv/bin/kdsweep\b", "kdsweep", part))
    return out


def is_kdsweep(command: str) -> bool:
    return bool(re.match(r"^(?:[A-Z_]+=\S+\s+)*kdsweep\s", command))


def all_shell_commands(pages: list[Path]) -> dict[str, Path]:
    found = {}
    for page in pages:
        for lang, text in fenced(page):
            if lang in ("bash", "sh", "shell"):
                for command in shell_commands(text):
                    found.setdefault(command, page)
    return found


# ---------------------------------------------------------------- the pages' own rules


def test_the_readme_is_a_front_door_of_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_relative_link_and_image_of_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(targets) > 10
    for target in targets:
        if not re.match(r"^[a-z]+://", target):
            assert (ROOT / target).exists(), target


def test_every_shell_command_of_the_docs_is_checked_or_listed():
    for command, page in all_shell_commands(PAGES).items():
        if is_kdsweep(command):
            continue
        assert command.split()[0] in NOT_RUN, (
            f"{page.relative_to(ROOT)}: `{command}` is neither kdsweep nor listed in NOT_RUN")


def test_every_dry_run_line_is_still_in_the_docs():
    assert DRY_RUN <= set(all_shell_commands(PAGES)), DRY_RUN - set(all_shell_commands(PAGES))


def test_the_ci_script_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in readme and TEST_COMMAND in ci
    assert "mkdocs build --strict" in ci


def _parse(command: str) -> None:
    """Parse a kdsweep line with the real click commands, without running it."""
    from kdsweep.cli import main

    words = shlex.split(re.sub(r"\$\{?\w+\}?|\$\([^)]*\)", "0", command))
    while "=" in words[0]:
        words.pop(0)
    assert words[0] == "kdsweep" and words[1] in main.commands, command
    root = click.Context(main, info_name="kdsweep", **main.context_settings)
    with root:
        main.commands[words[1]].make_context(words[1], words[2:], parent=root).close()


def _kdsweep_lines() -> list[str]:
    return sorted(c for c in all_shell_commands(PAGES) if is_kdsweep(c))


@pytest.mark.parametrize("command", _kdsweep_lines())
def test_every_kdsweep_line_of_the_docs_parses(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.yaml").write_text("config: {}\n")  # `train --config` wants an existing file
    monkeypatch.setenv("KDSWEEP_STUDIES", str(tmp_path))
    try:
        _parse(command)
    except click.ClickException as exc:
        pytest.fail(f"`{command}`: {exc.format_message()}")


# ---------------------------------------------------------------- generated references


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_has_every_command_and_option():
    hooks = _hooks()
    page = hooks.cli_reference()
    for name, cmd in hooks.commands().items():
        assert f"## kdsweep {name}\n" in page
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[-1] in page, (name, param.opts)


def test_every_config_key_has_a_meaning_and_every_number_a_unit():
    from kdsweep.core.config import describe

    rows = list(describe())
    assert len(rows) > 40
    for key, kind, _default, unit, doc in rows:
        assert doc, f"{key} has no doc in its field metadata"
        if re.search(r"\b(int|float)\b", kind):
            assert unit, f"{key} ({kind}) has no unit in its field metadata"
    page = _hooks().config_reference()
    assert all(f"`{key}`" in page for key, *_ in rows)


def test_the_stored_keys_page_has_every_key():
    from kdsweep.service import keys

    page = _hooks().keys_reference()
    values = [v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)]
    assert len(values) > 30
    for value in values:
        assert f"`{value}`" in page, value


def test_the_bad_input_table_has_every_case_of_its_test():
    page = _hooks().bad_input_table()
    cases = re.findall(r"^\s*Case\(\s*\"", (ROOT / "tests" / "test_bad_input.py").read_text(), re.M)
    rows = [ln for ln in page.splitlines() if re.match(r"^\| .* \| [0-9]+ \|$", ln)]
    assert len(cases) > 20 and len(rows) == len(cases)


def test_the_exit_codes_page_states_the_codes_the_cli_uses():
    page = _hooks().exit_codes()
    for code in ("0", "1", "2", "75", "130"):
        assert f"| {code} | " in page


def test_the_benchmarks_page_has_every_stored_entry_with_its_date():
    import json

    page = _hooks().benchmarks_page()
    for name in ("results.json", "results-gpu.json"):
        doc = json.loads((ROOT / "benchmarks" / name).read_text())
        assert doc["machine"]["date_utc"] in page
        for entry in doc["entries"]:
            assert (f"`{entry['name']}` ({entry['skipped']})" if entry.get("skipped") else
                    f"### {entry['name']}\n") in page


def test_the_environment_variables_the_manual_lists_exist_in_the_code():
    page = (DOCS / "reference" / "cli.md").read_text()
    code = "\n".join(p.read_text() for p in (ROOT / "kdsweep").rglob("*.py"))
    for name in re.findall(r"^\| `(KDSWEEP_\w+)` \|", page, re.M):
        assert name in code, name


def test_a_page_asking_for_an_unknown_generated_part_fails():
    with pytest.raises(KeyError, match="unknown generated part 'nothing'"):
        _hooks().render("<!-- generate: nothing -->\n")


# ---------------------------------------------------------------- examples that run


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "KDSWEEP_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _kdsweep(tmp: Path) -> None:
    """A `kdsweep` on PATH that runs this checkout's package."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "kdsweep"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m kdsweep \"$@\"\n")
    script.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(DRY_RUN))
def test_long_examples_run_as_dry_runs(command, tmp_path):
    _kdsweep(tmp_path)
    python = [text for lang, text in fenced(STUDY_FILE_PAGE) if lang == "python"]
    (tmp_path / "mystudy.py").write_text(python[0])
    line = command if "--dry-run" in command else command + " --dry-run"
    env = {**_env(tmp_path), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(tmp_path.glob("*.db")), "a dry run stored something"


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    """Every bash block of the tutorial, in order, in a fresh folder (tests/ linked in)."""
    _kdsweep(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    script = "set -euo pipefail\n" + "\n".join(t for lang, t in fenced(TUTORIAL) if lang == "bash")
    env = {**_env(tmp_path), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "[8/8]" in out  # the launch finished its N, as the tutorial says
    assert (tmp_path / "best.yaml").exists() and (tmp_path / "report" / "summary.md").exists()
    assert re.search(r"val_acc 0\.\d+ .*test_acc 0\.\d+", out)  # train --config's line


@pytest.mark.slow
def test_the_python_example_of_the_training_core_runs(tmp_path):
    code = [text for lang, text in fenced(DOCS / "core.md") if lang == "python"][0]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_python_block_of_the_docs_compiles():
    for page in PAGES:
        for lang, text in fenced(page):
            if lang == "python":
                compile(text, str(page), "exec")
