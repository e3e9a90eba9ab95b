"""TensorBoard event files per trial: curves per epoch and HParams for side-by-side comparison.

Layout: `<runs root>/<study>/trial-NNNN/`, where the runs root sits beside the SQLite file
(like `kdsweep-artifacts/`), so workers started from any folder write to the same place and
`kdsweep tensorboard STUDY` finds it; for server storages (PostgreSQL) it is `./runs` unless
`KDSWEEP_RUNS` names a shared folder. Only metrics and sampled parameters are written: no
config text, paths or storage URLs, so nothing secret ends up in event files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCALARS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "val_acc": "val/acc",
}
HPARAM_METRICS = ("hparam/val_acc", "hparam/epochs")


def runs_root(storage_url: str | None, explicit: str | Path | None = None) -> Path:
    """Where a storage's studies keep their TensorBoard runs (see the module docstring)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("KDSWEEP_RUNS"):
        return Path(os.environ["KDSWEEP_RUNS"]).expanduser()
    if storage_url and storage_url.startswith("sqlite:///") and not storage_url.endswith(":memory:"):
        return Path(storage_url[len("sqlite:///"):]).expanduser().resolve().parent / "runs"
    return Path("runs")


def serve(folder: Path, host: str, port: int) -> int:
    """Run TensorBoard on `folder` until it exits or this process gets SIGTERM/SIGINT; returns
    its exit code. The signal is passed on and TensorBoard waited for, so stopping the command
    (`kill`, `docker stop`, Ctrl-C) never leaves an orphaned TensorBoard holding the port."""
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", host,
           "--port", str(port)]
    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code


def trial_folder(root: Path, study_name: str, number: int) -> Path:
    return root / study_name / f"trial-{number:04d}"


def _hparam_value(v: Any) -> int | float | str | bool:
    # HParams accepts only these types; None (an inactive conditional) becomes a readable string.
    return v if isinstance(v, (int, float, str, bool)) else str(v)


class TrialWriter:
    """Writes one trial's events to `folder`: scalars each epoch, HParams when it ends."""

    def __init__(self, folder: Path) -> None:
        # Imported here: `kdsweep tensorboard` only serves the files and needs no torch.
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.last: dict[str, float] = {}

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, tag in SCALARS.items():
            if key in metrics:
                self.writer.add_scalar(tag, float(metrics[key]), epoch)
        self.last = {**dict(metrics), "epoch": epoch}
        self.writer.flush()

    def close(self, params: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Record HParams: the trial's parameters (plus `extra`, e.g. the trial number and
        seed) against its last validation accuracy and the epochs it ran (fewer when pruned).

        A trial that stopped before its first epoch gets no HParams entry.
        """
        if self.last:
            hparams = {k: _hparam_value(v) for k, v in params.items()}
            hparams.update({k: _hparam_value(v) for k, v in (extra or {}).items()})
            self.writer.add_hparams(
                hparams,
                {"hparam/val_acc": float(self.last.get("val_acc", 0.0)),
                 "hparam/epochs": float(self.last.get("epoch", 0))},
                run_name=".",  # keep HParams in the trial's own folder, not a timestamped child
            )
        self.writer.close()
