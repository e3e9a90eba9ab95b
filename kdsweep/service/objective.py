"""The objective, and the one trial record every worker writes: where Optuna meets training.

One trial's lifecycle, the same for the plain and the fused worker (`TrialRun`):

1. **config** (`TrialRun.configure`): the sampled values, or the fixed ones a verification or
   reference run was queued with; such a run trains with its own seed (`keys.VERIFY_SEED`)
   and also scores the test set. The resolved config, seeds, parameter count, FLOPs, device,
   version and host are stored before training, so a pruned or failed trial carries them too.
   A config that cannot meet its budget is infeasible (PRUNED, `keys.INFEASIBLE`).
2. **train**: `train()` here; a member of a `FusedGroup` in the fused worker. Only this call
   differs between the workers.
3. **report** (`TrialRun.report`, after each epoch): `trial.report`, then the pruner decides —
   never at the last epoch, never for a fixed (verification or reference) run.
4. **record** (`TrialRun.record`): every attribute of a finished trial (epochs, speed, best
   value, the per-image validation mask `val_correct`/`val_n`, test accuracy where asked,
   the teacher, kept weights).
5. **tell**: the worker's (`Sweep.tell`).

With `--track mlflow` (`Objective.track`), the same steps feed the trial's MLflow run
(kdsweep/service/tracking.py): opened or continued at config, a step per report, ended by
`record` or, for a pruned, failed or re-queued attempt, by `close(error)`.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

import kdsweep
from kdsweep.core.budget import BudgetError
from kdsweep.core.config import TrainConfig, replace, to_dict
from kdsweep.core.devices import resolve_device
from kdsweep.core.teacher import prepare as prepare_teacher
from kdsweep.core.train import TrainResult, input_shape, resolve, train, with_precision
from kdsweep.service import keys, stats
from kdsweep.service import space as sp
from kdsweep.service.spec import StudySpec
from kdsweep.service.sweep import origin

log = logging.getLogger("kdsweep.service.objective")



def _drop(checkpoint: Path) -> None:
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_suffix(".owner").unlink(missing_ok=True)


def count_params(config: TrainConfig) -> int:
    """Trainable parameters of the student a resolved config builds (on the meta device)."""
    from kdsweep.core import data, models

    splits = data.load_splits(config.data)  # cached in this process; train() reuses it
    model_cfg = dataclasses.replace(config.model, weights="none")  # weights do not change the count
    with torch.device("meta"):
        model = models.build_model(model_cfg, input_shape(config, splits), splits.num_classes)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(config: TrainConfig) -> int:
    """Forward FLOPs per image of the student a resolved config builds (see budget.count_flops)."""
    from kdsweep.core import budget, data

    splits = data.load_splits(config.data)
    return budget.count_flops(config.model, input_shape(config, splits), splits.num_classes)


class _TrialLog:
    """Copies kdsweep's log lines into one file while a trial runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        self.handler.setLevel(logging.INFO)
        logger = logging.getLogger("kdsweep")
        # Where nothing configured logging (the worker run from Python, not the CLI), the logger
        # drops INFO records before any handler sees them; the file wants them all the same.
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)

    def close(self) -> None:
        logger = logging.getLogger("kdsweep")
        logger.removeHandler(self.handler)
        logger.setLevel(self._level)
        self.handler.close()


class TrialRun:
    """One trial between taking its slot and being told: config, report, record (see above)."""

    def __init__(self, objective: Objective, trial: optuna.Trial, trial_log: bool = True) -> None:
        self.objective, self.trial = objective, trial
        self.start = time.perf_counter()
        self.teacher_s: float | None = None  # of the wall time, spent on the teacher (see close)
        self.params: dict[str, Any] = {}
        self.config: TrainConfig | None = None
        self.writer: Any = None
        self.tracked: Any = None  # the trial's MLflow run (kdsweep.service.tracking.MlflowTrial)
        self.trial_log: _TrialLog | None = None
        self._log_wanted = trial_log
        # A verification or reference run (kdsweep/service/verify.py, baseline.py): fixed params,
        # its own seed, test accuracy too, and never pruned.
        seed = trial.user_attrs.get(keys.VERIFY_SEED)
        self.fixed_seed: int | None = None if seed is None else int(seed)

    @property
    def fixed(self) -> bool:
        return self.fixed_seed is not None

    def teacher(self, config: TrainConfig) -> Any:
        """The config's teacher (trained once per host and cached; minutes the first time); the
        time it took is recorded apart, since launch's ETA leaves it out."""
        began = time.perf_counter()
        teacher = prepare_teacher(config)
        self.teacher_s = time.perf_counter() - began
        return teacher

    def configure(self) -> TrainConfig:
        """Sample (or take the fixed values), resolve and store the config; TrialPruned when it
        is infeasible. Opens the trial's TensorBoard run and log file."""
        objective, trial = self.objective, self.trial
        space = objective.study.space_for(objective.preset, objective.overrides)
        self.params = sp.sample(trial, space)
        try:
            config = objective.config(self.params)
            if self.fixed_seed is not None:
                config = replace(config, seed=self.fixed_seed, evaluate_test=True)
            config = resolve(config)
        except BudgetError as exc:
            # Kept out of the space by the study files; a custom space may still hit it.
            trial.set_user_attr(keys.INFEASIBLE, str(exc))
            raise optuna.TrialPruned(f"infeasible: {exc}") from None
        # Stored as it will run on this host (train() resolves it the same way).
        config = with_precision(config, resolve_device(config.device))
        self.config = config
        trial.set_user_attr(keys.CONFIG, to_dict(config))
        trial.set_user_attr(keys.TRAIN_SEED, config.seed)
        trial.set_user_attr(keys.DATASET, config.data.dataset)
        trial.set_user_attr(keys.DEVICE, str(resolve_device(config.device)))
        trial.set_user_attr(keys.PARAMS_COUNT, count_params(config))
        trial.set_user_attr(keys.FLOPS, count_flops(config))  # beside params: budgets match one, not both
        trial.set_user_attr(keys.VERSION, kdsweep.__version__)
        trial.set_user_attr(keys.HOST, socket.gethostname())
        if objective.tensorboard is not None:
            from kdsweep.service.tensorboard import TrialWriter

            self.writer = TrialWriter(objective.tensorboard / f"trial-{trial.number:04d}")
            if self._log_wanted:
                # The attempt's own log lines, beside its run (`kdsweep trial` shows the path);
                # retries of the same trial append to it.
                self.trial_log = _TrialLog(self.writer.folder / "log.txt")
                trial.set_user_attr(keys.LOG_FILE, str(self.trial_log.path))
        if objective.track is not None:
            from kdsweep.service.tracking import MlflowTrial

            self.tracked = MlflowTrial.open(trial.study.study_name, str(trial.study.user_attrs.get(keys.UID, "")),
                                            origin(trial), trial.number, {**self.params, "seed": config.seed})
        return config

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """After each epoch: report the metric; the pruner may stop the trial (TrialPruned)."""
        trial, metric, config = self.trial, self.objective.study.metric, self.config
        assert config is not None
        trial.report(metrics[metric], epoch)
        trial.set_user_attr(keys.EPOCHS_RUN, epoch)
        if self.writer is not None:
            self.writer.epoch(epoch, metrics)
        if self.tracked is not None:
            self.tracked.epoch(epoch, metrics)
        log.debug("trial %d epoch %d %s %.4f", trial.number, epoch, metric, metrics[metric])
        # Never at the last epoch: the trial has paid for all of it, and pruning it then would
        # only throw its value away (Hyperband's upper rung can fall on the last epoch). As in
        # Ray Tune's ASHA, a trial that reaches the end completes. Fixed runs always finish.
        if not self.fixed and epoch < config.epochs and trial.should_prune():
            trial.set_user_attr(keys.PRUNED_REASON, f"pruner stopped it after epoch {epoch}")
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    def record(self, result: TrainResult) -> float:
        """Store what a finished training run measured; returns the trial's value."""
        trial = self.trial
        trial.set_user_attr(keys.PARAM_SPLIT, result.param_split)
        trial.set_user_attr(keys.EPOCHS_RUN, result.epochs_run)
        trial.set_user_attr(keys.IMAGES_PER_S, round(result.images_per_s, 1))
        trial.set_user_attr(keys.BEST_VAL_ACC, result.best_val_acc)
        if result.val_correct is not None:  # per-image scores: paired intervals between trials
            trial.set_user_attr(keys.VAL_CORRECT, stats.pack(result.val_correct.numpy()))
            trial.set_user_attr(keys.VAL_N, len(result.val_correct))
        if result.test_acc is not None:
            trial.set_user_attr(keys.TEST_ACC, result.test_acc)
        if result.teacher:
            trial.set_user_attr(keys.TEACHER_KEY, result.teacher["key"])
            trial.set_user_attr(keys.TEACHER_VAL_ACC, result.teacher["val_acc"])
        if result.model is not None and self.objective.keep_weights > 0:
            self.objective._keep_weights(trial, result.model, result.final_val_acc)
        if self.tracked is not None:
            n = len(result.val_correct) if result.val_correct is not None else 0
            se = stats.binomial_se(result.final_val_acc, n) if n else None
            extra = {} if result.test_acc is None else {"test_acc": result.test_acc}
            self.tracked.end("COMPLETE", result.final_val_acc, se, extra)
        return result.final_val_acc

    def end_tracking(self, state: str) -> None:
        """End the trial's MLflow run, if any, as `state` (PRUNED, FAILED or REQUEUED)."""
        if self.tracked is not None:
            self.tracked.end(state)

    def close(self, error: BaseException | None = None) -> None:
        """The attempt's wall time; closes its TensorBoard run and log file (whatever the end),
        and its MLflow run when `error` ended the attempt (`record` ends a finished one)."""
        if error is not None:
            self.end_tracking(outcome(error))
        self.trial.set_user_attr(keys.WALL_TIME, round(time.perf_counter() - self.start, 3))
        if self.teacher_s is not None:  # launch's ETA leaves it out: the teacher is built once
            self.trial.set_user_attr(keys.TEACHER_S, round(self.teacher_s, 3))
        if self.writer is not None:
            extra: dict[str, Any] = {"trial": self.trial.number}
            if self.config is not None:
                extra["seed"] = self.config.seed
            self.writer.close(self.params, extra)
        if self.trial_log is not None:
            self.trial_log.close()


def outcome(error: BaseException) -> str:
    """How an attempt that raised `error` ends for its tracker: PRUNED, REQUEUED or FAILED."""
    from kdsweep.service.storage import StorageError

    if isinstance(error, optuna.TrialPruned):
        return "PRUNED"
    # An interrupt, a trial declared dead meanwhile, a storage outage: its retry continues.
    if isinstance(error, (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError, StorageError)):
        return "REQUEUED"
    return "FAILED"


@dataclass
class Objective:
    study: StudySpec
    preset: str
    runtime: Mapping[str, Any]  # device, threads, data root, ... (not part of the definition)
    artifacts: Path  # checkpoints and kept weights live here (shared storage for many hosts)
    tensorboard: Path | None = None  # runs/<study>/<trial>/ event files when set
    track: str | None = None  # "mlflow": each trial as one MLflow run (kdsweep/service/tracking.py)
    keep_weights: int = 3  # weights of the best few complete trials are kept
    overrides: Mapping[str, Any] = field(default_factory=dict)  # `--set` values the study records
    stop: Any = None  # a worker's stop flag (`is_set()`), set by its signal handler: train() stops cleanly

    def config(self, params: Mapping[str, Any]) -> TrainConfig:
        return self.study.config_for(self.preset, params, self.overrides, **self.runtime)

    def __call__(self, trial: optuna.Trial) -> float:
        run = TrialRun(self, trial)
        config = run.configure()
        checkpoint = self._checkpoint(trial)
        error: BaseException | None = None
        try:
            teacher = run.teacher(config)
            result = train(config, report=run.report, checkpoint=checkpoint, stop=self.stop, teacher=teacher)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            error = exc
            raise  # declared dead and re-queued elsewhere: the retry resumes from the checkpoint
        except (optuna.TrialPruned, Exception) as exc:
            # Pruned or failed for good (a failed trial is replaced by a fresh number): nothing
            # will resume it. Interrupts and dead workers keep theirs for the retry.
            error = exc
            _drop(checkpoint)
            raise
        except BaseException as exc:  # an interrupt: the trial is re-queued
            error = exc
            raise
        finally:
            run.close(error)
        value = run.record(result)
        _drop(checkpoint)
        return value

    def _checkpoint(self, trial: optuna.Trial) -> Path:
        """The trial's checkpoint path, cleared of any left by another study of the same name.

        Paths are per study name and trial number, so a new study (another SQLite file in the
        same folder, or one re-created under the same name) could meet an old study's file: a
        sidecar names the study (its `kdsweep.uid`) that owns the checkpoint.
        """
        path = self.artifacts / "checkpoints" / f"trial-{origin(trial)}.pt"
        owner = path.with_suffix(".owner")
        uid = str(trial.study.user_attrs.get(keys.UID, ""))
        if path.exists() and (not owner.exists() or owner.read_text() != uid):
            log.warning("ignoring %s: it belongs to another study named %r", path, trial.study.study_name)
            path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        owner.write_text(uid)
        return path

    def _keep_weights(self, trial: optuna.Trial, model: torch.nn.Module, value: float) -> None:
        """Store this trial's weights if it is among the best few; drop those pushed out."""
        study = trial.study
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None]
        better = sum((t.value > value) if maximize else (t.value < value) for t in done)
        if better >= self.keep_weights:
            return
        folder = self.artifacts / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"trial-{trial.number}.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        trial.set_user_attr(keys.WEIGHTS, str(path))
        ranked = sorted(done, key=lambda t: t.value, reverse=maximize)
        for t in ranked[self.keep_weights - 1:]:  # this trial takes one of the places
            old = t.user_attrs.get(keys.WEIGHTS)
            if old and Path(old).exists():
                Path(old).unlink(missing_ok=True)
