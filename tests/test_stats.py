"""The scorecard's statistics: bootstrap intervals over prompts, paired tests, retention, MCQ precision."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfdpo import stats


def test_per_prompt_means_average_each_prompts_samples_and_skip_missing_values():
    rows = [
        {"prompt_id": "a", "score": 1.0}, {"prompt_id": "b", "score": 4.0}, {"prompt_id": "a", "score": 3.0},
        {"prompt_id": "b", "score": None}, {"prompt_id": "c", "score": float("nan")}, {"prompt_id": "b", "score": 6.0},
    ]
    assert stats.per_prompt_means(rows, "score") == {"a": 2.0, "b": 5.0}


def test_summary_interval_covers_the_mean_with_the_textbook_width():
    mu, sigma, n = 2.0, 1.5, 200
    x = np.random.default_rng(0).normal(mu, sigma, n)
    s = stats.summary(list(x))
    lo, hi = s["ci95"]
    assert s["n"] == n and s["score"] == pytest.approx(x.mean())
    assert lo < mu < hi
    assert hi - lo == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.15)


def test_summary_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    mu, sigma, n, reps = 0.3, 1.0, 200, 200
    covered = 0
    for rep in range(reps):
        lo, hi = stats.summary(list(rng.normal(mu, sigma, n)), seed=rep)["ci95"]
        covered += lo <= mu <= hi
    assert covered / reps == pytest.approx(0.95, abs=0.04)


def test_summary_is_deterministic_for_a_seed_and_accepts_a_mapping():
    values = {f"p{i}": v for i, v in enumerate(np.random.default_rng(8).uniform(0, 1, 20))}
    assert stats.summary(values, seed=3) == stats.summary(list(values.values()), seed=3)
    assert stats.summary(values, seed=3)["ci95"] != stats.summary(values, seed=4)["ci95"]
    assert stats.summary([]) == {"score": None, "ci95": None, "n": 0}


@pytest.mark.parametrize("n", [8, 60])  # exact permutation test, Monte Carlo one
def test_paired_identical_lists_are_not_distinguishable(n):
    values = list(np.random.default_rng(1).uniform(0, 1, n))
    r = stats.paired(values, values)
    assert r == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "n": n, "distinguishable": False}


@pytest.mark.parametrize("n", [12, 60])
def test_paired_clear_shift_is_distinguishable(n):
    base = np.random.default_rng(2).uniform(0, 1, n)
    model = base + 0.5 + np.random.default_rng(3).normal(0, 0.05, n)
    r = stats.paired(list(model), list(base))
    assert r["p"] < 0.01 and r["distinguishable"]
    assert r["ci95"][0] < r["diff"] < r["ci95"][1]
    assert r["diff"] == pytest.approx(0.5, abs=0.05)


def test_paired_mappings_are_matched_by_prompt_id():
    model = {"a": 3.0, "b": 1.0, "c": 2.0, "only_model": 9.0}
    base = {"c": 0.5, "a": 1.0, "b": 2.0}
    assert stats.paired(model, base) == stats.paired([3.0, 1.0, 2.0], [1.0, 2.0, 0.5])
    assert stats.paired(model, base)["n"] == 3
    with pytest.raises(ValueError, match="one value per prompt"):
        stats.paired([1.0, 2.0], [1.0])


def test_sign_flip_p_exact_value_and_monte_carlo_agreement(monkeypatch):
    assert stats.sign_flip_p(np.ones(5)) == pytest.approx(2 / 32)  # only all-plus and all-minus are as extreme
    diffs = np.random.default_rng(5).normal(0.3, 1.0, 16)
    exact = stats.sign_flip_p(diffs)
    monkeypatch.setattr(stats, "EXACT_PERMUTATION_MAX_N", 0)
    assert stats.sign_flip_p(diffs, seed=0) == pytest.approx(exact, abs=0.01)


def test_ratio_ci_retention_and_its_undefined_cases():
    base = list(np.random.default_rng(4).uniform(1, 3, 40))
    half = stats.ratio_ci([b / 2 for b in base], base)
    assert half["ratio"] == pytest.approx(0.5) and half["reason"] is None
    assert half["ci95"] == pytest.approx([0.5, 0.5])
    noisy = stats.ratio_ci(list(np.array(base) * np.random.default_rng(6).uniform(0.2, 1.0, 40)), base)
    assert noisy["ci95"][0] < noisy["ratio"] < noisy["ci95"][1]
    zero = stats.ratio_ci([1.0, 2.0], [0.0, 0.0])
    assert zero["ratio"] is None and zero["ci95"] is None and "base mean is 0" in zero["reason"]
    assert stats.ratio_ci({}, {})["reason"] == "no prompt scored for both models"


def test_ratio_ci_leaves_out_resamples_whose_base_mean_is_zero():
    r = stats.ratio_ci([1.0, 1.0, 1.0], [0.0, 0.0, 3.0], n_boot=500)
    assert r["ratio"] == pytest.approx(1.0)
    assert 0 < r["undefined_resamples"] < 500  # (2/3)^3 of resamples draw only zeros
    assert all(math.isfinite(v) for v in r["ci95"])


def test_binomial_se_and_detectable_difference():
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert stats.binomial_se(1.0, 10) == 0.0
    d = stats.detectable_difference(179, 0.5)
    assert d == pytest.approx((1.959964 + 0.841621) * math.sqrt(2 * 0.25 / 179), rel=1e-5)
    assert d > 0.02  # the builtin 179-item set cannot detect a 2-point change
    assert stats.detectable_difference(20_000, 0.5) < 0.02
    assert stats.detectable_difference(179, 0.5, power=0.9) > d
    with pytest.raises(ValueError):
        stats.detectable_difference(0, 0.5)
    with pytest.raises(ValueError):
        stats.binomial_se(0.5, 0)
