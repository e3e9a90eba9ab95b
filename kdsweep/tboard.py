"""TensorBoard event files per trial: curves per epoch and HParams for side-by-side comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from torch.utils.tensorboard import SummaryWriter

SCALARS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "val_acc": "val/acc",
}


class TrialWriter:
    """Writes one trial's events to `folder` (runs/<study>/trial-NNNN)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))
        self.last: dict[str, float] = {}

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, tag in SCALARS.items():
            if key in metrics:
                self.writer.add_scalar(tag, metrics[key], epoch)
        self.last = dict(metrics)
        self.writer.flush()

    def close(self, params: Mapping[str, Any], trial: optuna.Trial | None = None) -> None:
        """Record HParams: the trial's parameters against its last validation accuracy."""
        if self.last:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                       for k, v in params.items()}
            if trial is not None:
                hparams["trial"] = trial.number
            self.writer.add_hparams(
                hparams,
                {"hparam/val_acc": self.last.get("val_acc", 0.0),
                 "hparam/epochs": float(self.last.get("epoch", 0))},
                run_name=".",  # keep HParams in the trial's own folder, not a timestamped child
            )
        self.writer.close()
