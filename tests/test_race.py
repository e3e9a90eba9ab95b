"""Racing verification with scripted values (no model): corrections, stopping, the null rate."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from kdsweep.service import race


def test_holm_matches_a_hand_computation() -> None:
    # Sorted: 0.005 <= 0.05/4 (yes), 0.01 <= 0.05/3 (yes), 0.03 <= 0.05/2 (no): stop there.
    out = race.holm([0.01, 0.04, 0.03, 0.005], 0.05)
    assert [r for r, _ in out] == [True, False, False, True]
    assert [lvl for _, lvl in out] == pytest.approx([0.05 / 3, 0.05 / 1, 0.05 / 2, 0.05 / 4])
    # Step-down: once one fails, every larger p fails, even below its own threshold.
    assert [r for r, _ in race.holm([0.001, 0.03, 0.045], 0.05)] == [True, False, False]


def test_one_look_matches_a_hand_computation() -> None:
    table = {1: [0.80, 0.82, 0.79, 0.81], 2: [0.78, 0.81, 0.78, 0.78], 3: [0.70, 0.74, 0.71, 0.70]}
    x = np.array(list(table.values()))
    k, n = x.shape
    # Two-way layout by hand: residual SS = total - candidates - seeds.
    total = ((x - x.mean()) ** 2).sum()
    rows = n * ((x.mean(axis=1) - x.mean()) ** 2).sum()
    cols = k * ((x.mean(axis=0) - x.mean()) ** 2).sum()
    df = (k - 1) * (n - 1)
    se = np.sqrt(2 * (total - rows - cols) / df / n)
    alpha = 0.05 / 6  # the look's share of a race with 6 planned looks
    leader, comps = race.look(table, alpha)
    assert leader == 1
    by = {(c.leader, c.other): c for c in comps}
    assert set(by) == {(1, 2), (1, 3), (2, 3)}
    p = {pair: 2 * stats.t.sf(abs(x[pair[0] - 1].mean() - x[pair[1] - 1].mean()) / se, df) for pair in by}
    for pair, c in by.items():
        assert c.se == pytest.approx(se) and c.df == df and c.p == pytest.approx(p[pair])
    order = sorted(p, key=p.get)  # Holm over the three pairs at alpha
    expected, going = {}, True
    for j, pair in enumerate(order):
        going = going and p[pair] <= alpha / (3 - j)
        expected[pair] = going
    assert {pair: c.settled for pair, c in by.items()} == expected
    assert by[(1, 3)].settled and not by[(1, 2)].settled  # 3 is 9 points behind; 2 is within noise
    low, high = by[(1, 3)].interval
    assert low > 0 and high > low  # a settled comparison's interval excludes zero


def test_two_candidates_pool_to_the_paired_t_test() -> None:
    a, b = [0.80, 0.82, 0.79, 0.81, 0.83], [0.78, 0.81, 0.78, 0.78, 0.80]
    _, comps = race.look({0: a, 1: b}, 0.05)
    assert comps[0].p == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_a_clearly_beaten_candidate_stops_at_the_first_look() -> None:
    values = {10: [0.80, 0.82, 0.79, 0.81, 0.80, 0.82, 0.81, 0.80],
              11: [0.60, 0.62, 0.60, 0.61, 0.60, 0.61, 0.62, 0.60]}
    r = race.replay(values, max_seeds=8, min_seeds=3)
    assert r.finished and r.rounds == 3 and r.survivors == [10]
    assert r.stopped[11].n == 3 and r.stopped[11].leader == 10
    assert r.runs() == 6  # against 16 for the fixed grid of 2 x 8
    assert r.winner() == 10


def test_two_inseparable_candidates_run_to_max_seeds() -> None:
    values = {1: [0.80, 0.78, 0.81, 0.79, 0.80, 0.78, 0.81, 0.79],
              2: [0.79, 0.80, 0.79, 0.80, 0.79, 0.80, 0.80, 0.80]}
    r = race.replay(values, max_seeds=8)
    assert r.finished and r.rounds == 8 and sorted(r.survivors) == [1, 2] and not r.stopped
    assert r.runs() == 16
    assert [(c.leader, c.other, c.n) for c in r.last] == [(2, 1, 8)]


def test_a_race_waits_for_the_runs_of_its_next_round() -> None:
    values = {1: [0.8, 0.8, None], 2: [0.7, 0.71], 3: [0.75, 0.74, 0.76]}
    r = race.replay(values, max_seeds=5)
    assert r.rounds == 2 and not r.finished and not r.stopped
    assert r.wanted() == [(1, 2), (2, 2), (3, 2)]


def test_the_reference_is_never_the_winner() -> None:
    values = {race.REFERENCE: [0.9, 0.91, 0.9], 5: [0.7, 0.71, 0.7], 6: [0.69, 0.7, 0.7]}
    r = race.replay(values, max_seeds=3)
    assert r.finished and r.leader == race.REFERENCE
    assert r.winner() == 5


def test_minimize_races_towards_lower_values() -> None:
    values = {1: [0.2, 0.21, 0.2, 0.22], 2: [0.5, 0.52, 0.5, 0.51]}
    r = race.replay(values, max_seeds=4, maximize=False)
    assert r.winner() == 1 and 2 in r.stopped


@pytest.mark.parametrize("k, races", [(2, 2000), (6, 400)])
def test_equal_candidates_are_reported_settled_in_at_most_5_percent_of_races(k: int, races: int) -> None:
    """The null: candidates with identical true values, a seed effect shared by all (paired)
    and independent run noise. Looking after every round must not inflate the error: at most
    alpha = 5% of whole races may settle anything."""
    rng = random.Random(1234)
    settled = 0
    for _ in range(races):
        seed_effect = [rng.gauss(0, 0.01) for _ in range(race.MAX_SEEDS)]
        values = {c: [0.8 + seed_effect[s] + rng.gauss(0, 0.005) for s in range(race.MAX_SEEDS)] for c in range(k)}
        r = race.replay(values)
        settled += bool(r.stopped)
    assert settled / races <= race.ALPHA, settled / races


def test_bad_race_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="min_seeds"):
        race.replay({1: [0.5]}, max_seeds=2, min_seeds=3)


def _state(values: dict[int, list[float]]):
    from kdsweep.service import racing

    return racing.RaceState(None, {}, list(range(1000, 1008)), values, 0, race.replay(values), {"kd.alpha": 0.0})


def test_the_race_says_what_is_settled_and_what_is_not() -> None:
    noisy = [0.80, 0.78, 0.81, 0.79, 0.80, 0.78, 0.81, 0.79]
    text = _state({8: noisy, 43: [0.79, 0.80, 0.79, 0.80, 0.79, 0.80, 0.80, 0.80],
                   5: [v - 0.1 for v in noisy]}).text()
    assert "trial 8 vs trial 5: +0.1000" in text and "settled after 3 seeds" in text
    assert "trial 43 vs trial 8: not separated after 8 seeds" in text
    assert "race finished after 8 rounds, 19 runs: verified winner trial 43" in text


def test_the_alpha0_verdict_is_always_printed() -> None:
    base = [0.80, 0.82, 0.79, 0.81, 0.80, 0.82, 0.81, 0.80]
    helps = _state({3: base, race.REFERENCE: [v - 0.05 for v in base]}).text()
    assert "distillation helps: trial 3 beats the student alone (alpha=0) by +0.0500" in helps
    assert "settled after 3 seeds" in helps
    tied = _state({3: base, race.REFERENCE: [0.81, 0.80, 0.80, 0.80, 0.81, 0.81, 0.80, 0.81]}).text()
    assert "distillation not shown: the student alone (alpha=0) is not separated from the leader after 8 seeds" in tied


def test_a_confidence_near_one_never_reads_100_percent() -> None:
    import dataclasses

    base = [0.80, 0.82, 0.79, 0.81, 0.80, 0.82, 0.81, 0.80]
    state = _state({3: base, race.REFERENCE: [v - 0.05 for v in base]})
    comp = state.race.stopped[race.REFERENCE]
    state.race.stopped[race.REFERENCE] = dataclasses.replace(comp, level=0.00038)  # 99.962% confidence
    text = state.text()
    assert "100.0%" not in text and "+0.0500 (99.9% CI" in text, text
    from kdsweep.service.racing import percent

    assert [percent(c) for c in (0.95, 0.997, 0.9999999)] == ["95.0%", "99.7%", "99.9%"]
