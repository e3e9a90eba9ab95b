"""The kdsweep commands that show a study to people and programs: `export` (a table), `report`
(figures), `dashboard` (optuna-dashboard), `tensorboard` and `studies`. Registered on the group
in kdsweep/cli.py; like every command they parse, open one handle, make one call and print.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kdsweep.cli_options import friendly, open_sweep, read_storage, redact, storage_option

COMMANDS: list[click.Command] = []


def command(*args, **kwargs):
    def register(fn):
        cmd = click.command(*args, **kwargs)(fn)
        COMMANDS.append(cmd)
        return cmd
    return register


@command("export")
@click.argument("study_name")
@storage_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="trials.csv, trials.parquet (needs pyarrow) or trials.jsonl: the suffix picks the format.")
@click.option("--all", "all_attempts", is_flag=True, help="Also the re-queued attempts (left out by default).")
@click.option("--verify", "with_verify", is_flag=True, help="Also the rows of the STUDY_NAME.verify sibling.")
@click.option("--baseline", "with_baseline", is_flag=True, help="Also the rows of the STUDY_NAME.baseline sibling (alpha=0).")
@friendly
def export(study_name: str, storage: str, output: str, all_attempts: bool, with_verify: bool,
           with_baseline: bool) -> None:
    """Write one row per trial: parameters, state, value and its standard error, epochs, wall
    time, FLOPs, parameter count, seed, host (no per-image masks). A read command.

    \b
    kdsweep export q2 -o trials.csv
    kdsweep export q2 -o trials.jsonl --verify --baseline
    """
    from kdsweep.service import export as ex

    ex.output_format(output)  # a bad suffix is a usage error before the storage is opened
    siblings = [k for k, on in (("verify", with_verify), ("baseline", with_baseline)) if on]
    df = ex.trials_table(open_sweep(storage, study_name), all_attempts, siblings)
    ex.write(df, output)
    click.echo(f"{len(df)} trials of {', '.join(sorted(set(df['study'])) or [study_name])} written to {output}")


@command()
@click.argument("study_name")
@storage_option
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to write (default: reports/STUDY_NAME).")
@friendly
def report(study_name: str, storage: str, out: str | None) -> None:
    """Write HTML and PNG figures and a markdown summary of a study.

    \b
    kdsweep report q2 -o reports/q2   # then open reports/q2/summary.md
    """
    from kdsweep.service import report as rep
    from kdsweep.service import verify

    sweep = open_sweep(storage, study_name)
    folder = Path(out) if out else Path("reports") / study_name
    files = rep.write_report(sweep, folder, verify.summary_text(sweep))
    for name, names in files.items():
        click.echo(f"{name:12s} {', '.join(names)}")
    click.echo(f"report written to {folder}/summary.md")


@command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@friendly
def dashboard(storage: str, host: str, port: int) -> None:
    """Serve optuna-dashboard on the storage.

    \b
    kdsweep dashboard --port 8080   # then open http://127.0.0.1:8080
    """
    from optuna_dashboard import run_server

    st = read_storage(storage)
    click.echo(f"optuna-dashboard on http://{host}:{port} for {redact(storage)}")
    run_server(st, host=host, port=port)


@command()
@click.argument("study_name")
@storage_option
@click.option("--logdir", default=None, metavar="DIR",
              help="Root of the event files (default: runs/ beside the SQLite file, else ./runs; env KDSWEEP_RUNS).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=6006, show_default=True)
@friendly
def tensorboard(study_name: str, storage: str, logdir: str | None, host: str, port: int) -> None:
    """Start TensorBoard on the study's runs (curves per epoch and the HParams tab).

    \b
    kdsweep tensorboard q2 --storage sqlite:///sweeps/kd.db
    """
    from kdsweep.service.tensorboard import runs_root, serve

    folder = runs_root(storage, logdir) / study_name
    if not folder.is_dir():
        raise click.UsageError(f"no TensorBoard runs in {folder}; give --logdir or the --storage the study ran on.")
    click.echo(f"TensorBoard on http://{host}:{port} for {folder}")
    sys.exit(serve(folder, host, port))


@command("studies")
@friendly
def list_studies() -> None:
    """List the study files kdsweep can find, with their presets.

    \b
    kdsweep studies
    """
    from kdsweep.service.inspect import studies_table

    click.echo(studies_table())
