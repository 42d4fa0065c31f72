"""Uncertainty of benchmark numbers: binomial intervals, intervals over seeds, and bootstraps that resample
whole independent sources (recordings, files) rather than the correlated windows cut from them.

Every interval here is a two-sided 95 % interval unless ``level`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Resamples of every bootstrap interval; the generator is seeded, so intervals are reproducible.
BOOTSTRAP_RESAMPLES = 2000


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (independent trials)."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError(f"an interval needs at least one trial; got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}]; got {successes}")
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion: conservative, right for small ``n`` such as
    a count of recordings (20 of 20 correct still has a lower bound of 0.83)."""
    from scipy.stats import beta

    if n <= 0:
        raise ValueError(f"an interval needs at least one trial; got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}]; got {successes}")
    alpha = 1 - level
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return lo, hi


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean of per-seed values (None with fewer than two seeds): how far the mean
    could move with other seeds, i.e. other splits and other training runs."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    half = float(t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / np.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n_groups: int, *, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)``, where ``indices`` draws ``n_groups`` independent
    groups with replacement. Resample the groups that are independent (recordings, files, test units), and let
    ``statistic`` pool what belongs to the drawn groups; resamples whose statistic is undefined (NaN) are
    dropped."""
    if n_groups <= 0:
        raise ValueError(f"a bootstrap needs at least one group; got {n_groups}")
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n_groups, n_groups)) for _ in range(resamples)], dtype=np.float64)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def grouped_accuracy_interval(correct: np.ndarray, groups: Sequence[str], **kw) -> tuple[float, float]:
    """Interval of a pooled accuracy over items that come in correlated groups (windows of one recording):
    the bootstrap resamples whole groups and pools their items."""
    correct = np.asarray(correct, dtype=np.float64)
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    hits = np.bincount(index, weights=correct, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    return bootstrap_interval(lambda pick: hits[pick].sum() / counts[pick].sum(), len(names), **kw)


def f1_interval(scores: np.ndarray, labels: np.ndarray, threshold, **kw) -> tuple[float, float]:
    """Interval of F1 at a fixed threshold, resampling test units (independent units)."""
    pred = np.asarray(scores) >= threshold
    labels = np.asarray(labels, dtype=bool)
    tp, fp, fn = pred & labels, pred & ~labels, ~pred & labels

    def f1(pick: np.ndarray) -> float:
        t, f_p, f_n = tp[pick].sum(), fp[pick].sum(), fn[pick].sum()
        return float(t / (t + 0.5 * (f_p + f_n))) if t + f_p + f_n else float("nan")

    return bootstrap_interval(f1, len(labels), **kw)


__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_interval", "clopper_pearson", "f1_interval",
           "grouped_accuracy_interval", "seed_interval", "wilson"]
