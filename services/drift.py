"""Per-modality drift: a two-sample Kolmogorov-Smirnov test of recent scores against a reference window.

For each modality the monitored scalar is the model's per-modality defect score (the sigmoid of that
modality's own head), one value per decided unit that has the modality. The first ``window`` values after
start (or after a model change, since another model scores differently) form the reference; after that,
every ``window`` further values form one test window, compared with the reference by
:func:`scipy.stats.ks_2samp`. ``p < alpha`` flags drift for that window.

Why fixed, non-overlapping windows of equal size (default 500):

* The KS test's power grows with the sample size. Testing an ever-growing history against the reference would
  flag any shift, however small, once enough units have passed: at high volume it would always flag. With
  ``n = m = window`` the smallest difference in distribution functions the test detects at ``alpha = 0.05`` is
  fixed, ``D ≈ 1.36 · sqrt(2 / window)`` (0.086 for 500), whatever the throughput: a change of about nine
  percentage points in the share of units below some score.
* Tumbling (non-overlapping) windows make successive tests independent, so under no drift a window is
  flagged with probability ``alpha`` (5 %), no more; alert on several consecutive flags, not on one.
* 500 units is a few minutes of a busy line and small enough that a real change shows within one window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.stats import ks_2samp

from inspection.errors import ConfigError
from inspection.records import MODALITIES


@dataclass(frozen=True)
class DriftResult:
    """One test of one modality.

    Attributes:
        modality: the modality tested.
        statistic: the KS statistic D (largest gap between the two empirical distribution functions).
        p_value: two-sided p-value.
        drift: ``p_value < alpha``.
        n_reference, n_window: sample sizes.
    """

    modality: str
    statistic: float
    p_value: float
    drift: bool
    n_reference: int
    n_window: int


class DriftMonitor:
    """Reference and test windows of a scalar per modality.

    Args:
        window: values per reference window and per test window (>= 20).
        alpha: significance level in (0, 0.5].
        modalities: the modalities monitored.

    Raises:
        ConfigError: an invalid window or alpha.
    """

    def __init__(self, window: int = 500, alpha: float = 0.05, modalities: Iterable[str] = MODALITIES) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 20:
            raise ConfigError(f"drift window must be an integer >= 20; got {window!r}")
        if not (isinstance(alpha, int | float) and 0 < alpha <= 0.5):
            raise ConfigError(f"drift alpha must be in (0, 0.5]; got {alpha!r}")
        self.window = window
        self.alpha = float(alpha)
        self.modalities = tuple(modalities)
        self.reset()

    def reset(self) -> None:
        """Forget the reference and the current windows (a new model scores on a new scale)."""
        self._reference: dict[str, list[float]] = {m: [] for m in self.modalities}
        self._current: dict[str, list[float]] = {m: [] for m in self.modalities}
        self.latest: dict[str, DriftResult] = {}

    def reference_size(self, modality: str) -> int:
        return len(self._reference[modality])

    def add(self, modality: str, value: float) -> DriftResult | None:
        """Add one value; returns the test result when it completed a test window, else None.

        Non-finite values are ignored.
        """
        if modality not in self._reference or not math.isfinite(value):
            return None
        ref = self._reference[modality]
        if len(ref) < self.window:
            ref.append(float(value))
            return None
        cur = self._current[modality]
        cur.append(float(value))
        if len(cur) < self.window:
            return None
        res = ks_2samp(np.asarray(ref), np.asarray(cur), alternative="two-sided", method="auto")
        result = DriftResult(modality, float(res.statistic), float(res.pvalue), bool(res.pvalue < self.alpha),
                             len(ref), len(cur))
        self._current[modality] = []
        self.latest[modality] = result
        return result
