"""Exported weights: a kept state_dict bundled with the config that built it.

Workers keep the weights of the best few complete trials of a study (see
`Objective._keep_weights`); `kdsweep best --weights FILE` writes the winner's as one file
that carries its own config, so the model can be rebuilt without the storage:

    blob = torch.load(FILE)
    model = load_model(FILE)  # same architecture, weights loaded, eval mode
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from optuna.trial import FrozenTrial

from kdsweep.service import keys


class WeightsError(RuntimeError):
    """No kept weights to export; one sentence saying why."""


def export_weights(trial: FrozenTrial, doc: Mapping[str, Any], dest: Path) -> None:
    """Write {state_dict, config, params, trial, value, study} of `trial` to `dest`."""
    src = trial.user_attrs.get(keys.WEIGHTS)
    if not src or not Path(src).exists():
        raise WeightsError(
            f"no kept weights for trial {trial.number} (only the best few complete trials keep "
            "theirs, and only where the worker's --artifacts folder is reachable from here)."
        )
    state = torch.load(src, map_location="cpu", weights_only=True)
    blob = {"state_dict": state, "config": doc["config"], "params": dict(trial.params),
            "trial": trial.number, "value": trial.value, "study": doc.get("study")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(dest)


def load_model(path: Path | str) -> torch.nn.Module:
    """Rebuild the exported model from its own config and load its weights (eval mode)."""
    from kdsweep.core import data, models
    from kdsweep.core.config import TrainConfig, from_dict
    from kdsweep.core.train import input_shape

    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = from_dict(TrainConfig, blob["config"])
    splits = data.load_splits(config.data)
    model = models.build_model(config.model, input_shape(config, splits), splits.num_classes)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
