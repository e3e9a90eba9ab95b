"""Study definitions: the files in `studies/`, each a plain Python module defining `STUDY`.

A study file declares what a sweep is — search space, direction, sampler, pruner and presets
(a preset is a complete base `TrainConfig` plus per-parameter overrides of the space). Adding a
study means adding a file (or passing its path); nothing in `kdsweep/` changes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdsweep
from kdsweep.core.config import ConfigError, TrainConfig, replace, to_dict, validate
from kdsweep.service import space as sp
from kdsweep.service.location import StorageURLError, check_study_name

if TYPE_CHECKING:  # imported where used: study files and usage errors load without Optuna
    import optuna

# Settings that say where or how fast a run happens, not what it is: they may differ between
# the hosts of one study and are left out of its recorded definition.
RUNTIME_KEYS = ("device", "threads", "cache_dir", "compile", "eval_batch_size", "evaluate_test", "precision")
RUNTIME_DATA_KEYS = ("root", "download")


class StudyError(ValueError):
    """A study name, file, preset or definition problem; one sentence saying what to do."""


class SweepNotFound(StudyError):
    """No study of that name in the storage."""


def default_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    # Optuna 5 defaults TPE to multivariate + constant liar, so parallel workers don't collide.
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


@dataclass(frozen=True)
class Preset:
    config: TrainConfig  # every setting that is not sampled
    description: str = ""
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {"cnn.width": {"choices": [8, 16]}}
    needs_gpu: bool = False  # refuse to launch on a machine without CUDA unless forced


@dataclass(frozen=True)
class StudySpec:
    name: str
    space: Sequence[sp.Param]
    presets: Mapping[str, Preset]
    pruner: Callable[[TrainConfig], optuna.pruners.BasePruner]
    direction: str = "maximize"
    metric: str = "val_acc"  # what each epoch reports and the trial returns (last epoch's)
    sampler: Callable[[int | None], optuna.samplers.BaseSampler] = default_sampler
    description: str = ""
    baselines: Sequence[Mapping[str, Any]] = ()  # known points `kdsweep enqueue --baselines` adds
    # Narrows the space to what a base config can run, e.g. q1 keeps only the CNN widths that
    # can meet the preset's parameter budget: {"cnn.width": {"choices": [...]}}. Computed, so an
    # override of the budget (`--set model.budget=...`) narrows the space again.
    narrow: Callable[[TrainConfig], Mapping[str, Mapping[str, Any]]] | None = None
    source: str = ""  # the file it was loaded from

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise StudyError(
                f"study {self.name!r} has no preset {name!r}; choose one of: {', '.join(self.presets)}."
            )
        return self.presets[name]

    def base_config(self, preset: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The preset's config with `overrides` ({"epochs": 2, "data.train_subset": 500}) applied."""
        base = self.preset(preset).config
        if not overrides:
            try:  # a study file's own preset can be wrong too (negative epochs): refuse early
                return validate(base)
            except ConfigError as exc:
                raise StudyError(f"study {self.name!r}, preset {preset!r}: {exc}") from None
        try:
            return validate(replace(base, **dict(overrides)))
        except (ConfigError, TypeError, AttributeError) as exc:
            raise StudyError(f"study {self.name!r}: cannot override the preset: {exc}") from None

    def check_overrides(self, preset: str, overrides: Mapping[str, Any]) -> None:
        """Refuse overrides of sampled parameters, of per-host runtime settings, of unknown
        settings and of values of the wrong type, each in one sentence."""
        sampled = {p.path: p.name for p in self.space}
        names = {p.name: p.path for p in self.space}
        for key in overrides:
            if key in sampled or key in names:
                name = sampled.get(key, key)
                raise StudyError(
                    f"--set {key}: {name!r} is sampled by study {self.name!r}, so it cannot be set; "
                    f"narrow its range in a preset's space instead (e.g. {{{name!r}: {{'choices': [...]}}}} "
                    "or low/high)."
                )
            head, _, rest = key.partition(".")
            if key == "precision":
                raise StudyError(f"{key!r} is a per-host setting, not part of the study; set "
                                 "KDSWEEP_PRECISION=fp32 or bf16 where the workers run.")
            if key in RUNTIME_KEYS or (head == "data" and rest in RUNTIME_DATA_KEYS):
                raise StudyError(
                    f"{key!r} is a per-host setting, not part of the study; use the command's option."
                )
        for key, value in overrides.items():
            _check_setting(key, value)
        self.base_config(preset, overrides)  # values out of range fail here

    def space_for(self, preset: str, overrides: Mapping[str, Any] | None = None) -> list[sp.Param]:
        """The search space with the preset's overrides and the study's narrowing applied, checked."""
        changes: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.preset(preset).space.items()}
        if self.narrow is not None:
            for key, fields in self.narrow(self.base_config(preset, overrides)).items():
                changes.setdefault(key, {}).update(fields)
        names = {p.name for p in self.space}
        for key in changes:
            if key not in names:
                raise StudyError(
                    f"preset {preset!r} of study {self.name!r} overrides unknown parameter {key!r}; "
                    f"the space has: {', '.join(sorted(names))}."
                )
        out = []
        for p in self.space:
            try:
                out.append(dataclasses.replace(p, **changes.get(p.name, {})))
            except TypeError as exc:
                raise StudyError(f"preset {preset!r} overrides {p.name!r} with a bad field: {exc}.") from None
        try:
            sp.check_space(out)
        except sp.SpaceError as exc:
            raise StudyError(f"study {self.name!r}, preset {preset!r}: {exc}") from None
        return out

    def config_for(self, preset: str, params: Mapping[str, Any],
                   overrides: Mapping[str, Any] | None = None, **runtime: Any) -> TrainConfig:
        """The full config of one trial: the preset's base, overrides, sampled values, runtime."""
        by_name = {p.name: p for p in self.space}
        changes = {by_name[k].path: v for k, v in params.items()}
        changes.update({k: v for k, v in runtime.items() if v is not None})
        try:
            return replace(self.base_config(preset, overrides), **changes)
        except ConfigError as exc:
            raise StudyError(f"study {self.name!r}: {exc}") from None

    def definition(self, preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What defines this study in storage; workers that disagree with it refuse to join.

        Holds the study name, preset, overrides, direction, metric, the search space as it is
        sampled, the base config without per-host settings (it includes the data spec) and the
        kdsweep version.
        """
        config = to_dict(self.base_config(preset, overrides))
        for key in RUNTIME_KEYS:
            config.pop(key, None)
        for key in RUNTIME_DATA_KEYS:
            config["data"].pop(key, None)
        # Through JSON, so tuples compare equal to the lists a stored definition holds.
        return json.loads(json.dumps({
            "study": self.name,
            "preset": preset,
            "overrides": dict(overrides or {}),
            "direction": self.direction,
            "metric": self.metric,
            "space": sp.describe(self.space_for(preset, overrides)),
            "config": config,
            "kdsweep_version": kdsweep.__version__,
        }))


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _check_setting(key: str, value: Any) -> None:
    """StudyError unless `key` is a TrainConfig setting (dotted) and `value` fits its type."""
    cls: Any = TrainConfig
    hint: Any = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            valid = ", ".join(sorted(".".join([*parts[:i], h]) for h in hints))
            raise StudyError(f"--set {key}: unknown setting {part!r} in {where}; valid: {valid}.")
        hint = hints[part]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(inner[0]):
                raise StudyError(f"--set {key}: {'.'.join(parts[:i + 1])!r} has no sub-settings.")
            cls = inner[0]
    optional = type(None) in typing.get_args(hint)
    kind = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(kind[0]) or kind[0]
    if value is None:
        if optional:
            return
        raise StudyError(f"--set {key}=none: {key} needs {_KINDS.get(kind, 'a value')}.")
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise StudyError(
            f"--set {key}={value}: {key} takes {_KINDS[kind]}"
            f"{' or none' if optional else ''}, not {value!r}."
        )


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["epochs=2", "data.train_subset=500"]` -> {"epochs": 2, "data.train_subset": 500}."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise StudyError(f"--set {item!r} is not KEY=VALUE (e.g. --set epochs=2).")
        out[key.strip()] = sp.parse_value(raw.strip())
    return out


def search_path() -> list[Path]:
    """Folders searched for study files: $KDSWEEP_STUDIES, ./studies, the bundled studies/."""
    dirs = [Path(p) for p in os.environ.get("KDSWEEP_STUDIES", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "studies")
    dirs.append(Path(kdsweep.__file__).resolve().parent.parent / "studies")
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def available() -> dict[str, Path]:
    """Study name -> file, first match along the search path winning."""
    found: dict[str, Path] = {}
    for d in search_path():
        for f in sorted(d.glob("*.py")):
            if not f.name.startswith("_"):
                found.setdefault(f.stem, f)
    return found


def load(name_or_path: str) -> StudySpec:
    """Load a study by name (along `search_path()`) or by the path of its file."""
    path = Path(name_or_path)
    if not (path.suffix == ".py" and path.exists()):
        studies = available()
        if name_or_path not in studies:
            names = ", ".join(studies) or "none"
            raise StudyError(
                f"unknown study {name_or_path!r}; available: {names} "
                "(add a file to studies/ or pass the path of a study file)."
            )
        path = studies[name_or_path]
    module_name = f"kdsweep_study_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise StudyError(f"cannot load study file {path}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise StudyError(f"study file {path} failed to load: {type(exc).__name__}: {exc}") from None
    study = getattr(module, "STUDY", None)
    if not isinstance(study, StudySpec):
        raise StudyError(f"study file {path} must define STUDY = kdsweep.service.spec.StudySpec(...).")
    try:
        check_study_name(study.name)  # the default --study-name: it names database rows and folders
        sp.check_space(study.space)
    except (StorageURLError, sp.SpaceError) as exc:
        raise StudyError(f"study file {path}: {exc}") from None
    return dataclasses.replace(study, source=str(path))


def diff_definitions(stored: Mapping[str, Any], local: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first path where two definitions differ, as 'key: stored X, local Y', or None."""
    for key in sorted(set(stored) | set(local)):
        a, b = stored.get(key, "<missing>"), local.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = diff_definitions(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: study has {a!r}, this study file gives {b!r}"
    return None
