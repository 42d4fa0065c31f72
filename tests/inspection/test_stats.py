"""Intervals of benchmark numbers against closed forms and published values."""

import numpy as np
import pytest

from inspection.stats import (
    bootstrap_interval,
    clopper_pearson,
    f1_interval,
    grouped_accuracy_interval,
    seed_interval,
    wilson,
)


def test_clopper_pearson_all_correct_has_the_closed_form_lower_bound():
    # k = n: the lower bound solves p^n = alpha / 2, e.g. 6/6 -> 0.54, 20/20 -> 0.83
    for n in (6, 20, 182):
        lo, hi = clopper_pearson(n, n)
        assert lo == pytest.approx(0.025 ** (1 / n)) and hi == 1.0
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))


def test_wilson_matches_its_textbook_value_and_contains_the_proportion():
    # 81 of 263 (Newcombe 1998's example): 0.2553 - 0.3662
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    for k, n in ((0, 5), (5, 5), (590, 654)):
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        clopper_pearson(4, 3)


def test_seed_interval_is_the_student_t_interval_and_needs_two_seeds():
    values = [0.90, 0.88, 0.91]
    lo, hi = seed_interval(values)
    half = 4.302652729911275 * np.std(values, ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
    assert (lo, hi) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert seed_interval([0.9]) is None


def test_grouped_bootstrap_resamples_whole_groups():
    # two recordings, one all right (10 windows) and one all wrong (10 windows): resampled as groups, a draw
    # holds 0, 1 or 2 copies of the good one, so the pooled accuracy is 0, 0.5 or 1 and nothing in between
    correct = np.array([1] * 10 + [0] * 10)
    groups = ["a"] * 10 + ["b"] * 10
    lo, hi = grouped_accuracy_interval(correct, groups)
    assert (lo, hi) == (0.0, 1.0)
    # resampling windows as if independent would give a narrow interval around 0.5 instead
    window_lo, window_hi = bootstrap_interval(lambda pick: correct[pick].mean(), len(correct))
    assert 0.2 < window_lo < 0.5 < window_hi < 0.8
    # reproducible, and a different seed draws differently
    many = np.random.default_rng(1).integers(0, 2, 200)
    names = [f"r{i % 13}" for i in range(200)]
    assert grouped_accuracy_interval(many, names) == grouped_accuracy_interval(many, names)
    assert grouped_accuracy_interval(many, names) != grouped_accuracy_interval(many, names, seed=5)


def test_f1_interval_brackets_the_f1_and_collapses_when_every_unit_is_right():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.4
    scores = np.where(labels, rng.normal(1, 1, 500), rng.normal(-1, 1, 500))
    pred = scores >= 0
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    f1 = tp / (tp + 0.5 * (fp + fn))
    lo, hi = f1_interval(scores, labels, 0.0)
    assert lo < f1 < hi and hi - lo < 0.15
    assert f1_interval(labels.astype(float), labels, 0.5) == (1.0, 1.0)
