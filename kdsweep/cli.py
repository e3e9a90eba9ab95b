"""The kdsweep command line: each command parses, opens one handle (a `Sweep` or a storage),
makes one call and prints. Options also come from the environment (KDSWEEP_<OPTION>). Exit
codes: 0 ok, 1 runtime failure, 2 usage error, 75 stopped short of N (--timeout, `kdsweep stop`:
the same command finishes the study), 130 interrupted. Nothing heavy is imported at
module level, so `--help` and usage errors answer without torch or Optuna (`cli_startup_s`).
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
from pathlib import Path

import click

import kdsweep
from kdsweep.cli_options import (
    CONTEXT,
    DEFAULT_URL,  # noqa: F401  (kept importable from kdsweep.cli)
    check_data,
    dataset_option,
    echo_json,
    friendly,
    json_option,
    n_trials_option,
    open_storage,
    open_sweep,
    read_storage,
    redact,
    set_option,
    storage_option,
    sweep_options,
    track_option,
)
from kdsweep.cli_read import (
    COMMANDS as READ_COMMANDS,  # export, report, dashboard, tensorboard, studies
)


@click.group(context_settings=CONTEXT)
@click.version_option(kdsweep.__version__, prog_name="kdsweep")
@click.option("-v", "--verbose", count=True, help="More log lines (-vv: also Optuna's).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Hyperparameter sweeps for matched-budget MLP/CNN (q1) and knowledge distillation (q2).

    \b
    kdsweep launch q2 --preset smoke --n-trials 50 --workers 4
    kdsweep status q2
    kdsweep best q2 -o best.yaml
    """
    from kdsweep.core.progress import setup_logging

    ctx.obj = {"verbose": verbose, "quiet": quiet}
    setup_logging(verbose, quiet)
    # Exit without the interpreter's last garbage collections: with torch, Optuna and
    # SQLAlchemy loaded they walk ~400k objects for seconds (a worker stopped by Ctrl-C spent
    # 2-9 s there on a busy 2-core host, and launch waits for its workers). atexit runs the
    # newest first, so logging's own handler still flushes and closes the log files after it.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


for _command in READ_COMMANDS:
    main.add_command(_command)


# ---------------------------------------------------------------- launch / create / worker


@main.command()
@sweep_options
@set_option
@dataset_option
@n_trials_option
@click.option("-w", "--workers", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_WORKERS",
              help="Worker processes (default: GPUs x --trials-per-device, or 1 on CPU; env KDSWEEP_WORKERS).")
@click.option("--trials-per-device", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run at once on each GPU (small models cannot fill one).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_THREADS",
              help="CPU threads of each worker (default: cores // workers; env KDSWEEP_THREADS).")
@click.option("--fuse", type=click.IntRange(min=1), default=1, show_default=True,
              help="Q2: each worker trains K trials' students together in one fused model.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop after SECONDS (exit 75); the same command finishes the study.")
@click.option("--dry-run", is_flag=True,
              help="Print 4 sampled points: values, resolved widths, parameter count; needs no data, stores nothing.")
@click.option("--force", is_flag=True, help="Run a GPU preset on the CPU anyway.")
@track_option
@json_option
@friendly
def launch(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           overrides: tuple[str, ...], dataset: str | None, n_trials: int | None, workers: int | None,
           trials_per_device: int, threads: int | None, fuse: int, timeout: float | None, dry_run: bool,
           force: bool, track: str | None, as_json: bool) -> None:
    """Create or resume STUDY and run it with parallel workers until N trials finish.

    N counts COMPLETE + PRUNED trials; failed ones are replaced. Running the same command
    again resumes the study. Workers are pinned round-robin to the visible GPUs and share
    the CPU cores.

    \b
    kdsweep launch q2 --preset smoke --n-trials 50 --workers 4
    kdsweep launch q1 --preset smoke --dry-run
    kdsweep launch q1 --storage postgresql+psycopg://kd@db/kd --workers 8
    """
    from kdsweep.service import launch as launcher

    spec, changes = launcher.load_spec(study, preset, overrides)
    if not dry_run:  # a GPU preset on a CPU is a usage error: answered before any data is read
        launcher.check_device(device, spec.preset(preset).needs_gpu, preset, force)
    changes = launcher.with_dataset(spec, preset, changes, dataset, launcher.runtime("cpu", data, download))
    if dry_run:
        from kdsweep.service.preview import preview, preview_table

        points = preview(spec, preset, changes, launcher.runtime("cpu", data, download))
        click.echo(preview_table(spec.name, preset, changes, points))
        return
    sweep, final, how = launcher.launch(storage, spec, preset, changes, study_name, n_trials, seed, device, force,
                                        workers, trials_per_device, data, download, artifacts, tensorboard,
                                        timeout, _status_echo, threads=threads, fuse=fuse, track=track)
    if as_json:
        echo_json({**sweep.summary(), "ended": how})
    message, code = launcher.ending(sweep, final, how)
    if code == 1:
        raise click.ClickException(message)
    if message:
        click.echo(message)
    if code:
        sys.exit(code)


def _status_echo(line: str) -> None:
    """A status line; on a terminal it first clears the line, where a worker's progress bar may
    stand half-drawn (the bar redraws itself below), so the two never run together."""
    click.echo(("\r\x1b[K" if sys.stdout.isatty() else "") + line)


@main.command()
@sweep_options
@set_option
@dataset_option
@n_trials_option
@friendly
def create(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           overrides: tuple[str, ...], dataset: str | None, n_trials: int | None) -> None:
    """Create STUDY (or raise or lower its N) to finish N trials, without running workers.

    For many hosts: create once, then run `kdsweep worker` on each GPU host. N can be
    lowered while no more than N trials have finished or are running.

    \b
    kdsweep create q2 --storage postgresql+psycopg://kd@db/kd --n-trials 200
    """
    from kdsweep.service.launch import load_spec, runtime, with_dataset

    spec, changes = load_spec(study, preset, overrides)
    from kdsweep.service.sweep import Sweep  # after the checks: a usage error needs no Optuna

    # No preflight: the host that creates a study need not hold its data (npz/folder data is
    # read once here, to record its default augmentation).
    changes = with_dataset(spec, preset, changes, dataset, runtime(device, data, download))
    sweep = Sweep.create(open_storage(storage), spec, preset, study_name, n_trials, seed=seed, overrides=changes)
    c = sweep.counts()
    click.echo(f"study {sweep.name!r} (N={sweep.n_trials}): {c.waiting} waiting, {c.running} running, "
               f"{c.finished} finished")


@main.command()
@sweep_options
@click.option("--worker-index", type=int, default=0, help="Tags this worker's log lines (launch numbers its workers).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_THREADS",
              help="CPU threads of this worker (default: all cores; launch sets its share; env KDSWEEP_THREADS).")
@click.option("--fuse", type=click.IntRange(min=1), default=1, show_default=True,
              help="Q2: train K trials' students together in one fused model (one batch, one teacher lookup).")
@track_option
@friendly
def worker(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           worker_index: int, threads: int | None, fuse: int, track: str | None) -> None:
    """Join an existing study and run its waiting trials until none are left.

    The preset and --set overrides are read from the study itself; a worker whose study
    file or kdsweep version gives another definition refuses to join.

    \b
    KDSWEEP_STORAGE=postgresql+psycopg://kd@db/kd kdsweep worker q2
    """
    from kdsweep.core.progress import setup_logging
    from kdsweep.service import spec as specs
    from kdsweep.service.launch import runtime, start_worker
    from kdsweep.service.location import location
    from kdsweep.service.tensorboard import runs_root

    ctx = click.get_current_context()
    setup_logging(ctx.obj["verbose"], ctx.obj["quiet"], worker_index)
    spec = specs.load(study)
    given = ctx.get_parameter_source("preset") not in (click.core.ParameterSource.DEFAULT, None)
    study_name = study_name or spec.name
    summary = start_worker(
        open_storage(storage, wait=True), spec, study_name, preset if given else None, runtime(device, data, download, threads),
        location(storage).artifacts(study_name, artifacts), runs_root(storage) / study_name if tensorboard else None,
        worker_index, fuse=fuse, track=track)
    if summary.interrupted:
        sys.exit(130)


# ---------------------------------------------------------------- inspect / export


@main.command()
@click.argument("study_name")
@storage_option
@json_option
@friendly
def status(study_name: str, storage: str, as_json: bool) -> None:
    """Counts by state, the best trial, the trials running now, the last failures.

    \b
    kdsweep status q2
    kdsweep status q2 --json
    """
    sweep = open_sweep(storage, study_name)
    if as_json:
        echo_json(sweep.status())
    else:
        click.echo(sweep.status_text())
        if sweep.best_trial is not None:
            from kdsweep.service.verify import noise_summary

            for line in noise_summary(sweep):  # noise, selection bias, the alpha=0 reference
                click.echo(f"  {line}")


@main.command()
@click.argument("study_name")
@click.argument("number", type=int)
@storage_option
@json_option
@friendly
def trial(study_name: str, number: int, storage: str, as_json: bool) -> None:
    """One trial: parameters, config, curve, state and reason, timings, seed, host, files.

    \b
    kdsweep trial q2 29
    kdsweep trial q2 29 --json
    """
    from kdsweep.service.inspect import trial_record, trial_text

    record = trial_record(open_sweep(storage, study_name), number)
    if as_json:
        echo_json(record)
    else:
        click.echo(trial_text(record))


@main.command("ls")
@storage_option
@json_option
@friendly
def list_sweeps(storage: str, as_json: bool) -> None:
    """The studies in a storage: counts, N, best value, last activity.

    \b
    kdsweep ls --storage sqlite:///sweeps/kd.db
    kdsweep ls --json
    """
    from kdsweep.service.sweep import all_sweeps

    rows = [s.summary() for s in all_sweeps(read_storage(storage))]
    if as_json:
        echo_json(rows)
        return
    from kdsweep.service.inspect import ls_table

    click.echo(ls_table(rows) if rows else f"no studies in {redact(storage)}.")


@main.command()
@click.argument("study_name")
@storage_option
@click.option("--artifacts", default=None, metavar="DIR", envvar="KDSWEEP_ARTIFACTS",
              help="Where its checkpoints and kept weights are (default: beside the SQLite file).")
@click.option("--logdir", default=None, metavar="DIR", help="Root of its TensorBoard runs (default: runs/ beside the SQLite file).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly
def rm(study_name: str, storage: str, artifacts: str | None, logdir: str | None, yes: bool) -> None:
    """Delete a study, its verify and baseline siblings, their checkpoints, runs and kept weights.

    \b
    kdsweep rm q2            # asks first
    kdsweep rm q2 --yes
    """
    from kdsweep.service.inspect import remove_files, rm_question, study_folders

    sweep = open_sweep(storage, study_name, write=True)
    folders = study_folders(storage, study_name, artifacts, logdir)
    if not yes:
        click.confirm(f"delete {rm_question(sweep, [f for f in folders if f.exists()])}?", abort=True)
    names = sweep.delete()
    remove_files(folders)
    click.echo(f"deleted {', '.join(names)} and their files.")


@main.command()
@click.argument("study_name")
@storage_option
@friendly
def stop(study_name: str, storage: str) -> None:
    """Drain a study: every worker, on every host, re-queues its running trial and leaves.

    Workers read the flag at their next heartbeat (KDSWEEP_HEARTBEAT, 10 s), so they stop
    within seconds without a database read per batch; `launch` or `create` resumes the study.

    \b
    kdsweep stop q2
    """
    running = open_sweep(storage, study_name, write=True).request_stop()
    click.echo(f"study {study_name!r} stopped: {running} running trial(s) will be re-queued within a "
               "heartbeat and their workers leave; `kdsweep launch` resumes it.")


@main.command()
@click.argument("study_name")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default=None,
              help="yaml or json (default: from the -o suffix, .json for JSON; else yaml).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write here instead of standard output.")
@click.option("--weights", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the winning trial's kept weights, with its config, to this file.")
@click.option("--verify", "verify_", is_flag=True,
              help="Race the top configs over fresh seeds (in STUDY_NAME.verify) and compare them paired.")
@click.option("--grid", is_flag=True, help="With --verify: a fixed grid (--top configs x --seeds) instead of a race.")
@click.option("--max-seeds", type=click.IntRange(min=3), default=8, show_default=True, help="Race rounds at most.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Seeds per config (--grid).")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Configs at most (default: race 8, grid 3).")
@click.option("-w", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes that run the --verify trials here.")
@click.option("--device", default="auto", show_default=True, help="Device of the --verify workers.")
@click.option("--data", default=None, metavar="DIR", callback=check_data,
              help="Data folder of the --verify workers.")
@click.option("--no-run", is_flag=True,
              help="With --verify: only queue the next runs (for `kdsweep worker --study-name STUDY_NAME.verify` elsewhere).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@friendly
def best(study_name: str, storage: str, fmt: str | None, output: str | None, weights: str | None,
         verify_: bool, grid: bool, max_seeds: int, seeds: int, top: int | None, workers: int, device: str,
         data: str | None, no_run: bool, as_json: bool) -> None:
    """Export the winning trial as a complete, runnable config, or verify it over seeds.

    Once verified, the winner is the verified one. With no complete trial yet it exits 1.

    \b
    kdsweep best q2 -o best.yaml && kdsweep train --config best.yaml
    kdsweep best q2 --verify              # race the top configs on fresh seeds
    kdsweep best q2 --verify --grid --seeds 5 --top 3
    """
    from kdsweep.service import verify, verifying

    sweep = open_sweep(storage, study_name, write=verify_)
    if sweep.best_trial is None:  # a runtime state, not a usage error: exit 1 in both cases
        raise click.ClickException(f"study {study_name!r} has no complete trial yet; run `kdsweep launch` first.")
    if verify_:
        click.echo(verifying.run(sweep, storage, top, seeds, workers, device, data, click.echo,
                                 start_workers=not no_run, grid=grid, max_seeds=max_seeds))
        return
    doc, trial, notes = verify.export(sweep)
    for line in notes:  # the verification, noise, selection bias, the alpha=0 reference, which winner
        click.echo(line, err=True)
    if weights:
        from kdsweep.service.weights import export_weights

        export_weights(trial, doc, Path(weights))
        click.echo(f"weights from trial {trial.number}'s sweep run (seed {doc['seed']}) written to {weights}", err=True)
    from kdsweep.service.inspect import dump

    text = dump(doc, "json" if as_json else fmt, output)
    if output:
        Path(output).write_text(text)
        click.echo(f"trial {doc['trial']} ({doc['metric']} {doc['value']:.4f}) written to {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="YAML or JSON: an export of `kdsweep best`, or a bare config.")
@click.option("--device", default=None, help="Override the config's device.")
@click.option("--data", default=None, metavar="DIR", callback=check_data, help="Data folder (env KDSWEEP_DATA).")
@click.option("--seed", type=int, default=None, help="Override the config's seed.")
@friendly
def train_cmd(config_file: str, device: str | None, data: str | None, seed: int | None) -> None:
    """Train one config and report validation and test accuracy.

    \b
    kdsweep train --config best.yaml --device cuda
    """
    from kdsweep.core import install

    install.check()  # before torchvision is needed deep inside training
    from kdsweep.core.config import read_config, replace
    from kdsweep.core.teacher import prepare
    from kdsweep.core.train import train
    from kdsweep.service.inspect import swept_value

    changes = {k: v for k, v in (("device", device), ("data.root", data), ("seed", seed)) if v is not None}
    config = replace(read_config(config_file), evaluate_test=True, **changes)
    swept = swept_value(config_file)  # (study, trial, value) of an export of `kdsweep best`
    click.echo(f"training {config.model.arch} for {config.epochs} epochs on {config.data.dataset} "
               f"(device {config.device}){f', as trial {swept[1]} of {swept[0]!r}' if swept else ''}...", err=True)
    result = train(config, teacher=prepare(config))
    sweep_said = f"  (the sweep's: val_acc {swept[2]:.4f})" if swept else ""
    click.echo(f"val_acc {result.final_val_acc:.4f}{sweep_said}  test_acc {result.test_acc:.4f}  "
               f"params {result.params:,}  {result.wall_time:.1f}s  {result.images_per_s:.0f} img/s")


@main.command()
@click.argument("study_name")
@click.argument("values", nargs=-1)
@storage_option
@click.option("--baselines", is_flag=True, help="Enqueue the study file's known points (e.g. Hinton's).")
@click.option("--study", "study_file", default=None, help="Study file or name (default: from the study).")
@friendly
def enqueue(study_name: str, values: tuple[str, ...], storage: str, baselines: bool, study_file: str | None) -> None:
    """Add known points to a study, checked against its search space.

    An enqueued point takes the place of a trial of N not yet started, so the study still
    finishes N trials; once all N have started, it runs in addition to them.

    \b
    kdsweep enqueue q2 kd.alpha=0.9 kd.temperature=10
    kdsweep enqueue q2 --baselines
    """
    from kdsweep.service import space as sp
    from kdsweep.service import spec as specs

    sweep = open_sweep(storage, study_name, write=True)
    sweep.spec = specs.load(study_file or sweep.spec_name)
    points = ([dict(p) for p in sweep.spec.baselines] if baselines else []) + ([sp.parse_point(values)] if values else [])
    if not points:
        raise click.UsageError("give key=value pairs or --baselines.")
    for p in sweep.enqueue(points):  # every point checked before any is stored
        click.echo(f"enqueued {json.dumps(p)}")


if __name__ == "__main__":
    main()
