"""`pruning_epoch_savings`: time to accuracy with and without a pruner, replayed over recorded curves.

The curves are a table of full learning curves recorded by `benchmarks/curves.py` (Q1's whole
space, every configuration trained to the end through the real training core; see
docs/benchmarks.md for the command). No training happens here: a pruner is fed the recorded
values exactly as the objective feeds it (`trial.report`, then `should_prune` at every epoch
but the last, in a real in-memory Optuna study), which is exact because `train()` is
deterministic on CPU, so a pruned trial's curve is a prefix of its full one. The slow test
`tests/test_benchmarks.py::test_replay_equals_a_real_pruned_run` checks this against a real
pruned sweep through `kdsweep.service.objective.Objective`.

Method (all seeds fixed and recorded in the details):
* The table's configurations are split in two halves (a seeded permutation of their ids).
  `CurvePruner`'s parameters are tuned on the first half only (a small grid, scored on random
  sequences of that half: the best ratio of totals with a miss rate <= 1%).
* Scoring uses >= 200 random 16-configuration sequences of the held-out half. Per sequence:

      target   = the unpruned sweep's final best - 0.5 points
      E_none   = epochs the unpruned sweep spends until a finished trial reaches `target`
      E_pruned = the same for the pruned sweep
      ratio    = E_none / E_pruned

  A *miss* (the pruned sweep never reaches `target`) is charged the pruned sweep's whole
  budget plus E_none (run it again unpruned), so it counts as a ratio below 1, never as a gain.
  Reported per pruner: the ratio of totals, the mean ratio with a 95% bootstrap interval, the
  miss rate, epochs saved, and a paired bootstrap against Hyperband; plus the oracle ceiling
  (every trial before the first one that reaches `target` stopped at `min_epoch`) and the
  ceiling of the stopping criterion itself (`clairvoyant`: a trial that will not end within
  0.5 points of the incumbent of its time stopped at `min_epoch`, knowing its final value).
* The live check: TPE (the study's own sampler) samples Q1's space; each sampled point is mapped
  to the nearest recorded configuration of the held-out half (same family and regulariser when
  the half has one, then the nearest learning rate, rate and width on log/linear scales), whose
  curve is replayed. TPE with `CurvePruner` and TPE without pruning get the same budget of
  epochs; the best value reached at 25/50/100% of it is averaged over sampler seeds.
* The per-call cost of `CurvePruner.prune` with 2,000 complete trials in the study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna

from benchmarks.common import Entry
from kdsweep.service import space as sp
from kdsweep.service import spec as studies
from kdsweep.service.pruners import CurvePruner

MARGIN = 0.005  # 0.5 points of accuracy
TABLE = Path(__file__).resolve().parent / "curves" / "q1.json"
SPLIT_SEED = 0  # permutation of config ids: first half tunes, second half scores
TUNE_SEQUENCES, SCORE_SEQUENCES, SEQUENCE_LEN = 100, 300, 16
BOOTSTRAP = 2000
# CurvePruner's grid (min_epoch x confidence x slope_weight; the other parameters keep their
# defaults). slope_weight stays >= 0.5: below it, a slow starter gaining 15 points an epoch at
# epoch 3 (tests/test_pruners.py) is cut, and keeping slow starters is a requirement, not a knob.
GRID = {"min_epoch": (2, 3), "confidence": (0.8, 0.9, 0.95), "slope_weight": (0.5, 1.0)}
TUNE_MAX_MISS = 0.01
LIVE_TRIALS, LIVE_SEEDS = 20, 10  # live check: a budget of 20 unpruned trials' epochs, 10 sampler seeds
Q2_SEQUENCE_LEN = 8  # q2's table is smaller

Curve = list  # per-epoch values; a trailing None marks a diverged (failed) trial
Outcome = list  # [(epochs run, final value or None)] per trial, in order


# --- the replay -----------------------------------------------------------------------------

def replay(curves: Sequence[Curve], pruner: optuna.pruners.BasePruner, name: str = "replay") -> Outcome:
    """Run a pruner over recorded full learning curves, as if the trials trained again.

    Exactly the objective's protocol: report every epoch's value, then ask `should_prune` at every
    epoch but the last (a trial that reaches its last epoch completes). A curve ending in None
    diverged there: the trial FAILs after its reported epochs, as a TrainingError fails it.
    """
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
    out = []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            if value is None:  # the trial failed (diverged) after epoch - 1
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                out.append((epoch - 1, None))
                break
            trial.report(value, epoch)
            if epoch < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                out.append((epoch, None))
                break
        else:
            if curve and curve[-1] is not None:
                study.tell(trial, curve[-1])
                out.append((len(curve), curve[-1]))
    return out


def unpruned(curves: Sequence[Curve]) -> Outcome:
    """What a sweep without a pruner does (the same as replaying NopPruner, without Optuna)."""
    out = []
    for c in curves:
        out.append((len(c) - 1, None) if c and c[-1] is None else (len(c), c[-1]))
    return out


def epochs_to(trials: Outcome, target: float) -> int | None:
    """Epochs spent until a finished trial reaches `target` (None: never)."""
    spent = 0
    for epochs, value in trials:
        spent += epochs
        if value is not None and value >= target:
            return spent
    return None


@dataclasses.dataclass(frozen=True)
class Score:
    e_none: int  # epochs the unpruned sweep needs to get within MARGIN of its final best
    e_pruned: int | None  # the same for the pruned sweep; None: a miss
    total_pruned: int  # epochs the pruned sweep spends in all

    @property
    def charged(self) -> int:
        """E_pruned, or for a miss the whole pruned sweep plus an unpruned one up to the target."""
        return self.e_pruned if self.e_pruned is not None else self.total_pruned + self.e_none

    @property
    def ratio(self) -> float:
        return self.e_none / self.charged


def score(curves: Sequence[Curve], outcome: Outcome) -> Score:
    base = unpruned(curves)
    target = max(v for _, v in base if v is not None) - MARGIN
    e_none = epochs_to(base, target)
    assert e_none is not None
    return Score(e_none, epochs_to(outcome, target), sum(e for e, _ in outcome))


def oracle(curves: Sequence[Curve], min_epoch: int) -> Score:
    """Every trial before the first one that reaches the target stopped at `min_epoch`."""
    base = unpruned(curves)
    target = max(v for _, v in base if v is not None) - MARGIN
    outcome = []
    for e, v in base:
        if v is not None and v >= target:
            outcome.append((e, v))
            break
        outcome.append((min(min_epoch, e), None))
    return score(curves, outcome)


def clairvoyant(curves: Sequence[Curve], min_epoch: int) -> Score:
    """The best any pruner with this stopping criterion can do: a trial that will not end within
    MARGIN of the incumbent *of its time* is stopped at `min_epoch`, every other one runs to the
    end (knowing each trial's final value, but not the future's better trials)."""
    outcome: Outcome = []
    best = None
    for c in curves:
        if c and c[-1] is None:
            outcome.append((len(c) - 1, None))
        elif best is not None and c[-1] < best - MARGIN:
            outcome.append((min(min_epoch, len(c)), None))
        else:
            outcome.append((len(c), c[-1]))
            best = c[-1] if best is None else max(best, c[-1])
    return score(curves, outcome)


# --- the table, its split and the sequences -------------------------------------------------

def load(path: Path = TABLE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    table = json.loads(path.read_text())
    configs = table["configs"]
    for c in configs:
        c["replay"] = list(c["curve"]) + ([None] if c["diverged"] else [])
    return table["meta"], configs


def split(configs: list[dict[str, Any]], seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    ids = sorted(c["id"] for c in configs)
    random.Random(seed).shuffle(ids)
    tune = set(ids[: len(ids) // 2])
    return [c for c in configs if c["id"] in tune], [c for c in configs if c["id"] not in tune]


def sequences(configs: list[dict[str, Any]], n: int, seed: int, length: int = SEQUENCE_LEN) -> list[list[dict]]:
    rng = random.Random(seed)
    return [rng.sample(configs, length) for _ in range(n)]


# --- pruners --------------------------------------------------------------------------------

def stock(epochs: int) -> dict[str, Callable[[], optuna.pruners.BasePruner]]:
    P = optuna.pruners
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return {
        "hyperband(1..T, eta 3)": lambda: P.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3),
        "successive halving(min 1, eta 3)": lambda: P.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "median(5 startup, 1 warm-up)": lambda: P.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    }


def evaluate(seqs: list[list[dict]], make: Callable[[], optuna.pruners.BasePruner]) -> list[Score]:
    out = []
    for i, seq in enumerate(seqs):
        curves = [c["replay"] for c in seq]
        out.append(score(curves, replay(curves, make(), f"seq-{i}")))
    return out


def summary(scores: list[Score], seed: int = 0) -> dict[str, Any]:
    ratios = [s.ratio for s in scores]
    lo, hi = bootstrap_ci([s.ratio for s in scores], seed)
    return {
        "ratio_of_totals": round(sum(s.e_none for s in scores) / sum(s.charged for s in scores), 3),
        "mean_ratio": round(statistics.fmean(ratios), 3),
        "mean_ratio_95ci": [round(lo, 3), round(hi, 3)],
        "miss_rate": round(sum(s.e_pruned is None for s in scores) / len(scores), 4),
        "epochs_to_target": sum(s.charged for s in scores),
        "epochs_to_target_unpruned": sum(s.e_none for s in scores),
        "epochs_saved": sum(s.e_none - s.charged for s in scores),
        "epochs_spent": sum(s.total_pruned for s in scores),
    }


def bootstrap_ci(values: list[float], seed: int, level: float = 0.95) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(BOOTSTRAP))
    return means[int((1 - level) / 2 * BOOTSTRAP)], means[int((1 + level) / 2 * BOOTSTRAP) - 1]


def paired(a: list[Score], b: list[Score], seed: int = 1) -> dict[str, Any]:
    """Paired bootstrap over sequences: mean ratio and miss rate of a minus b."""
    rng = random.Random(seed)
    n = len(a)
    d_ratio, d_miss = [], []
    for _ in range(BOOTSTRAP):
        idx = [rng.randrange(n) for _ in range(n)]
        d_ratio.append(statistics.fmean(a[i].ratio - b[i].ratio for i in idx))
        d_miss.append(statistics.fmean((a[i].e_pruned is None) - (b[i].e_pruned is None) for i in idx))
    d_ratio.sort()
    d_miss.sort()
    k_lo, k_hi = int(0.025 * BOOTSTRAP), int(0.975 * BOOTSTRAP) - 1
    return {
        "mean_ratio_diff": round(statistics.fmean(s.ratio for s in a) - statistics.fmean(s.ratio for s in b), 3),
        "mean_ratio_diff_95ci": [round(d_ratio[k_lo], 3), round(d_ratio[k_hi], 3)],
        "p_ratio_not_ahead": round(sum(d <= 0 for d in d_ratio) / BOOTSTRAP, 4),
        "miss_rate_diff_95ci": [round(d_miss[k_lo], 4), round(d_miss[k_hi], 4)],
        "p_miss_not_lower": round(sum(d >= 0 for d in d_miss) / BOOTSTRAP, 4),
    }


def tune(seqs: list[list[dict]], epochs: int) -> tuple[dict[str, Any], list]:
    """The grid point with the best ratio of totals whose miss rate is <= TUNE_MAX_MISS."""
    rows = []
    for min_epoch in GRID["min_epoch"]:
        for confidence in GRID["confidence"]:
            for slope_weight in GRID["slope_weight"]:
                params = {"min_epoch": min_epoch, "confidence": confidence, "slope_weight": slope_weight}
                s = evaluate(seqs, lambda p=params: CurvePruner(epochs, margin=MARGIN, **p))
                miss = sum(x.e_pruned is None for x in s) / len(s)
                total = sum(x.e_none for x in s) / sum(x.charged for x in s)
                rows.append({**params, "ratio_of_totals": round(total, 3), "miss_rate": round(miss, 3)})
    ok = [r for r in rows if r["miss_rate"] <= TUNE_MAX_MISS] or rows
    best = max(ok, key=lambda r: (r["ratio_of_totals"], -r["miss_rate"]))
    return {k: best[k] for k in GRID}, rows


# --- the live check: TPE over the recorded table ---------------------------------------------

def nearest(params: dict[str, Any], configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The recorded configuration closest to a sampled point (family and regulariser first)."""
    def key(c: dict[str, Any]) -> tuple:
        p = c["params"]
        d = abs(math.log(p["optim.lr"] / params["optim.lr"]))
        d += abs(p.get("mlp.dropout", 0) - params.get("mlp.dropout", 0)) * 4
        d += abs(p.get("reg.rate", 0) - params.get("reg.rate", 0)) * 4
        if "cnn.width" in params and "cnn.width" in p:
            d += abs(math.log(p["cnn.width"] / params["cnn.width"]))
            d += 0.5 * (p["cnn.factorized"] != params["cnn.factorized"])
            d += 0.25 * (p.get("dropblock.size") != params.get("dropblock.size"))
        return (p["model.family"] != params["model.family"], p.get("reg.kind") != params.get("reg.kind"), d, c["id"])
    return min(configs, key=key)


def live(configs: list[dict[str, Any]], space: list[sp.Param], sampler: Callable[[int], optuna.samplers.BaseSampler],
         make: Callable[[], optuna.pruners.BasePruner] | None, budget: int, seed: int
         ) -> tuple[list[float | None], int]:
    """TPE over the table at a budget of epochs: the best complete value at 25/50/100% of it, and
    the number of trials started."""
    study = optuna.create_study(direction="maximize", sampler=sampler(seed),
                                pruner=make() if make else optuna.pruners.NopPruner())
    spent, best, marks, started = 0, None, [], 0
    checkpoints = [budget // 4, budget // 2, budget]
    while spent < budget:
        trial = study.ask()
        started += 1
        curve = nearest(sp.sample(trial, space), configs)["replay"]
        state, value = optuna.trial.TrialState.COMPLETE, None
        for epoch, v in enumerate(curve, start=1):
            if spent >= budget:
                state = optuna.trial.TrialState.FAIL  # the budget ran out mid-trial
                break
            if v is None:
                state = optuna.trial.TrialState.FAIL
                break
            spent += 1
            while checkpoints and spent > checkpoints[0]:
                marks.append(best)
                checkpoints.pop(0)
            trial.report(v, epoch)
            if epoch < len(curve) and trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
        else:
            value = curve[-1]
        if state == optuna.trial.TrialState.COMPLETE and value is not None:
            study.tell(trial, value)
            best = value if best is None else max(best, value)
        else:
            study.tell(trial, state=state)
    while checkpoints:
        marks.append(best)
        checkpoints.pop(0)
    return marks, started


# --- the check that a replay is what a real sweep does --------------------------------------

def real_vs_replay(tmp: Path, n_trials: int = 6, seed: int = 0) -> dict[str, Any]:
    """Train a small Q1 sweep for real twice (no pruner; an aggressive CurvePruner) through
    kdsweep's objective, replay the unpruned curves through the same pruner, and compare."""
    from kdsweep.core.train import TrainingError
    from kdsweep.service.objective import Objective

    q1 = studies.load("q1")
    overrides = {"epochs": 4, "data.train_subset": 600, "data.val_size": 500, "data.image_size": 14}
    params = [sp.sample(t, q1.space_for("smoke", overrides)) for t in
              (lambda s: [s.ask() for _ in range(n_trials)])(
                  optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)))]

    def make() -> CurvePruner:  # prunes readily, so the check has pruned trials to compare
        return CurvePruner(4, min_epoch=1, confidence=0.6, prior_spread=0.01)

    runs = {}
    for name, pruner in (("none", optuna.pruners.NopPruner()), ("curve", make())):
        study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
        for p in params:
            study.enqueue_trial(p)
        objective = Objective(q1, "smoke", {"device": "cpu", "threads": 1}, tmp / name, tensorboard=None,
                              keep_weights=0, overrides=overrides)
        study.optimize(objective, n_trials=n_trials, catch=(TrainingError,))
        runs[name] = study.trials
    curves = []
    for t in runs["none"]:
        curve = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        curves.append(curve + [None] if t.state == optuna.trial.TrialState.FAIL else curve)
    real = [(len(t.intermediate_values), t.value if t.state == optuna.trial.TrialState.COMPLETE else None)
            for t in runs["curve"]]
    return {"real": real, "replayed": replay(curves, make()), "curves": curves}


# --- cost -----------------------------------------------------------------------------------

def per_call_ms(pruner: CurvePruner, configs: list[dict[str, Any]], n_trials: int = 2000, calls: int = 200
                ) -> dict[str, float]:
    """Milliseconds per `prune` call with n_trials complete trials in an in-memory study."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    full = [c["curve"] for c in configs if not c["diverged"]]
    dist = optuna.distributions.FloatDistribution(0, 1)
    study.add_trials([
        optuna.trial.create_trial(
            params={"x": i / n_trials}, distributions={"x": dist}, value=full[i % len(full)][-1],
            intermediate_values={e: v for e, v in enumerate(full[i % len(full)], start=1)})
        for i in range(n_trials)])
    trial = study.ask()
    for e, v in enumerate(full[0][:3], start=1):
        trial.report(v, e)
    frozen = study._storage.get_trial(trial._trial_id)
    t0 = time.perf_counter()
    pruner.prune(study, frozen)  # the first call adds all 2,000 curves to the sums
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        frozen = study._storage.get_trial(trial._trial_id)
        pruner.prune(study, frozen)
    warm = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    for _ in range(calls // 10):  # should_prune as the objective calls it (storage read included)
        trial.should_prune()
    via_trial = (time.perf_counter() - t0) / (calls // 10)
    return {"first_call_ms": round(first * 1e3, 2), "per_call_ms": round(warm * 1e3, 3),
            "should_prune_ms": round(via_trial * 1e3, 3), "trials": n_trials}


# --- the entry ------------------------------------------------------------------------------

def assess(table: Path, quick: bool, sequence_len: int = SEQUENCE_LEN) -> tuple[dict[str, Any], Any]:
    """Tune on one half of a table, score CurvePruner and the stock pruners on the other half."""
    start = time.perf_counter()
    meta, configs = load(table)
    epochs = meta["epochs"]
    tune_half, test_half = split(configs)
    n_tune, n_score = (20, 30) if quick else (TUNE_SEQUENCES, SCORE_SEQUENCES)
    sequence_len = min(sequence_len, len(tune_half), len(test_half))
    tune_seqs = sequences(tune_half, n_tune, seed=1, length=sequence_len)
    tuned, grid = tune(tune_seqs, epochs)
    clock = {"tune_s": round(time.perf_counter() - start, 1)}
    seqs = sequences(test_half, n_score, seed=2, length=sequence_len)
    name = "curve (tuned)"
    makers = {name: lambda: CurvePruner(epochs, margin=MARGIN, **tuned), **stock(epochs)}
    study = studies.load(meta["study"])  # what the study file uses today, on the table's config
    makers[f"studies/{meta['study']}.py's pruner"] = lambda: study.pruner(
        study.base_config(meta["preset"], meta["overrides"]))
    scores = {k: evaluate(seqs, m) for k, m in makers.items()}
    clock["score_s"] = round(time.perf_counter() - start - clock["tune_s"], 1)
    results = {k: summary(s) for k, s in scores.items()}
    for k in results:
        if k != HB:
            results[k]["paired_vs_hyperband"] = paired(scores[k], scores[HB])
    results[f"oracle(min_epoch {tuned['min_epoch']})"] = summary(
        [oracle([c["replay"] for c in seq], tuned["min_epoch"]) for seq in seqs])
    results[f"clairvoyant incumbent rule(min_epoch {tuned['min_epoch']})"] = summary(
        [clairvoyant([c["replay"] for c in seq], tuned["min_epoch"]) for seq in seqs])
    ours, hb = results[name], results[HB]
    out = {
        "table": f"{table.name}: {len(configs)} configs, {epochs} epochs; recorded by: {meta['command']}",
        "split": {"seed": SPLIT_SEED, "tune_ids": sorted(c["id"] for c in tune_half),
                  "score_ids": sorted(c["id"] for c in test_half)},
        "tuned": {**tuned, "margin": MARGIN}, "tune_grid": grid, "tune_sequences": n_tune,
        "score_sequences": n_score, "sequence_len": sequence_len, "pruners": results,
        "beats_hyperband_on_both": ours["mean_ratio"] > hb["mean_ratio"] and ours["miss_rate"] <= hb["miss_rate"],
        "seconds": clock,
    }
    return out, (meta, configs, test_half, tuned)


HB = "hyperband(1..T, eta 3)"
Q2_TABLE = TABLE.with_name("q2.json")


def run(device: str, quick: bool, table: Path = TABLE) -> Entry:
    logging.getLogger("optuna").setLevel(logging.WARNING)
    start = time.perf_counter()
    q1_out, (meta, configs, test_half, tuned) = assess(table, quick)
    epochs = meta["epochs"]

    # The live check: the study's own sampler over the held-out half, equal budgets of epochs.
    q1 = studies.load("q1")
    space = q1.space_for(meta["preset"], meta["overrides"])
    seeds = 2 if quick else LIVE_SEEDS
    budget = LIVE_TRIALS * epochs  # what LIVE_TRIALS unpruned trials cost
    live_rows = {}
    t0 = time.perf_counter()
    for label, make in (("tpe", None), ("tpe+curve", lambda: CurvePruner(epochs, margin=MARGIN, **tuned))):
        runs = [live(test_half, space, q1.sampler, make, budget, seed) for seed in range(seeds)]
        live_rows[label] = {f"{p}%": round(statistics.fmean(r[0][i] for r in runs if r[0][i] is not None), 4)
                            for i, p in enumerate((25, 50, 100))}
        live_rows[label]["trials_started"] = round(statistics.fmean(r[1] for r in runs), 1)
        live_rows[label]["per_seed_100%"] = [r[0][2] for r in runs]
    live_s = round(time.perf_counter() - t0, 1)
    cost = per_call_ms(CurvePruner(epochs, margin=MARGIN, **tuned), configs)
    q2_out = None
    if Q2_TABLE.exists() and len(load(Q2_TABLE)[1]) >= 4 * Q2_SEQUENCE_LEN:  # enough for two halves
        q2_out = assess(Q2_TABLE, quick, sequence_len=Q2_SEQUENCE_LEN)[0]

    ours, hb = q1_out["pruners"]["curve (tuned)"], q1_out["pruners"][HB]
    goal_met = (ours["mean_ratio"] >= 1.8 and ours["miss_rate"] <= 0.02 and q1_out["beats_hyperband_on_both"])
    return Entry(
        name="pruning_epoch_savings", value=ours["mean_ratio"], unit="x fewer epochs to within 0.5 pt (mean)",
        baseline=hb["mean_ratio"], ratio=ours["mean_ratio"],
        goal=">= 1.8, misses <= 2%, ahead of Hyperband on both", device="cpu", met=goal_met,
        details={
            **q1_out,
            "live_check": {"budget_epochs": budget, "sampler_seeds": seeds, "sampler": "studies/q1.py's (TPE)",
                           "configs": len(test_half), "best_val_acc": live_rows, "seconds": live_s,
                           "table_best": max(c["curve"][-1] for c in test_half if not c["diverged"])},
            "cost_at_2000_trials": cost,
            "q2": q2_out,
            "seconds_total": round(time.perf_counter() - start, 1),
        },
    )
