"""Every key kdsweep stores in an Optuna study: the schema of a sweep, in one place.

A kdsweep sweep is a plain Optuna study; what kdsweep adds lives in study and trial user
attributes (and a few trial system attributes). These names are database keys: a live study
holds them, so they are never renamed. Only `kdsweep.service.sweep` (and the objective, which
writes a trial's record) should need them; nothing else spells them.
"""

from __future__ import annotations

# The stored-state version of a sweep. 2: kdsweep 0.2 (this module, per-trial sampler seeds,
# re-queue markers). A study without it was written by kdsweep 0.1.
SCHEMA_VERSION = 2

# ---- study user attributes
SCHEMA = "kdsweep.schema"  # SCHEMA_VERSION of the code that created the study
DEFINITION = "kdsweep.definition"  # what defines the study (JSON); workers that differ refuse
N_TRIALS = "kdsweep.n_trials"  # N: COMPLETE + PRUNED trials the study is to finish
MAX_FAILURES = "kdsweep.max_failures"  # failed trials replaced at most; beyond it N shrinks
UID = "kdsweep.uid"  # a random id: tells this study's checkpoints from a namesake's
SEED = "kdsweep.seed"  # the sampler seed the study was created with (--seed)
VERIFY_OF = "kdsweep.verify_of"  # on a `<study>.verify` sibling: the sweep it verifies
BASELINE_OF = "kdsweep.baseline_of"  # on a `<study>.baseline` sibling: the sweep it is the reference of
DESCRIPTION = "description"  # shown by optuna-dashboard
STUDY_FILE = "kdsweep.study_file"  # absolute path of the study file the sweep was created or resumed from
VERIFY_MODE = "kdsweep.verify_mode"  # on a `<study>.verify` sibling: "race" or "grid" (the last request)
RACE_MAX_SEEDS = "kdsweep.race_max_seeds"  # on a `<study>.verify` sibling: the race's planned rounds
STOP = "kdsweep.stop"  # set by `kdsweep stop` (drain): workers re-queue their trial and leave

# ---- trial user attributes: the record of a trial (written by the objective)
CONFIG = "config"  # the full resolved TrainConfig (to_dict): the storage alone reproduces it
TRAIN_SEED = "seed"  # the config's training seed
SAMPLER_SEED = "kdsweep.sampler_seed"  # the seed the sampler drew this trial's values with
DATASET = "dataset"
DEVICE = "device"
PARAMS_COUNT = "params"  # trainable parameters of the model
PARAM_SPLIT = "param_split"  # parameters per part (conv / head)
FLOPS = "flops"  # forward FLOPs per image of the model (2 x conv/linear multiply-accumulates)
VAL_CORRECT = "val_correct"  # last epoch's per-image validation correctness: base64 of np.packbits
VAL_N = "val_n"  # how many validation images VAL_CORRECT holds
TEST_ACC = "test_acc"  # held-out test accuracy (verification and reference runs)
VERSION = "kdsweep_version"  # the kdsweep that ran the trial
EPOCHS_RUN = "epochs_run"
WALL_TIME = "wall_time"  # seconds
TEACHER_S = "teacher_s"  # seconds of WALL_TIME spent building the teacher or waiting for it
IMAGES_PER_S = "images_per_s"
BEST_VAL_ACC = "best_val_acc"
TEACHER_KEY = "teacher_key"
TEACHER_VAL_ACC = "teacher_val_acc"
WEIGHTS = "weights"  # path of the kept weights (best few trials only)
HOST = "host"  # the host name of the worker that ran the attempt
LOG_FILE = "log_file"  # the attempt's own log file, beside its TensorBoard run
INFEASIBLE = "infeasible"  # its choices cannot meet the budget: PRUNED, not counted in N
FAIL_REASON = "fail_reason"  # why an attempt failed (or was re-queued)
PRUNED_REASON = "pruned_reason"
# `--fuse K` (kdsweep/service/fused_worker.py): {"slots": K, "data_seed", "joined_step"}, what
# reproduces a fused trial's data order (the group's batch stream from that step on).
FUSED = "fused"
# Set on an attempt that was put back in the queue (interrupt, dead worker, storage outage):
# such an attempt is FAIL in Optuna but never a failure to kdsweep (not in the failure limit,
# not in any count of failures). Its value is the reason: "interrupted", "worker died", ...
REQUEUED = "kdsweep.requeued"
# Verification runs (in a `<study>.verify` sibling)
VERIFY_SOURCE = "verify.source_trial"  # the sweep trial whose params it re-trains
VERIFY_SEED = "verify.seed"  # its training seed (replaces the config's)
VERIFY_RANK = "verify.rank"  # that sweep trial's rank when it was verified
REFERENCE_SOURCE = -1  # VERIFY_SOURCE of the alpha=0 reference's runs (service/baseline.py)
# The alpha=0 reference run (in a `<study>.baseline` sibling, and among verification runs)
BASELINE_REFERENCE = "baseline.reference"

# ---- trial system attributes
ORIGIN = "failed_trial"  # on a retry: the number of the first attempt (Optuna's own key)
REQUEUED_BECAUSE = "requeued_because"
RETRIES = "kdsweep.retries"  # dead-worker retries so far of this trial (given up after 3)
FIXED_PARAMS = "fixed_params"  # Optuna's key for enqueued values, kept across a re-queue
RUNG_PREFIX = "completed_rung_"  # successive halving / Hyperband: a trial's value per rung
