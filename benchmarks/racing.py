"""Racing verification against the fixed grid, replayed on a recorded table of seed replicates.

The table (`benchmarks/racing/q1_seeds.json`, recorded by `python -m benchmarks.seed_table`
through the real training core) holds the final validation accuracy of a real q1 smoke
sweep's top configs on 12 fresh seeds each. Each draw splits the 12 seeds at random into 8 the
verification may use (in a random order: the race's rounds) and 4 held out; the truth of a
draw is the config with the best mean on the 4 held-out seeds, never on seeds a method saw.

* grid: every config x the 8 seeds (top K x 8 runs); it picks the best mean.
* race: `kdsweep.service.race.replay` with its fixed defaults (looks from round 3 to 8, alpha
  0.05 Bonferroni over the looks, Holm over the pairs); it picks its winner (the best
  survivor on the seeds the survivors share).

Both start from the same configs (all K, as the grid), and the race also from the live
candidate rule's subset (`live_rule`: the configs the sweep's one-seed paired intervals could
not separate from the winner). Reported: runs spent, how often each picks the held-out best,
how often the race picks what the grid picks, and the held-out regret (best held-out mean
minus the pick's).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Entry, Skip
from kdsweep.service import race

TABLE = Path(__file__).resolve().parent / "racing" / "q1_seeds.json"
RACE_SEEDS = 8
DRAWS = 2000


def load(path: Path = TABLE) -> tuple[dict[str, Any], dict[int, dict[int, float]]]:
    """(meta, trial -> seed -> value) of the configs recorded on every seed of the table."""
    if not path.exists():
        raise Skip(f"no seed table at {path} (record one with python -m benchmarks.seed_table)")
    table = json.loads(path.read_text())
    values: dict[int, dict[int, float]] = {}
    for r in table["runs"]:
        if r["value"] is not None:
            values.setdefault(r["trial"], {})[r["seed"]] = r["value"]
    seeds = [s for s in table["meta"]["seeds"] if all(s in v for v in values.values())]
    return table["meta"] | {"complete_seeds": seeds}, {t: {s: v[s] for s in seeds} for t, v in values.items()}


def replay(values: dict[int, dict[int, float]], seeds: list[int], configs: list[int], draws: int,
           rng: random.Random, maximize: bool = True) -> dict[str, Any]:
    sign = 1 if maximize else -1
    held_n = len(seeds) - RACE_SEEDS
    hits = {"grid": 0, "race": 0}
    agree, race_runs, regret = 0, [], {"grid": [], "race": []}
    for _ in range(draws):
        order = rng.sample(seeds, len(seeds))
        used, held = order[:RACE_SEEDS], order[RACE_SEEDS:]
        truth = {c: statistics.fmean(values[c][s] for s in held) for c in configs}
        best_held = max(truth.values(), key=lambda v: sign * v)
        grid = max(configs, key=lambda c: (sign * statistics.fmean(values[c][s] for s in used), -c))
        r = race.replay({c: [values[c][s] for s in used] for c in configs}, max_seeds=RACE_SEEDS,
                        maximize=maximize)
        won = r.winner(exclude=())
        for name, pick in (("grid", grid), ("race", won)):
            hits[name] += sign * truth[pick] >= sign * best_held
            regret[name].append(abs(best_held - truth[pick]))
        agree += won == grid
        race_runs.append(r.runs())
    grid_runs = len(configs) * RACE_SEEDS
    return {"configs": len(configs), "held_out_seeds": held_n, "draws": draws,
            "grid_runs": grid_runs, "race_runs_mean": round(statistics.fmean(race_runs), 2),
            "runs_ratio": round(statistics.fmean(race_runs) / grid_runs, 3),
            "grid_picks_held_out_best": round(hits["grid"] / draws, 3),
            "race_picks_held_out_best": round(hits["race"] / draws, 3),
            "race_agrees_with_grid": round(agree / draws, 3),
            "grid_regret_mean": round(statistics.fmean(regret["grid"]), 4),
            "race_regret_mean": round(statistics.fmean(regret["race"]), 4)}


def run(device: str, quick: bool, table: Path = TABLE) -> Entry:
    start = time.perf_counter()
    meta, values = load(table)
    seeds = meta["complete_seeds"]
    if len(seeds) <= RACE_SEEDS:
        raise Skip(f"the seed table holds {len(seeds)} complete seeds; the replay needs more than {RACE_SEEDS}")
    draws = 200 if quick else DRAWS
    configs = sorted(values, key=lambda c: [m["trial"] for m in meta["candidates"]].index(c))
    maximize = bool(meta.get("maximize", True))
    top = replay(values, seeds, configs, draws, random.Random(0), maximize)
    live = [c for c in meta.get("live_rule", []) if c in values]
    live_out = replay(values, seeds, live, draws, random.Random(0), maximize) if len(live) >= 2 else None
    spread = {c: round(statistics.stdev(values[c].values()), 4) for c in configs}
    means = {c: round(statistics.fmean(values[c].values()), 4) for c in configs}
    met = top["runs_ratio"] <= 0.6 and top["race_picks_held_out_best"] >= top["grid_picks_held_out_best"]
    return Entry(
        name="racing_verification", value=top["runs_ratio"], unit="race runs / grid runs (top K x 8)",
        baseline=float(top["grid_runs"]), ratio=top["runs_ratio"],
        goal="<= 0.6, and picks the held-out best at least as often as the grid", device="cpu", met=met,
        details={
            "table": str(table.relative_to(Path(__file__).resolve().parents[1])),
            "recorded": {k: meta[k] for k in ("study", "preset", "overrides", "metric", "sweep_trials", "command", "cpu_seconds")
                         if k in meta},
            "preset_config": meta.get("preset_config"),
            "race": {"min_seeds": race.MIN_SEEDS, "max_seeds": RACE_SEEDS, "alpha": race.ALPHA,
                     "looks": "every round from min_seeds, alpha / looks each (Bonferroni), Holm over the pairs"},
            "top_k": top,
            "live_rule": {"configs": live, "replay": live_out},
            "per_config_mean_over_all_seeds": means,
            "per_config_seed_std": spread,
            "seconds": round(time.perf_counter() - start, 1),
        },
    )
