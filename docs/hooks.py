"""MkDocs hook: the reference pages are generated from the code at build time.

A page asks for a generated part with a line `<!-- generate: NAME -->`; `GENERATORS` lists the
names. Each generator reads the code (or the stored benchmark results) itself, so a page cannot
drift from what it describes. Nothing here reaches the network.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def _root_on_path() -> None:
    """Make this checkout's `kdsweep` and `benchmarks` importable. MkDocs restores sys.path
    after loading a hook module, so this runs when a page is rendered, not at import."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


_root_on_path()  # the tests import this module directly

MARK = re.compile(r"^<!-- generate: ([a-z-]+) -->$", re.M)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the command line


def _help_markdown(text: str) -> str:
    """click help text as Markdown: `\\b` paragraphs (examples) become code blocks."""
    out = []
    for para in re.split(r"\n\s*\n", (text or "").strip()):
        lines = [ln.strip() for ln in para.splitlines()]
        if lines and lines[0] == "\b":
            out.append("```bash\n" + "\n".join(lines[1:]) + "\n```")
        else:
            out.append(" ".join(lines))
    return "\n\n".join(out)


def _envvar(param: click.Option, ctx: click.Context) -> str:
    if param.envvar:
        return ", ".join(param.envvar) if isinstance(param.envvar, list | tuple) else param.envvar
    if param.allow_from_autoenv and ctx.auto_envvar_prefix and param.name:
        return f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
    return ""


def commands() -> dict[str, click.Command]:
    """Every command registered on the `kdsweep` group, by name."""
    from kdsweep.cli import main

    return dict(sorted(main.commands.items()))


def cli_reference() -> str:
    """One section per registered command: usage, its help, every option."""
    from kdsweep.cli import main

    root = click.Context(main, info_name="kdsweep", **main.context_settings)
    parts = ["Every option can also come from the environment variable in its row. Global options, before the command: " +
             ", ".join(f"`{' / '.join(p.opts)}` ({p.help})" for p in main.params
                       if isinstance(p, click.Option) and p.help) + "."]
    for name, cmd in commands().items():
        ctx = click.Context(cmd, info_name=name, parent=root)
        usage = " ".join(["kdsweep", name, *cmd.collect_usage_pieces(ctx)])
        parts.append(f"## kdsweep {name}\n\n```text\n{usage}\n```\n\n{_help_markdown(cmd.help or '')}")
        rows = []
        for param in cmd.get_params(ctx):
            if isinstance(param, click.Argument):
                rows.append([f"`{param.human_readable_name}`", "argument", ""])
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                env = _envvar(param, ctx)
                rows.append([f"`{record[0].replace('|', '/')}`", record[1], f"`{env}`" if env else ""])
        parts.append(_table(["option", "meaning", "environment"], rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- configuration and stored keys


def config_reference() -> str:
    from kdsweep.core.config import describe

    rows = [[f"`{key}`", f"`{kind}`", f"`{default}`", unit, doc] for key, kind, default, unit, doc in describe()]
    return ("Every key of a `TrainConfig` (`kdsweep/core/config.py`), as `--set KEY=VALUE` and an "
            "exported config name it, with its type, default and unit (generated from the "
            "dataclasses' field metadata).\n\n" + _table(["key", "type", "default", "unit", "meaning"], rows))


def keys_reference() -> str:
    """The stored keys of `kdsweep/service/keys.py`: its sections, names, values and comments."""
    source = (ROOT / "kdsweep" / "service" / "keys.py").read_text()
    sections: list[tuple[str, list[list[str]]]] = []
    pending: list[str] = []
    for line in source.splitlines():
        if line.startswith("# ----"):
            sections.append((line.strip("# -").strip(), []))
            pending = []
            continue
        if line.startswith("#"):
            pending.append(line.lstrip("# ").strip())
            continue
        m = re.match(r"^([A-Z_]+) = (.+?)(?:\s+#\s*(.*))?$", line)
        if not m:
            pending = []
            continue
        name, value, comment = m.groups()
        meaning = " ".join([*pending, comment or ""]).strip()
        pending = []
        if not sections:
            sections.append(("constants", []))
        sections[-1][1].append([f"`{ast.literal_eval(value)}`", f"`{name}`", meaning])
    parts = ["What kdsweep stores in an Optuna study beyond Optuna's own records, generated from "
             "`kdsweep/service/keys.py`. These names are database keys: they are never renamed."]
    for title, rows in sections:
        parts.append(f"## {title[0].upper() + title[1:]}\n\n" + _table(["stored key", "name in keys.py", "meaning"], rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- errors


def _usage_error_classes() -> str:
    from kdsweep import cli_options

    def names(pairs: tuple[tuple[str, str], ...]) -> str:
        return ", ".join(f"`{cls}` ({mod})" for mod, cls in pairs)

    return (f"Usage errors (exit 2): click's own and {names(cli_options.USAGE_ERRORS)}. Runtime "
            f"errors (exit 1): {names(cli_options.RUNTIME_ERRORS)}.")


def exit_codes() -> str:
    """The exit codes as the command line's own docstring states them (`kdsweep/cli.py`)."""
    import kdsweep.cli

    doc = " ".join((kdsweep.cli.__doc__ or "").split())
    m = re.search(r"Exit codes: (.*?)\.(?:\s|$)", doc)
    if not m:
        raise ValueError("kdsweep/cli.py's docstring no longer states its exit codes ('Exit codes: 0 ..., 1 ...').")
    codes = re.findall(r"(\d+) ((?:[^,(]|\([^)]*\))+)", m.group(1))
    return _table(["exit code", "meaning"], [[code, text.strip()] for code, text in codes])


def bad_input_table() -> str:
    """The cases of tests/test_bad_input.py: what was given, the message it gets, the exit code."""
    tree = ast.parse((ROOT / "tests" / "test_bad_input.py").read_text())
    rows = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Case"):
            continue
        args = {i: a for i, a in enumerate(node.args)} | {k.arg: k.value for k in node.keywords}
        name, fragment, code = args.get(0, args.get("name")), args.get(2, args.get("fragment")), args.get(3, args.get("code"))
        try:
            rows.append([ast.literal_eval(name), f"`{ast.literal_eval(fragment)}`", ast.literal_eval(code)])
        except ValueError:
            continue
    return (_usage_error_classes() + "\n\nThe bad inputs below are each run for real by "
            "`tests/test_bad_input.py`, which also checks that no traceback is printed and that "
            "nothing stored changed. The message column is the part of the sentence the test "
            "looks for.\n\n" + _table(["input", "the message says", "exit code"], rows))


# ---------------------------------------------------------------- benchmarks


def _machine(meta: dict) -> str:
    keys = ("cpu", "cores", "gpu", "python", "torch", "device", "date_utc", "suite_s", "quick", "complete")
    return ", ".join(f"{k} {meta[k]}" for k in keys if k in meta)


def benchmarks_page() -> str:
    """Every stored result of `python -m benchmarks`, with its machine, date and conditions."""
    from benchmarks import report

    parts = []
    for name, title in (("results.json", "CPU results"), ("results-gpu.json", "GPU results")):
        path = ROOT / "benchmarks" / name
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        meta = doc.get("machine", {})
        measured = [e for e in doc["entries"] if not e.get("skipped")]
        skipped = [e for e in doc["entries"] if e.get("skipped")]

        def when(e: dict, run: str = meta.get("date_utc", "?")) -> str:
            return e.get("date_utc") or f"≤ {run}"

        rows = []
        for e, r in zip(measured, report.rows(measured), strict=True):
            rows.append([f"[{e['name']}](#{e['name']})", f"{r[1]} {r[2]}", r[3], r[4], r[5], r[6], when(e)])
        parts.append(f"## {title}\n\nFrom `benchmarks/{name}`. Machine: {_machine(meta)}. An entry "
                     "with no date of its own (≤) ran in that run or before it (entries are merged into "
                     "the file by name).\n\n" +
                     _table(["entry", "value", "baseline", "ratio", "goal", "met", "measured (UTC)"], rows))
        if skipped:
            parts.append("Not measured in this file: " + "; ".join(
                f"`{e['name']}` ({e['skipped']})" for e in skipped) + ".")
        for e in measured:
            cond = f"Measured {when(e)} UTC"
            if e.get("load_avg"):
                cond += f", load average {e['load_avg']} (1, 5, 15 min) at its end"
            if e.get("wall_s") is not None:
                cond += f", {e['wall_s']} s wall"
            body = json.dumps(report._brief(e.get("details") or {}), indent=1, default=str)
            parts.append(f"### {e['name']}\n\n{report.WHAT.get(e['name'], '')}\n\n{cond}.\n\n"
                         f"```json\n{body}\n```")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- the shipped studies


def studies_page() -> str:
    """Each study file of studies/: its docstring, search space and presets."""
    from kdsweep.service import spec as specs

    parts = []
    for path in sorted((ROOT / "studies").glob("*.py")):
        study = specs.load(str(path))
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        rows = []
        for p in study.space:
            d = p.describe()
            values = (", ".join(map(str, d["choices"])) if d["type"] == "categorical" else
                      f"{d['low']} .. {d['high']}" + (" (log)" if d.get("log") else ""))
            when = "; ".join(f"{k} in {v}" for k, v in d["when"].items())
            rows.append([f"`{p.name}`", d["type"], values, f"`{d['target']}`", when])
        presets = [[f"`{name}`", pr.description, "yes" if pr.needs_gpu else ""]
                   for name, pr in study.presets.items()]
        parts.append(f"## {study.name}\n\n`{path.relative_to(ROOT)}`: {study.description}\n\n"
                     "```text\n" + doc + "\n```\n\n### Search space\n\n" +
                     _table(["parameter", "type", "values", "sets", "only when"], rows) +
                     "\n\n### Presets\n\n" + _table(["preset", "what", "needs a GPU"], presets))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- the changelog


def changelog() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    return text.split("\n", 1)[1] if text.startswith("# ") else text  # the page has its own title


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "config": config_reference,
    "keys": keys_reference,
    "exit-codes": exit_codes,
    "bad-input": bad_input_table,
    "benchmarks": benchmarks_page,
    "studies": studies_page,
    "changelog": changelog,
}


def render(markdown: str) -> str:
    """The page with every `<!-- generate: NAME -->` line replaced by its generated Markdown."""

    def one(m: re.Match) -> str:
        if m.group(1) not in GENERATORS:
            raise KeyError(f"unknown generated part {m.group(1)!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[m.group(1)]()

    return MARK.sub(one, markdown)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    _root_on_path()
    return render(markdown)
