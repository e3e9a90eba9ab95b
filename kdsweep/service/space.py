"""Search spaces as plain data: validated when a study file loads, sampled through Optuna.

A parameter's `name` is its key in the study's storage (namespaced, never renamed in a live
study); `target` is the `TrainConfig` path it sets. `when` makes a parameter conditional on
earlier choices, so e.g. `dropblock.size` exists only in trials that chose DropBlock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # trials come from Optuna; defining a space needs no Optuna
    import optuna


class SpaceError(ValueError):
    """A search space or a value for it is invalid; one sentence saying which and why."""


@dataclass(frozen=True)
class Float:
    name: str
    low: float
    high: float
    log: bool = False
    target: str = ""  # config path; defaults to `name`
    when: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def check(self) -> None:
        if not self.low < self.high:
            raise SpaceError(f"parameter {self.name!r}: low {self.low} must be below high {self.high}.")
        if self.log and self.low <= 0:
            raise SpaceError(f"parameter {self.name!r}: a log scale needs low > 0, got {self.low}.")

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log,
                "target": self.path, "when": {k: list(v) for k, v in self.when.items()}}

    @property
    def path(self) -> str:
        return self.target or self.name


@dataclass(frozen=True)
class Int:
    name: str
    low: int
    high: int
    log: bool = False
    target: str = ""
    when: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    check = Float.check

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> dict[str, Any]:
        return {**Float.describe(self), "type": "int"}  # type: ignore[arg-type]

    path = Float.path


@dataclass(frozen=True)
class Categorical:
    name: str
    choices: Sequence[Any]
    target: str = ""
    when: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def check(self) -> None:
        if len(self.choices) == 0:
            raise SpaceError(f"parameter {self.name!r} has an empty list of choices.")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise SpaceError(f"parameter {self.name!r} lists a choice twice: {list(self.choices)}.")

    def suggest(self, trial: optuna.Trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        # True == 1 in Python; a bool must not match an int choice or the reverse.
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)

    def describe(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices), "target": self.path,
                "when": {k: list(v) for k, v in self.when.items()}}

    path = Float.path


Param = Float | Int | Categorical


def check_space(space: Sequence[Param]) -> None:
    """Raise SpaceError for empty choices, inverted bounds, duplicates or dangling conditions."""
    seen: set[str] = set()
    for p in space:
        p.check()
        if p.name in seen:
            raise SpaceError(f"parameter {p.name!r} is declared twice.")
        for dep in p.when:
            if dep not in seen:
                raise SpaceError(
                    f"parameter {p.name!r} depends on {dep!r}, which must be declared before it."
                )
        seen.add(p.name)


def active(param: Param, values: Mapping[str, Any]) -> bool:
    """Whether `param` exists given the values chosen so far."""
    return all(dep in values and values[dep] in allowed for dep, allowed in param.when.items())


def sample(trial: optuna.Trial, space: Sequence[Param]) -> dict[str, Any]:
    """Suggest every active parameter in declaration order; returns {name: value}."""
    values: dict[str, Any] = {}
    for p in space:
        if active(p, values):
            values[p.name] = p.suggest(trial)
    return values


def validate_point(space: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a user-given point (e.g. for enqueue) against the space; return it normalised."""
    by_name = {p.name: p for p in space}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise SpaceError(f"unknown parameter {unknown[0]!r}; the space has: {', '.join(by_name)}.")
    out: dict[str, Any] = {}
    for p in space:
        if not active(p, out):
            if p.name in values:
                raise SpaceError(f"parameter {p.name!r} does not apply given the other values.")
            continue
        if p.name not in values:
            raise SpaceError(f"parameter {p.name!r} needs a value.")
        v = values[p.name]
        if isinstance(p, Float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not p.contains(v) or (isinstance(v, float) and not math.isfinite(v)):
            allowed = list(p.choices) if isinstance(p, Categorical) else f"[{p.low}, {p.high}]"
            raise SpaceError(f"value {v!r} for {p.name!r} is outside the space {allowed}.")
        out[p.name] = v
    return out


def parse_value(text: str) -> Any:
    """Turn a command-line `key=value` value into int, float, bool, None or str."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_point(items: Sequence[str]) -> dict[str, Any]:
    """`["kd.alpha=0.9", "kd.temperature=10"]` -> a point; SpaceError for an item without `=`."""
    point = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SpaceError(f"{item!r} is not key=value.")
        point[key] = parse_value(raw)
    return point


def describe(space: Sequence[Param]) -> dict[str, Any]:
    """JSON-ready description, stored in the study so a worker can check it joins the same one."""
    return {p.name: p.describe() for p in space}
