"""The kdsweep command line: thin click commands over the library.

Every option can also come from the environment as KDSWEEP_<OPTION> (e.g. KDSWEEP_STORAGE,
KDSWEEP_WORKERS), which is how docker-compose and Slurm scripts configure workers.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import kdsweep
from kdsweep.core.config import ConfigError
from kdsweep.core.devices import DeviceError
from kdsweep.service.space import SpaceError
from kdsweep.service.spec import StudyError
from kdsweep.service.storage import DEFAULT_URL, StorageError, redact, redact_text

# The schemes kdsweep.service.storage.open_storage accepts; anything else is a usage error.
URL_PATTERN = re.compile(r"^(sqlite|postgresql|postgresql\+\w+|mysql\+\w+|mysql)://")
CONTEXT = {"auto_envvar_prefix": "KDSWEEP", "help_option_names": ["-h", "--help"], "max_content_width": 100}
USAGE_ERRORS = (StudyError, SpaceError, ConfigError, DeviceError)


def _runtime_errors() -> tuple[type[BaseException], ...]:
    from kdsweep.core.budget import BudgetError
    from kdsweep.core.data import DataError
    from kdsweep.core.resnets import ModelError
    from kdsweep.core.train import TrainingError

    return (StorageError, BudgetError, DataError, ModelError, TrainingError)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn kdsweep's own errors into one-sentence messages: exit 2 for usage, 1 otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        url = click.get_current_context().params.get("storage")
        try:
            return fn(*args, **kwargs)
        except USAGE_ERRORS as exc:
            raise click.UsageError(redact_text(str(exc), url)) from None
        except _runtime_errors() as exc:
            raise click.ClickException(redact_text(str(exc), url)) from None

    return wrapper


def _check_url(ctx: click.Context, param: click.Parameter, url: str) -> str:
    """A malformed storage URL is a usage error (exit 2), caught before anything is opened."""
    if not URL_PATTERN.match(url or ""):
        raise click.BadParameter(
            f"{redact(url)!r} is not a storage URL; use sqlite:///FILE.db or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB.", ctx, param)
    return url


def storage_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        # An explicit envvar: auto_envvar_prefix would read KDSWEEP_<COMMAND>_STORAGE instead,
        # and launch hands the URL (with its password) to workers through KDSWEEP_STORAGE.
        "--storage", default=DEFAULT_URL, show_default=True, metavar="URL", envvar="KDSWEEP_STORAGE",
        callback=_check_url,
        help="Optuna storage: sqlite:///FILE.db or postgresql+psycopg://USER:PASS@HOST/DB (env KDSWEEP_STORAGE).",
    )(fn)


def _setup_logging(verbose: int, quiet: bool, worker: int | None = None) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, force=True)
    from kdsweep.core.progress import install_log_format

    install_log_format(worker)  # "12:00:00 [w1 t12] ...": worker index and trial number
    logging.getLogger("kdsweep").setLevel(level)
    optuna_level = logging.WARNING if verbose < 2 else logging.INFO
    import optuna

    optuna.logging.set_verbosity(optuna_level)


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
    ctx.obj = {"verbose": verbose, "quiet": quiet}
    _setup_logging(verbose, quiet)


def _open(storage: str, heartbeat: bool = True, wait: bool = False):
    from kdsweep.service.storage import open_storage

    return open_storage(storage, heartbeat=heartbeat, wait=wait)


def _sqlite_path(storage: str) -> Path | None:
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        return Path(storage[len("sqlite:///"):]).expanduser()
    return None


def _load_existing(storage: str, study_name: str):
    """Load a sweep to read it; a missing SQLite file is reported, not created."""
    from kdsweep.service.storage import study_names
    from kdsweep.service.sweep import Sweep, SweepNotFound

    path = _sqlite_path(storage)
    if path is not None and not path.exists():
        raise click.UsageError(
            f"no study named {study_name!r}: the SQLite file {path} does not exist; "
            "pass the --storage the study was launched with."
        )
    st = _open(storage, heartbeat=False)
    try:
        return Sweep.load(st, study_name)
    except SweepNotFound:
        names = ", ".join(study_names(st)) or "none"
        raise click.UsageError(
            f"no study named {study_name!r} in {redact(storage)}; studies there: {names}."
        ) from None


def _runtime(device: str, data: str | None, download: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Per-host settings of a trial's config: device, data folder, CPU threads.

    `threads` is this process's share of the cores (launch gives each of W workers
    cores // W through KDSWEEP_THREADS); a worker started by hand takes every core.
    """
    from kdsweep.service.launch import cpu_cores

    runtime: dict[str, Any] = {"device": device, "threads": threads or cpu_cores()}
    if data:
        runtime["data.root"] = data
    if download:
        runtime["data.download"] = True
    return runtime


def _check_data(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--data is a folder: a dataset spec or a folder that does not exist is a usage error."""
    from kdsweep.core.data import DataError, check_root

    try:
        check_root(value, bool(ctx.params.get("download")))
    except DataError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _check_dataset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--dataset: a known name, or npz:FILE / folder:DIR that exists (made absolute)."""
    if value is None:
        return None
    name = value.strip()
    if name.lower() in ("cifar10", "cifar100", "fashion-mnist"):
        return name.lower()
    for prefix, exists in (("npz:", Path.is_file), ("folder:", Path.is_dir)):
        if name.startswith(prefix) and name[len(prefix):].strip():
            path = Path(name[len(prefix):].strip()).expanduser().resolve()
            if not exists(path):
                raise click.BadParameter(f"{path} does not exist; give {prefix}PATH of an existing "
                                         f"{'.npz file' if prefix == 'npz:' else 'folder'}.", ctx, param)
            return f"{prefix}{path}"
    raise click.BadParameter(f"unknown dataset {value!r}; use cifar10, cifar100, fashion-mnist, "
                             "npz:FILE or folder:DIR (a folder of images is --data's job only for "
                             "the named datasets).", ctx, param)


def dataset_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dataset", default=None, envvar="KDSWEEP_DATASET", callback=_check_dataset,
        help="Dataset instead of the preset's: cifar10, cifar100, fashion-mnist, npz:FILE or folder:DIR "
             "(env KDSWEEP_DATASET). Part of the study: its workers use it too.",
    )(fn)


def _with_dataset(study_def: Any, preset: str, overrides: dict[str, Any], dataset: str | None,
                  runtime: dict[str, Any]) -> dict[str, Any]:
    """The overrides with --dataset and that data's augmentation recorded in them.

    Another dataset than the preset's drops the preset's flips and shifts (made for its own
    data) for the new data's defaults unless --set gives them; unset ones become explicit, so
    the study's definition says what every trial does.
    """
    from kdsweep.core import data

    changes = dict(overrides)
    base = study_def.base_config(preset, changes).data
    if dataset and dataset != base.dataset:
        changes["data.dataset"] = dataset
        for key in ("data.pad", "data.flip"):
            changes.setdefault(key, None)
    base = study_def.config_for(preset, {}, changes, **runtime).data
    if base.pad is None or base.flip is None:
        pad, flip = data.default_augmentation(base.dataset, data.load_splits(base).in_shape)
        if base.pad is None:
            changes["data.pad"] = pad
        if base.flip is None:
            changes["data.flip"] = flip
    return changes


def _preflight(study_def: Any, preset: str, overrides: dict[str, Any], runtime: dict[str, Any]) -> list[str]:
    """Load the data a trial will read (the teacher's too) and check the teacher's settings, so
    any problem is one sentence before anything is stored; the launch header's lines."""
    from kdsweep.core import data, teacher
    from kdsweep.core.train import input_shape, resolve_data

    config = study_def.config_for(preset, {}, overrides, **runtime)
    splits = data.load_splits(config.data)
    config = resolve_data(config, splits)
    lines = [f"data: {data.describe(config.data, splits, input_shape(config, splits))}"]
    if config.kd is not None:
        lines.append(f"teacher: {teacher.preflight(config, splits)}")
    return lines


def _check_device(device: str, needs_gpu: bool, preset: str, force: bool) -> None:
    import torch

    from kdsweep.core.devices import resolve_device

    resolve_device(device)  # DeviceError for cuda without CUDA
    if needs_gpu and not torch.cuda.is_available() and not force:
        raise click.UsageError(
            f"preset {preset!r} is meant for a CUDA GPU and none is visible; "
            "use --preset smoke, or add --force to run it on the CPU anyway."
        )


def _artifacts(storage: str, study_name: str, artifacts: str | None) -> Path:
    if artifacts:
        base = Path(artifacts)
    elif storage.startswith("sqlite:///"):
        base = Path(storage[len("sqlite:///"):]).expanduser().resolve().parent / "kdsweep-artifacts"
    else:
        base = Path("kdsweep-artifacts")
    return base / study_name


# ---------------------------------------------------------------- launch / create / worker


def sweep_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("study"),
        storage_option,
        click.option("--preset", default="paper", show_default=True, envvar="KDSWEEP_PRESET",
                     help="Preset of the study file (env KDSWEEP_PRESET)."),
        click.option("--study-name", default=None, envvar="KDSWEEP_STUDY_NAME",
                     help="Name in the storage (default: STUDY; env KDSWEEP_STUDY_NAME)."),
        click.option("--data", default=None, metavar="DIR", envvar="KDSWEEP_DATA", callback=_check_data,
                     help="Folder that holds the named datasets' files (env KDSWEEP_DATA); the "
                          "dataset itself is --dataset."),
        click.option("--download", is_flag=True, is_eager=True,
                     help="Let torchvision download the dataset if missing."),
        click.option("--device", default="auto", show_default=True, envvar="KDSWEEP_DEVICE",
                     help="auto, cpu, cuda or cuda:N (env KDSWEEP_DEVICE)."),
        click.option("--seed", type=int, default=0, show_default=True, envvar="KDSWEEP_SEED",
                     help="Seed of the sampler (env KDSWEEP_SEED)."),
        click.option("--artifacts", default=None, metavar="DIR", envvar="KDSWEEP_ARTIFACTS",
                     help="Checkpoints and kept weights (default: beside the SQLite file; env KDSWEEP_ARTIFACTS). Share it between hosts."),
        click.option("--tensorboard/--no-tensorboard", default=True, show_default=True,
                     help="Write runs/<study>/trial-N event files."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def set_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE", envvar="KDSWEEP_SET",
        help="Override a setting of the preset (e.g. --set epochs=2 --set data.train_subset=500); "
             "recorded in the study, so its workers use it too.",
    )(fn)


N_TRIALS_HELP = ("COMPLETE + PRUNED trials the study ends with, across all workers (default: 50 for a "
                 "new study, the stored N on resume; env KDSWEEP_N_TRIALS).")


@main.command()
@sweep_options
@set_option
@dataset_option
@click.option("-n", "--n-trials", type=click.IntRange(min=1), default=None,
              envvar="KDSWEEP_N_TRIALS", help=N_TRIALS_HELP)
@click.option("-w", "--workers", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_WORKERS",
              help="Worker processes (default: GPUs x --trials-per-device, or 1 on CPU; env KDSWEEP_WORKERS).")
@click.option("--trials-per-device", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run at once on each GPU (small models cannot fill one).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop after SECONDS; re-run to finish.")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config and parameter count of 4 sampled points; store nothing.")
@click.option("--force", is_flag=True, help="Run a GPU preset on the CPU anyway.")
@friendly
def launch(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           overrides: tuple[str, ...], dataset: str | None, n_trials: int | None, workers: int | None,
           trials_per_device: int, timeout: float | None, dry_run: bool, force: bool) -> None:
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
    from kdsweep.service import spec as studies

    study_def = studies.load(study)
    p = study_def.preset(preset)
    changes = studies.parse_overrides(overrides)
    study_def.check_overrides(preset, changes)
    changes = _with_dataset(study_def, preset, changes, dataset, _runtime("cpu", data, download))
    study_def.space_for(preset, changes)
    study_name = study_name or study_def.name
    if dry_run:
        _dry_run(study_def, preset, changes, _runtime("cpu", data, download))
        return
    _check_device(device, p.needs_gpu, preset, force)
    if workers is None:
        gpus = launcher.visible_gpus() if device != "cpu" else []
        workers = len(gpus) * trials_per_device if gpus else 1
    header = _preflight(study_def, preset, changes, _runtime(device, data, download))
    from kdsweep.service.sweep import Sweep

    sweep = Sweep.create(_open(storage), study_def, preset, study_name, n_trials, seed=seed,
                         overrides=changes)
    click.echo(f"study {study_name!r} ({study_def.name}, preset {preset}) in {redact(storage)}: "
               f"{sweep.n_trials} trials, {workers} worker(s)")
    for line in header:
        click.echo(line)
    plans = launcher.plan_workers(workers, device, storage)
    args = [study_def.source, "--study-name", study_name]
    if data:
        args += ["--data", data]
    if download:
        args.append("--download")
    if artifacts:
        args += ["--artifacts", artifacts]
    if not tensorboard:
        args.append("--no-tensorboard")
    final, how = launcher.run(sweep, args, plans, click.echo, timeout=timeout)
    from kdsweep.service import baseline, report

    reference = baseline.prepare(sweep) if how == "done" else None
    if reference is not None:  # the student alone, outside N: one run, all of this host's cores
        baseline.run(reference, args, launcher.plan_workers(1, device, storage), click.echo)
    click.echo(sweep.summary_table())
    for line in report.noise_summary(sweep):
        click.echo(line)
    if how == "interrupted":
        click.echo("interrupted: run the same command again to finish the study.")
        sys.exit(130)
    if how == "timeout":
        click.echo("timeout: run the same command again to finish the study.")
        return
    if final.finished < (sweep.n_trials or 0):
        raise click.ClickException(
            f"the study has {final.finished} of {sweep.n_trials} finished trials after {final.failed} "
            "failures; see `kdsweep status` for their reasons."
        )


def _dry_run(study_def: Any, preset: str, overrides: dict[str, Any], runtime: dict[str, Any],
             points: int = 4) -> None:
    """Print the resolved config and parameter count of a few randomly sampled points."""
    import optuna

    from kdsweep.core.budget import BudgetError
    from kdsweep.core.config import to_dict
    from kdsweep.core.train import resolve
    from kdsweep.service import space as sp
    from kdsweep.service.objective import count_params

    space = study_def.space_for(preset, overrides)
    click.echo(f"study {study_def.name}, preset {preset}, overrides {json.dumps(overrides)}: "
               f"{len(space)} parameters: {', '.join(p.name for p in space)}")
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(points):
        params = sp.sample(probe.ask(), space)
        click.echo(f"--- point {i}: {json.dumps(params)}")
        try:
            config = resolve(study_def.config_for(preset, params, overrides, **runtime))
        except BudgetError as exc:
            click.echo(f"infeasible: {exc}")
            continue
        click.echo(f"parameters: {count_params(config):,}")
        click.echo(f"config: {json.dumps(to_dict(config))}")


@main.command()
@sweep_options
@set_option
@dataset_option
@click.option("-n", "--n-trials", type=click.IntRange(min=1), default=None,
              envvar="KDSWEEP_N_TRIALS", help=N_TRIALS_HELP)
@friendly
def create(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           overrides: tuple[str, ...], dataset: str | None, n_trials: int | None) -> None:
    """Create STUDY (or raise its N) to finish N trials, without running workers.

    For many hosts: create once, then run `kdsweep worker` on each GPU host.

    \b
    kdsweep create q2 --storage postgresql+psycopg://kd@db/kd --n-trials 200
    """
    from kdsweep.service import spec as studies
    from kdsweep.service.sweep import Sweep

    study_def = studies.load(study)
    changes = studies.parse_overrides(overrides)
    study_def.check_overrides(preset, changes)
    # No preflight: the host that creates a study need not hold its data (npz/folder data is
    # read once here, to record its default augmentation).
    changes = _with_dataset(study_def, preset, changes, dataset, _runtime(device, data, download))
    sweep = Sweep.create(_open(storage), study_def, preset, study_name, n_trials, seed=seed,
                         overrides=changes)
    c = sweep.counts()
    click.echo(f"study {sweep.name!r} (N={sweep.n_trials}): {c.waiting} waiting, {c.running} running, "
               f"{c.finished} finished")


@main.command()
@sweep_options
@click.option("--worker-index", type=int, default=0, help="Tags this worker's log lines (launch numbers its workers).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_THREADS",
              help="CPU threads of this worker (default: all cores; launch sets its share; env KDSWEEP_THREADS).")
@friendly
def worker(study: str, storage: str, preset: str, study_name: str | None, data: str | None,
           download: bool, device: str, seed: int, artifacts: str | None, tensorboard: bool,
           worker_index: int, threads: int | None) -> None:
    """Join an existing study and run its waiting trials until none are left.

    The preset and --set overrides are read from the study itself; a worker whose study
    file or kdsweep version gives another definition refuses to join.

    \b
    KDSWEEP_STORAGE=postgresql+psycopg://kd@db/kd kdsweep worker q2
    """
    from kdsweep.core.devices import resolve_device
    from kdsweep.service import spec as studies
    from kdsweep.service.objective import Objective
    from kdsweep.service.sweep import Sweep, SweepNotFound
    from kdsweep.service.tensorboard import runs_root
    from kdsweep.service.worker import run_worker

    ctx = click.get_current_context()
    _setup_logging(ctx.obj["verbose"], ctx.obj["quiet"], worker_index)
    study_def = studies.load(study)
    study_name = study_name or study_def.name
    st = _open(storage, wait=True)  # a worker started during a database restart waits for it
    try:
        sweep = Sweep.load(st, study_name, study_def)
    except SweepNotFound:
        raise click.UsageError(
            f"no study named {study_name!r} in {redact(storage)}; create it with `kdsweep create` or `kdsweep launch`."
        ) from None
    given = ctx.get_parameter_source("preset") not in (click.core.ParameterSource.DEFAULT, None)
    if given and sweep.definition.get("preset") not in (None, preset):
        raise click.UsageError(
            f"study {study_name!r} was created with preset {sweep.preset!r}, not {preset!r}; "
            "drop --preset (workers read it from the study) or use another --study-name."
        )
    sweep = Sweep.join(st, study_name, study_def)  # refuses another study file, preset or version
    runtime = _runtime(device, data, download, threads)
    resolve_device(device)
    _preflight(study_def, sweep.preset, sweep.overrides, runtime)
    objective = Objective(
        study_def, sweep.preset, runtime, _artifacts(storage, study_name, artifacts),
        tensorboard=runs_root(storage) / study_name if tensorboard else None, overrides=sweep.overrides,
    )
    summary = run_worker(sweep, objective)
    logging.getLogger("kdsweep").info(
        "worker %d done: %d trials (%d complete, %d pruned, %d failed, %d re-queued)%s", worker_index,
        summary.ran, summary.complete, summary.pruned, summary.failed, summary.requeued,
        " - interrupted" if summary.interrupted else "")
    if summary.interrupted:
        sys.exit(130)


# ---------------------------------------------------------------- inspect / export


@main.command()
@click.argument("study_name")
@storage_option
@friendly
def status(study_name: str, storage: str) -> None:
    """Counts by state, the best trial, and the trials running now.

    \b
    kdsweep status q2
    """
    from optuna.trial import TrialState

    from kdsweep.service import keys
    from kdsweep.service.sweep import failed_for_good

    sweep = _load_existing(storage, study_name)
    c = sweep.counts()
    requeued = f", {c.requeued} re-queued" if c.requeued else ""
    click.echo(f"study {study_name!r}: {c.complete} complete, {c.pruned} pruned, {c.failed} failed{requeued}, "
               f"{c.infeasible} infeasible, {c.running} running, {c.waiting} waiting (N={sweep.n_trials})")
    click.echo(sweep.best_line())
    if c.complete:
        from kdsweep.service.report import noise_summary

        for line in noise_summary(sweep):  # issue 10: noise, selection bias, the alpha=0 reference
            click.echo(f"  {line}")
    for t in sweep.trials(TrialState.RUNNING):
        last = max(t.intermediate_values) if t.intermediate_values else 0
        click.echo(f"  running trial {t.number}: epoch {last}, {json.dumps(t.params)}")
    for t in [t for t in sweep.trials(TrialState.FAIL) if failed_for_good(t)][-5:]:
        click.echo(f"  failed trial {t.number}: {t.user_attrs.get(keys.FAIL_REASON, '?')}")


def _dump(doc: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


@main.command()
@click.argument("study_name")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write here instead of standard output.")
@click.option("--weights", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the winning trial's kept weights, with its config, to this file.")
@click.option("--verify", "verify_", is_flag=True,
              help="Re-train the top configs over seeds (in STUDY_NAME.verify) and compare them paired.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Seeds per config (--verify).")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Configs to verify (--verify).")
@click.option("-w", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes that run the --verify trials here.")
@click.option("--device", default="auto", show_default=True, help="Device of the --verify workers.")
@click.option("--data", default=None, metavar="DIR", callback=_check_data,
              help="Data folder of the --verify workers.")
@click.option("--no-run", is_flag=True,
              help="With --verify: only queue the runs (for `kdsweep worker --study-name STUDY_NAME.verify` elsewhere).")
@friendly
def best(study_name: str, storage: str, fmt: str, output: str | None, weights: str | None,
         verify_: bool, seeds: int, top: int, workers: int, device: str, data: str | None,
         no_run: bool) -> None:
    """Export the winning trial as a complete, runnable config, or verify it over seeds.

    \b
    kdsweep best q2 -o best.yaml && kdsweep train --config best.yaml
    kdsweep best q2 --verify --seeds 5 --top 3
    """
    from kdsweep.service import verify

    sweep = _load_existing(storage, study_name)
    if verify_:
        try:
            text = verify.run(sweep, storage, top, seeds, workers, device, data,
                              click.echo, start_workers=not no_run)
        except verify.VerifyError as exc:
            raise click.UsageError(str(exc)) from None
        except verify.VerifyIncomplete as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(text)
        return
    checked = verify.summary_text(sweep)
    if checked:
        click.echo(f"seed verification ({verify.sibling_name(study_name)}):\n{checked}", err=True)
    try:
        doc = sweep.export_best()
    except StudyError as exc:  # nothing to export yet: a runtime state, not a usage error
        raise click.ClickException(str(exc)) from None
    from kdsweep.service.report import noise_summary

    for line in noise_summary(sweep):  # issue 10: noise, selection bias, the alpha=0 reference
        click.echo(line, err=True)
    if weights:
        from kdsweep.service.weights import WeightsError, export_weights

        try:
            export_weights(sweep.best_trial, doc, Path(weights))  # a complete trial: export_best found one
        except WeightsError as exc:
            raise click.ClickException(str(exc)) from None
    text = _dump(doc, fmt)
    if output:
        Path(output).write_text(text)
        click.echo(f"trial {doc['trial']} ({doc['metric']} {doc['value']:.4f}) written to {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="YAML or JSON: an export of `kdsweep best`, or a bare config.")
@click.option("--device", default=None, help="Override the config's device.")
@click.option("--data", default=None, metavar="DIR", callback=_check_data, help="Data folder (env KDSWEEP_DATA).")
@click.option("--seed", type=int, default=None, help="Override the config's seed.")
@friendly
def train_cmd(config_file: str, device: str | None, data: str | None, seed: int | None) -> None:
    """Train one config and report validation and test accuracy.

    \b
    kdsweep train --config best.yaml --device cuda
    """
    from kdsweep.core.config import TrainConfig, from_dict, replace
    from kdsweep.core.train import train

    config = from_dict(TrainConfig, _read_doc(config_file).get("config", None) or _read_doc(config_file))
    changes: dict[str, Any] = {"evaluate_test": True}
    if device:
        changes["device"] = device
    if data:
        changes["data.root"] = data
    if seed is not None:
        changes["seed"] = seed
    result = train(replace(config, **changes))
    click.echo(f"val_acc {result.final_val_acc:.4f}  test_acc {result.test_acc:.4f}  "
               f"params {result.params:,}  {result.wall_time:.1f}s  {result.images_per_s:.0f} img/s")


def _read_doc(path: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise click.UsageError(f"{path} is not valid YAML or JSON: {str(exc).splitlines()[0]}.") from None
    if not isinstance(doc, dict):
        raise click.UsageError(f"{path} must hold a mapping (a config or an export of `kdsweep best`).")
    return doc


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
    from kdsweep.service import spec as studies

    sweep = _load_existing(storage, study_name)
    sweep.spec = studies.load(study_file or sweep.spec_name)
    points: list[dict[str, Any]] = [dict(p) for p in sweep.spec.baselines] if baselines else []
    if values:
        point = {}
        for item in values:
            key, eq, raw = item.partition("=")
            if not eq:
                raise click.UsageError(f"{item!r} is not key=value.")
            point[key] = sp.parse_value(raw)
        points.append(point)
    if not points:
        raise click.UsageError("give key=value pairs or --baselines.")
    for p in sweep.enqueue(points):  # every point checked before any is stored
        click.echo(f"enqueued {json.dumps(p)}")


@main.command()
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

    sweep = _load_existing(storage, study_name)
    folder = Path(out) if out else Path("reports") / study_name
    try:
        files = rep.write_report(sweep, folder, verify.summary_text(sweep))
    except rep.ReportError as exc:
        raise click.ClickException(str(exc)) from None
    for name, names in files.items():
        click.echo(f"{name:12s} {', '.join(names)}")
    click.echo(f"report written to {folder}/summary.md")


@main.command()
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

    st = _open(storage, heartbeat=False)
    click.echo(f"optuna-dashboard on http://{host}:{port} for {redact(storage)}")
    run_server(st, host=host, port=port)


@main.command()
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
    import subprocess

    from kdsweep.service.tensorboard import runs_root

    folder = runs_root(storage, logdir) / study_name
    if not folder.is_dir():
        raise click.UsageError(f"no TensorBoard runs in {folder}; give --logdir or the --storage the study ran on.")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", host, "--port", str(port)]
    click.echo(f"TensorBoard on http://{host}:{port} for {folder}")
    sys.exit(subprocess.call(cmd))


@main.command("studies")
def list_studies() -> None:
    """List the study files kdsweep can find, with their presets.

    \b
    kdsweep studies
    """
    from kdsweep.service import spec as studies

    for name, path in studies.available().items():
        try:
            s = studies.load(str(path))
            click.echo(f"{name:10s} {', '.join(s.presets):24s} {s.description}  ({path})")
        except StudyError as exc:
            click.echo(f"{name:10s} (broken: {exc})")


if __name__ == "__main__":
    main()
