"""kdsweep/service/stats.py: packed masks, binomial and paired (McNemar) intervals, and the
noise lines that `report` and the launch summary print. No model is trained here."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution

from kdsweep.service import report, stats


def trial(number: int, mask: np.ndarray | None, value: float | None = None) -> optuna.trial.FrozenTrial:
    attrs = {}
    if mask is not None:
        attrs = {stats.MASK: stats.pack(mask), stats.MASK_N: len(mask)}
        value = float(mask.mean()) if value is None else value
    t = optuna.trial.create_trial(value=value, params={"kd.alpha": 0.5},
                                  distributions={"kd.alpha": FloatDistribution(0, 1)}, user_attrs=attrs)
    t.number = number
    return t


def test_pack_round_trips_any_length():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 5000):
        mask = rng.random(n) < 0.6
        text = stats.pack(mask)
        assert isinstance(text, str) and len(text) <= 4 * math.ceil(math.ceil(n / 8) / 3)
        assert np.array_equal(stats.unpack(text, n), mask)


def test_binomial_se_matches_the_issue_figures():
    assert stats.binomial_se(0.6, 500) == pytest.approx(0.0219, abs=1e-4)  # 2.2 points
    assert stats.binomial_se(0.6, 5000) == pytest.approx(0.0069, abs=1e-4)


def test_paired_difference_is_the_mean_of_per_image_differences_with_its_standard_error():
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.80
    b = a.copy()
    flip = rng.random(2000) < 0.1  # b disagrees with a on ~10% of the images
    b[flip] = ~b[flip]
    d = a.astype(float) - b.astype(float)
    diff = stats.paired_difference(a, b)
    se = d.std() / math.sqrt(len(d))  # the same estimate, computed independently
    assert diff.mean == pytest.approx(d.mean())
    assert diff.high - diff.mean == pytest.approx(stats.Z95 * se)
    assert diff.a_only == int(((d == 1)).sum()) and diff.b_only == int((d == -1).sum())
    # Identical trials: zero difference, zero width; a clear winner: beyond noise.
    same = stats.paired_difference(a, a)
    assert same.mean == 0 and same.low == same.high == 0 and not same.exceeds_noise
    better = a | (rng.random(2000) < 0.5)
    assert stats.paired_difference(better, a).exceeds_noise
    with pytest.raises(ValueError):
        stats.paired_difference(a, a[:10])


def test_noise_lines_say_within_noise_selection_bias_and_verify():
    rng = np.random.default_rng(2)
    base = rng.random(5000) < 0.7
    close = base.copy()
    idx = rng.choice(5000, 60, replace=False)  # 60 images change: a difference of ~0.1 point
    close[idx] = ~close[idx]
    ranked = sorted([trial(3, base), trial(8, close)], key=lambda t: t.value, reverse=True)
    text = "\n".join(stats.noise_lines(ranked, "q2"))
    assert "biased upwards" in text and "standard error on 5000" in text
    assert "within noise" in text and "kdsweep best q2 --verify` (a race on fresh seeds)" in text
    # Trials that stored no mask still get the selection-bias line, and no interval.
    text = "\n".join(stats.noise_lines([trial(1, None, 0.5), trial(2, None, 0.4)], "q2"))
    assert "biased upwards" in text and "CI" not in text


def test_report_summary_prints_the_paired_interval():
    rng = np.random.default_rng(3)
    study = optuna.create_study(direction="maximize", study_name="q2")
    base = rng.random(1000) < 0.7
    other = base.copy()
    other[:20] = ~other[:20]
    for i, m in enumerate((base, other)):
        t = trial(i, m)
        study.add_trial(t)
    from kdsweep.service.sweep import Sweep

    text = report.summary_markdown(Sweep(study), {}, {})
    assert "How much of the top is noise" in text
    assert "95% CI" in text and "paired on 1000 images" in text and "--verify" in text
