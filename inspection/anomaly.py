"""Normal-only detection: fit on defect-free data, score by deviation.

T rows · F features · K principal components

:class:`PCADetector` models normal behaviour of multichannel series with principal components of standardised,
window-averaged rows: Hotelling's T² measures how far a window moves *within* the normal subspace, the Q statistic
(squared prediction error) how far it leaves it. Each is divided by its own limit — a high quantile of the
*training* scores times a margin — and a row alarms when either ratio exceeds 1 for most of the last
``persistence`` rows (a trailing median), which suppresses single-row blips the way plant alarms do. Nothing is
fitted on anything but the normal training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inspection.errors import ConfigError, NotCalibratedError


@dataclass(frozen=True)
class PCADetectorConfig:
    """Attributes:
    window: rows averaged into each scored window (trailing mean).
    variance: share of the training variance the principal subspace keeps.
    quantile: training-score quantile each limit starts from.
    margin: factor on that quantile (room for normal drift after the training period).
    persistence: trailing rows whose median alarm decides a row.
    """

    window: int = 10
    variance: float = 0.95
    quantile: float = 0.995
    margin: float = 1.5
    persistence: int = 5

    def __post_init__(self) -> None:
        if self.window < 1 or self.persistence < 1:
            raise ConfigError("window and persistence must be >= 1")
        if not (0 < self.variance <= 1 and 0 < self.quantile < 1 and self.margin > 0):
            raise ConfigError("variance in (0, 1], quantile in (0, 1) and margin > 0 are required")


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """``[T, F]`` -> ``[T, F]``: the mean of each row and the ``window - 1`` rows before it (fewer at the start)."""
    c = np.cumsum(np.vstack([np.zeros((1, x.shape[1])), x]), axis=0)
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)[:, None]


class PCADetector:
    """Fit on normal rows, then score or classify later rows (see the module docstring)."""

    def __init__(self, config: PCADetectorConfig = PCADetectorConfig()) -> None:
        self.config = config
        self._fitted = False

    def fit(self, normal: np.ndarray) -> PCADetector:
        """Fit on ``[T, F]`` normal rows (constant columns are ignored)."""
        normal = np.asarray(normal, float)
        if normal.ndim != 2 or len(normal) < max(10, 2 * self.config.window):
            raise ConfigError(f"need [T, F] normal rows with T >= {max(10, 2 * self.config.window)}; got {normal.shape}")
        std = normal.std(axis=0)
        self.keep = std > 1e-9 * (np.abs(normal).max(axis=0) + 1e-12)
        self.mean = normal[:, self.keep].mean(axis=0)
        self.std = std[self.keep]
        self._tail = normal[-(self.config.window - 1):] if self.config.window > 1 else normal[:0]
        z = trailing_mean((normal[:, self.keep] - self.mean) / self.std, self.config.window)
        self.center = z.mean(axis=0)
        zc = z - self.center
        cov = np.cov(zc, rowvar=False)
        eigval, eigvec = np.linalg.eigh(np.atleast_2d(cov))
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 1e-12, None), eigvec[:, order]
        k = int(np.searchsorted(np.cumsum(eigval) / eigval.sum(), self.config.variance) + 1)
        self.components, self.eigval = eigvec[:, :k], eigval[:k]
        t2, q = self._stats(zc)
        self.limit_t2 = np.quantile(t2, self.config.quantile) * self.config.margin
        self.limit_q = max(np.quantile(q, self.config.quantile) * self.config.margin, 1e-9)
        self._fitted = True
        return self

    def _stats(self, zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = zc @ self.components  # [T, K]
        t2 = (scores**2 / self.eigval).sum(axis=1)
        q = ((zc - scores @ self.components.T) ** 2).sum(axis=1)
        return t2, q

    def score(self, rows: np.ndarray, *, continue_training: bool = True) -> np.ndarray:
        """``[T]`` deviation ratio (> 1 is outside the normal limits) of rows that follow the training rows.

        Args:
            continue_training: the rows directly follow the training rows, so the first windows may use them.
        """
        if not self._fitted:
            raise NotCalibratedError("the detector has not been fitted on normal data; call fit() first")
        rows = np.asarray(rows, float)
        context = self._tail if continue_training else rows[:0]
        x = np.vstack([context, rows])[:, self.keep]
        z = trailing_mean((x - self.mean) / self.std, self.config.window)[len(context):]
        t2, q = self._stats(z - self.center)
        return np.maximum(t2 / self.limit_t2, q / self.limit_q)

    def predict(self, rows: np.ndarray, *, continue_training: bool = True) -> np.ndarray:
        """``[T]`` int8 alarms: the trailing median (over ``persistence`` rows) of ``score > 1``."""
        raw = (self.score(rows, continue_training=continue_training) > 1.0).astype(float)
        p = self.config.persistence
        if p == 1:
            return raw.astype(np.int8)
        c = np.cumsum(np.concatenate([[0.0], raw]))
        idx = np.arange(1, len(raw) + 1)
        lo = np.maximum(idx - p, 0)
        frac = (c[idx] - c[lo]) / (idx - lo)
        return (frac > 0.5).astype(np.int8)
