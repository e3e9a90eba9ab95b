"""A tiny real sweep for the service tests: a study file over `tiny.npz` and an in-process worker.

An MLP on 1200 8x8 images trains two epochs in well under a second, so a handful of real
trials (with TensorBoard runs, kept weights and stored configs) cost a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import optuna

STUDY_FILE = '''
import optuna

from kdsweep.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from kdsweep.service.space import Categorical, Float
from kdsweep.service.spec import Preset, StudySpec

STUDY = StudySpec(
    name="tiny",
    description="tiny MLP on tiny.npz (tests)",
    space=[
        Float("optim.lr", 0.001, 0.3, log=True),
        Categorical("mlp.dropout", [0.0, 0.2], target="model.rate"),
    ],
    pruner=lambda config: optuna.pruners.NopPruner(),
    baselines=[{{"optim.lr": 0.003, "mlp.dropout": 0.0}}],
    presets={{
        "smoke": Preset(
            config=TrainConfig(
                data=DataConfig(dataset="npz:{npz}", val_size=300, pad=0, flip=False),
                model=ModelConfig(arch="mlp", budget=5000, depth=1),
                optim=OptimConfig(lr=0.01, warmup=0.0),
                epochs=2,
                batch_size=64,
            ),
        ),
    }},
)
'''


def write_study(folder: Path, npz: Path) -> Path:
    """Write the tiny study file into `folder`; returns its path (loadable by kdsweep.service.spec)."""
    path = folder / "tiny.py"
    path.write_text(STUDY_FILE.format(npz=npz))
    return path


def run_tiny_sweep(study_file: Path, url: str, n_trials: int, folder: Path,
                   study_name: str = "tiny", tensorboard: bool = True) -> optuna.Study:
    """Create the study with `n_trials` slots and run them in this process, on the CPU."""
    from kdsweep.service import spec as studies
    from kdsweep.service.objective import Objective
    from kdsweep.service.storage import open_storage
    from kdsweep.service.sweep import Sweep
    from kdsweep.service.worker import run_worker

    study_def = studies.load(str(study_file))
    storage = open_storage(url)
    sweep = Sweep.create(storage, study_def, "smoke", study_name, n_trials, seed=0)
    objective = Objective(
        study_def, "smoke", {"device": "cpu", "threads": 1}, folder / "kdsweep-artifacts" / study_name,
        tensorboard=folder / "runs" / study_name if tensorboard else None,
    )
    run_worker(Sweep.join(storage, sweep.name, study_def), objective)
    return optuna.load_study(study_name=study_name, storage=storage)
