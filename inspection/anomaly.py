"""Normal-only detection: fit on defect-free data, score by deviation.

S segments · T rows · F features · K principal components

:class:`PCADetector` models normal behaviour of multichannel series with principal components of standardised,
window-averaged rows: Hotelling's T² measures how far a window moves *within* the normal subspace, the Q statistic
(squared prediction error) how far it leaves it. Each is divided by its own limit — a high quantile of the
*training* scores times a margin — and a row alarms when either ratio exceeds 1 for most of the last
``persistence`` rows (a trailing median), which suppresses single-row blips the way plant alarms do. Nothing is
fitted on anything but the normal training rows.

:class:`DriftTrackingDetector` is built for plants whose normal operation drifts (fluid warming, slowly changing
vibration levels) far beyond what a short fitting period shows. Each channel is standardised with the fitting
rows, averaged over a trailing window, and compared with a *baseline that tracks slow normal drift* (an
exponential average with time constant ``tau`` rows, starting at the fitting mean). While a channel is over its
limit its baseline stops, so a sustained fault keeps alarming instead of being learned as normal, and the other
channels keep following their drift. Each channel's deviation is divided by its typical normal deviation, a
per-channel scale learned from long normal recordings (:func:`learn_normal_drift`), and a row alarms when the
largest ratio exceeds one margin for most of the last ``persistence`` rows. Scales and margin come only from
normal data: the recording is cut into segments as long as a monitored run, and on each the detector is fitted
on the first rows exactly as it will be in use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _persistent(raw: np.ndarray, persistence: int) -> np.ndarray:
    """``[..., T]`` bool -> int8: the trailing median over ``persistence`` rows (more than half of them alarm)."""
    raw = raw.astype(float)
    if persistence == 1:
        return raw.astype(np.int8)
    c = np.cumsum(np.concatenate([np.zeros(raw.shape[:-1] + (1,)), raw], axis=-1), axis=-1)
    idx = np.arange(1, raw.shape[-1] + 1)
    lo = np.maximum(idx - persistence, 0)
    return (((c[..., idx] - c[..., lo]) / (idx - lo)) > 0.5).astype(np.int8)


@dataclass(frozen=True)
class DriftTrackingConfig:
    """Attributes:
    window: rows averaged into each scored value (trailing mean of standardised rows).
    tau: time constant of the drift-tracking baseline, in rows (drift much slower than this is followed).
    scale_quantile: quantile of a normal segment's absolute deviations that sets a channel's scale (the
        channel's scale is the median of that quantile over the normal segments).
    persistence: trailing rows whose median alarm decides a row.
    """

    window: int = 60
    tau: float = 400.0
    scale_quantile: float = 0.5
    persistence: int = 5

    def __post_init__(self) -> None:
        for name in ("window", "persistence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DriftTrackingConfig.{name} must be an integer >= 1; got {value!r}")
        if not (isinstance(self.tau, int | float) and math.isfinite(self.tau) and self.tau >= 1):
            raise ConfigError(f"DriftTrackingConfig.tau must be a finite number of rows >= 1; got {self.tau!r}")
        if not (isinstance(self.scale_quantile, int | float) and 0 < self.scale_quantile < 1):
            raise ConfigError(f"DriftTrackingConfig.scale_quantile must be in (0, 1); got {self.scale_quantile!r}")


@dataclass(frozen=True)
class NormalDrift:
    """What the detector learned from normal recordings; JSON-safe through :meth:`to_dict`/:meth:`from_dict`.

    Attributes:
        scales: typical absolute deviation of each channel from its tracked baseline on normal segments, in
            standard deviations of the fitting rows, float64 [F], all > 0.
        margin: alarm level of the largest scale-relative deviation (> 0).
        far: false-alarm rate the margin reached on the normal segments it was calibrated on, in [0, 1].
    """

    scales: np.ndarray
    margin: float
    far: float

    def __post_init__(self) -> None:
        scales = np.asarray(self.scales, dtype=np.float64)
        if scales.ndim != 1 or scales.size == 0 or not bool(np.all(np.isfinite(scales) & (scales > 0))):
            raise ConfigError(f"NormalDrift.scales must be a non-empty 1-D array of finite values > 0; got {scales}")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ConfigError(f"NormalDrift.margin must be finite and > 0; got {self.margin!r}")
        if not 0 <= self.far <= 1:
            raise ConfigError(f"NormalDrift.far must be a rate in [0, 1]; got {self.far!r}")
        scales.flags.writeable = False
        object.__setattr__(self, "scales", scales)

    def to_dict(self) -> dict:
        return {"scales": [float(v) for v in self.scales], "margin": float(self.margin), "far": float(self.far)}

    @classmethod
    def from_dict(cls, data: dict) -> NormalDrift:
        unknown = set(data) - {"scales", "margin", "far"}
        if unknown:
            raise ConfigError(f"unknown NormalDrift key(s) {sorted(unknown)}; valid keys are far, margin, scales")
        return cls(scales=np.asarray(data["scales"], dtype=np.float64), margin=float(data["margin"]),
                   far=float(data["far"]))


class DriftTrackingDetector:
    """Fit on a run's first normal rows, then classify its later rows (see the module docstring).

    The learned :class:`NormalDrift` (per-channel scales and margin) is needed for :meth:`score` and
    :meth:`predict`; :meth:`deviations` needs only :meth:`fit` and is what the scales are learned from.
    """

    def __init__(self, config: DriftTrackingConfig = DriftTrackingConfig(), drift: NormalDrift | None = None) -> None:
        self.config = config
        self.drift = drift
        self._fitted = False

    def fit(self, normal: np.ndarray) -> DriftTrackingDetector:
        """Standardise with ``[T, F]`` normal rows; channels constant there are ignored (deviation 0)."""
        normal = np.asarray(normal, float)
        need = self.config.window + 1
        if normal.ndim != 2 or len(normal) < need or not np.isfinite(normal).all():
            raise ConfigError(f"need finite [T, F] normal rows with T >= {need}; got shape {normal.shape}")
        if self.drift is not None and normal.shape[1] != self.drift.scales.shape[0]:
            raise ConfigError(f"the learned scales cover {self.drift.scales.shape[0]} channels; "
                              f"the rows have {normal.shape[1]}")
        std = normal.std(axis=0)
        constant = std <= 1e-9 * (np.abs(normal).max(axis=0) + 1e-12)
        self.mean = normal.mean(axis=0)
        self.std = np.where(constant, np.inf, std)
        self._tail = normal[len(normal) - (self.config.window - 1):]
        self._fitted = True
        return self

    def _smoothed(self, rows: np.ndarray) -> np.ndarray:
        if not self._fitted:
            raise NotCalibratedError("the detector has not been fitted on normal rows; call fit() first")
        rows = np.asarray(rows, float)
        if rows.ndim != 2 or rows.shape[1] != self.mean.shape[0] or len(rows) == 0:
            raise ConfigError(f"expected [T, {self.mean.shape[0]}] rows with T >= 1; got shape {rows.shape}")
        x = np.vstack([self._tail, rows])
        z = trailing_mean((x - self.mean) / self.std, self.config.window)
        return z[len(self._tail):]  # [T, F]

    def deviations(self, rows: np.ndarray) -> np.ndarray:
        """``[T, F]`` deviation of each smoothed channel from its (never stopped) tracked baseline, in standard
        deviations of the fitting rows; rows must directly follow the fitting rows."""
        z = self._smoothed(rows)[None]
        return track_deviations(z, np.ones(z.shape[-1]), math.inf, self.config.tau)[0]

    def score(self, rows: np.ndarray) -> np.ndarray:
        """``[T]`` largest scale-relative deviation over channels (> margin is over the limit)."""
        if self.drift is None:
            raise NotCalibratedError("no NormalDrift learned; pass one from learn_normal_drift() to the detector")
        z = self._smoothed(rows)[None]
        ratio = track_deviations(z, self.drift.scales, self.drift.margin, self.config.tau)[0]
        return ratio.max(axis=-1)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """``[T]`` int8 alarms: the trailing median (over ``persistence`` rows) of ``score > margin``."""
        raw = self.score(rows) > self.drift.margin
        return _persistent(raw, self.config.persistence)


def track_deviations(z: np.ndarray, scales: np.ndarray, margin: float, tau: float) -> np.ndarray:
    """Follow each channel's baseline and return ``|z - baseline| / scales``.

    Args:
        z: smoothed standardised rows of S runs of equal length, [S, T, F].
        scales: per-channel scale, [F].
        margin: a channel's baseline stops while its ratio exceeds this (``math.inf``: never stops).
        tau: time constant of the baseline, in rows; the baseline starts at 0 (the fitting mean).

    Returns:
        Ratios, [S, T, F].
    """
    s, t_rows, f = z.shape
    rate = 1.0 / tau
    base = np.zeros((s, f))
    out = np.empty_like(z)
    for t in range(t_rows):
        ratio = np.abs(z[:, t] - base) / scales  # [S, F]
        out[:, t] = ratio
        base += np.where(ratio > margin, 0.0, rate) * (z[:, t] - base)
    return out


def normal_segments(normal: np.ndarray, segment_rows: int, stride: int) -> list[np.ndarray]:
    """Cut ``[T, F]`` normal rows into ``[segment_rows, F]`` segments starting every ``stride`` rows."""
    normal = np.asarray(normal, float)
    if normal.ndim != 2 or len(normal) < segment_rows:
        raise ConfigError(f"need [T, F] normal rows with T >= {segment_rows}; got shape {normal.shape}")
    if stride < 1:
        raise ConfigError(f"stride must be >= 1 row; got {stride}")
    return [normal[s:s + segment_rows] for s in range(0, len(normal) - segment_rows + 1, stride)]


def learn_normal_drift(segments: Sequence[np.ndarray], config: DriftTrackingConfig, *, train_rows: int,
                       target_far: float) -> NormalDrift:
    """Learn per-channel scales and calibrate the margin on normal segments, each used as a monitored run.

    On every segment the detector is fitted on the first ``train_rows`` rows and run on the rest. A channel's
    scale is the median over segments of the ``scale_quantile`` of its absolute deviation from the tracked
    baseline; the margin is the smallest one whose false-alarm rate over all later rows is at most
    ``target_far`` (bisection on a log scale; the rate falls as the margin grows).

    Args:
        segments: normal runs of equal length, each [T, F] with T > ``train_rows``.
        config: the detector's configuration.
        train_rows: fitting rows at the start of each run.
        target_far: the largest acceptable share of alarmed normal rows, in (0, 1).

    Raises:
        ConfigError: no segments, unequal lengths, too few rows, or a target outside (0, 1).
    """
    if not 0 < target_far < 1:
        raise ConfigError(f"target_far must be in (0, 1); got {target_far!r}")
    if not segments:
        raise ConfigError("need at least one normal segment; got none")
    shapes = {np.shape(seg) for seg in segments}
    if len(shapes) != 1:
        raise ConfigError(f"normal segments must share one [T, F] shape; got {sorted(shapes)}")
    rows = next(iter(shapes))[0]
    if train_rows <= config.window or rows <= train_rows:
        raise ConfigError(f"need window ({config.window}) < train_rows ({train_rows}) < segment rows ({rows})")
    detectors = [DriftTrackingDetector(config).fit(seg[:train_rows]) for seg in segments]
    z = np.stack([d._smoothed(seg[train_rows:]) for d, seg in zip(detectors, segments, strict=True)])  # [S, T, F]
    dev = track_deviations(z, np.ones(z.shape[-1]), math.inf, config.tau)  # [S, T, F]
    scales = np.median(np.quantile(dev, config.scale_quantile, axis=1), axis=0)  # [F]
    if not bool(np.all(scales > 0)):
        dead = [i for i, v in enumerate(scales) if not v > 0]
        raise ConfigError(f"channel(s) {dead} never deviate on the normal segments; drop them before learning")

    def far(margin: float) -> float:
        raw = track_deviations(z, scales, margin, config.tau).max(axis=-1) > margin  # [S, T]
        return float(_persistent(raw, config.persistence).mean())

    lo, hi = 1e-3, 1e4
    if far(hi) > target_far:
        raise ConfigError(f"even margin {hi:g} alarms on {far(hi):.1%} of the normal rows; target {target_far:.1%}")
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if far(mid) > target_far else (lo, mid)
    return NormalDrift(scales=scales, margin=hi, far=far(hi))

