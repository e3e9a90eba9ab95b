"""The kdsweep CLI's shared pieces (as flask and sqlite-utils keep theirs): option bundles,
the error mapping every command shares (`friendly`), and the handles a command opens. The
commands themselves are in kdsweep/cli.py. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# The storage URL's one parser; light: it imports neither Optuna nor SQLAlchemy.
from kdsweep.service.location import (  # noqa: F401  (redact: the commands' too)
    DEFAULT_URL,
    StorageURLError,
    check_study_name,
    location,
    redact,
    redact_text,
)

CONTEXT = {"auto_envvar_prefix": "KDSWEEP", "help_option_names": ["-h", "--help"], "max_content_width": 100}
# kdsweep's own errors, by module: a usage error exits 2, the others 1. Looked up only among
# modules already imported (an error cannot come from a module that was never loaded).
USAGE_ERRORS = (("kdsweep.service.location", "StorageURLError"), ("kdsweep.service.spec", "StudyError"), ("kdsweep.service.space", "SpaceError"),
                ("kdsweep.core.config", "ConfigError"), ("kdsweep.core.devices", "DeviceError"),
                ("kdsweep.service.verify", "VerifyError"), ("kdsweep.core.data_root", "DataFolderError"))
RUNTIME_ERRORS = (("kdsweep.core.install", "InstallError"), ("kdsweep.service.storage", "StorageError"), ("kdsweep.core.budget", "BudgetError"),
                  ("kdsweep.core.data_root", "DataError"), ("kdsweep.core.resnets", "ModelError"),
                  ("kdsweep.core.train", "TrainingError"), ("kdsweep.service.verify", "VerifyIncomplete"),
                  ("kdsweep.service.report", "ReportError"), ("kdsweep.service.weights", "WeightsError"))


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


def _optuna_verbosity(verbose: int) -> None:
    """Optuna's own log lines: warnings only, unless -vv."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.INFO if verbose > 1 else logging.WARNING)


class _AfterImport:
    """Runs a callback right after a module's first import (see `_when_imported`)."""

    pending: dict[str, Callable[[], None]] = {}

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        then = self.pending.pop(name, None)
        if then is None:
            return None
        spec = importlib.util.find_spec(name)  # the ordinary finders: this one no longer waits for it
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then(module: Any) -> None:
            exec_module(module)
            then()

        spec.loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec


_AFTER_IMPORT = _AfterImport()


def _when_imported(module: str, then: Callable[[], None]) -> None:
    """Call `then` once `module` is imported: now if it is, else right after its import.

    Optuna resets its log level when it is first imported, so its verbosity cannot be set
    before; importing it here would cost every usage error most of a second.
    """
    if module in sys.modules:
        then()
        return
    _AfterImport.pending[module] = then
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn kdsweep's own errors into one-sentence messages: exit 2 for usage, 1 otherwise.

    Also sets Optuna's log level: here, not in the group, so that `--help` and parsing errors
    (answered by click before this runs) never import Optuna.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        url = ctx.params.get("storage")
        _when_imported("optuna", functools.partial(_optuna_verbosity, (ctx.find_root().obj or {}).get("verbose", 0)))
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            if isinstance(exc, _loaded(USAGE_ERRORS)):
                raise click.UsageError(redact_text(str(exc), url)) from None
            if isinstance(exc, _loaded(RUNTIME_ERRORS)):
                raise click.ClickException(redact_text(str(exc), url)) from None
            raise

    return wrapper


def _check_url(ctx: click.Context, param: click.Parameter, url: str) -> str:
    """A malformed storage URL is a usage error (exit 2), caught before anything is opened."""
    try:
        location(url)
    except StorageURLError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return url


def _check_study_name(ctx: click.Context, param: click.Parameter, name: str | None) -> str | None:
    """A study name names folders too: an unsafe one is a usage error before anything is stored."""
    try:
        return None if name is None else check_study_name(name)
    except StorageURLError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def storage_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        # An explicit envvar: auto_envvar_prefix would read KDSWEEP_<COMMAND>_STORAGE instead,
        # and launch hands the URL (with its password) to workers through KDSWEEP_STORAGE.
        "--storage", default=DEFAULT_URL, show_default=True, metavar="URL", envvar="KDSWEEP_STORAGE",
        callback=_check_url,
        help="Optuna storage: sqlite:///FILE.db or postgresql+psycopg://USER:PASS@HOST/DB (env KDSWEEP_STORAGE).",
    )(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


def check_data(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--data is a folder: a dataset spec or a folder that does not exist is a usage error."""
    from kdsweep.core.data_root import DataError, check_root

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


dataset_option = click.option(
    "--dataset", default=None, envvar="KDSWEEP_DATASET", callback=_check_dataset,
    help="Dataset instead of the preset's: cifar10, cifar100, fashion-mnist, npz:FILE or folder:DIR "
         "(env KDSWEEP_DATASET). Part of the study: its workers use it too.")


def sweep_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("study"),
        storage_option,
        click.option("--preset", default="paper", show_default=True, envvar="KDSWEEP_PRESET",
                     help="Preset of the study file (env KDSWEEP_PRESET)."),
        click.option("--study-name", default=None, envvar="KDSWEEP_STUDY_NAME", callback=_check_study_name,
                     help="Name in the storage (default: STUDY; env KDSWEEP_STUDY_NAME)."),
        click.option("--data", default=None, metavar="DIR", envvar="KDSWEEP_DATA", callback=check_data,
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


def _check_track(ctx: click.Context, param: click.Parameter, tracker: str | None) -> str | None:
    """--track names an installed tracker: a missing package is a usage error before anything
    is stored (and nothing of the tracker is imported here)."""
    from kdsweep.service.tracking import TrackingError, check

    try:
        check(tracker)
    except TrackingError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return tracker


track_option = click.option(
    "--track", type=click.Choice(["mlflow"]), default=None, envvar="KDSWEEP_TRACK", callback=_check_track,
    help="Log each trial as one run of an experiment tracker: mlflow (server from MLFLOW_TRACKING_URI; "
         "env KDSWEEP_TRACK). Needs pip install 'kdsweep[mlflow]'.")
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", envvar="KDSWEEP_SET",
    help="Override a setting of the preset (e.g. --set epochs=2 --set data.train_subset=500); "
         "recorded in the study, so its workers use it too.")
n_trials_option = click.option(
    "-n", "--n-trials", type=click.IntRange(min=1), default=None, envvar="KDSWEEP_N_TRIALS",
    help="COMPLETE + PRUNED trials the study ends with, across all workers (default: 50 for a new study, "
         "the stored N on resume; lower it while no more have run; env KDSWEEP_N_TRIALS).")


def open_storage(storage: str, wait: bool = False):
    """The storage, to write (a worker's `wait` rides out a database restart)."""
    from kdsweep.service import storage as st

    return st.open_storage(storage, wait=wait)


def read_storage(storage: str):
    """The storage, to read: never creates a file, a schema or a row."""
    from kdsweep.service import sweep

    return sweep.read_storage(storage)


def open_sweep(storage: str, study_name: str, write: bool = False):
    """The sweep `study_name`: one sentence naming the studies there when it is missing."""
    from kdsweep.service.sweep import Sweep

    return Sweep.open(storage, study_name, write=write)


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))
