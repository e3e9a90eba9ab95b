"""`kdsweep launch --dry-run`: a few sampled points of a study, resolved, counted, stored nowhere.

Needs no data for the named datasets: the model is built on PyTorch's meta device from the
dataset's known shape and class count (kdsweep.core.data.KNOWN_SHAPES), so the default
`paper` preset previews offline, without CIFAR-10.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from kdsweep.core import data
from kdsweep.core.budget import BudgetError
from kdsweep.core.config import TrainConfig
from kdsweep.service import space as sp
from kdsweep.service.spec import StudySpec


@dataclass
class Point:
    params: dict[str, Any]  # the sampled values
    resolved: dict[str, Any]  # what the config computes from them (widths, block sizes)
    param_count: int | None  # trainable parameters; None when infeasible
    infeasible: str | None = None  # why the budget cannot be met


def count_params(config: TrainConfig, shape: data.Shape) -> int:
    """Trainable parameters of the model `config` builds, on the meta device (no memory, no data)."""
    import torch

    from kdsweep.core import models
    from kdsweep.core.train import input_shape

    model_cfg = dataclasses.replace(config.model, weights="none")  # weights do not change the count
    with torch.device("meta"):
        model = models.build_model(model_cfg, input_shape(config, shape), shape.num_classes)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def preview(spec: StudySpec, preset: str, overrides: Mapping[str, Any], runtime: Mapping[str, Any],
            points: int = 4, seed: int = 0) -> list[Point]:
    """`points` random points of the study's space, each resolved and counted."""
    from kdsweep.core.train import resolve

    space = spec.space_for(preset, overrides)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))  # in memory
    out = []
    for _ in range(points):
        params = sp.sample(probe.ask(), space)
        config = spec.config_for(preset, params, overrides, **runtime)
        shape = data.shape_of(config.data)
        try:
            config = resolve(config, shape)
        except BudgetError as exc:
            out.append(Point(params, {}, None, str(exc)))
            continue
        m = config.model
        resolved = {"arch": m.arch}
        if m.hidden:
            resolved["hidden"] = list(m.hidden)
        if m.channels:
            resolved["channels"] = list(m.channels)
        if m.block_sizes:
            resolved["block_sizes"] = list(m.block_sizes)
        out.append(Point(params, resolved, count_params(config, shape)))
    return out


def preview_table(name: str, preset: str, overrides: Mapping[str, Any], points: list[Point]) -> str:
    """The points as a table: parameter, sampled value, resolved widths, parameter count."""
    import json

    title = (f"study {name}, preset {preset}" + (f", --set {json.dumps(dict(overrides))}" if overrides else "")
             + f": {len(points)} sampled points (nothing stored)")
    rows = [["point", "parameter", "sampled value", "resolved", "parameters"]]
    for i, p in enumerate(points):
        resolved = p.infeasible or " ".join(f"{k}={v}" for k, v in p.resolved.items())
        count = f"{p.param_count:,}" if p.param_count is not None else "infeasible"
        for j, (k, v) in enumerate(p.params.items()):
            value = f"{v:.4g}" if isinstance(v, float) else str(v)
            rows.append([str(i) if j == 0 else "", k, value, resolved if j == 0 else "", count if j == 0 else ""])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join([title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                                for r in rows])
