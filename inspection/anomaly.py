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

:class:`SlopeT2Detector` is a Hotelling T² on smoothed, standardised features for plants whose thermal channels
wander far in normal operation while their *rates* of change stay typical: every channel enters as its level
except the ``differenced`` ones (temperatures), which enter only as their ``lag``-row difference
x[t] − x[t−lag]. Features are standardised with the fitting rows, constant ones dropped, smoothed causally (a
trailing mean over ``window`` rows, or an exponential average with rate λ), and scored by T² against the mean and
ridge-regularised covariance of the fitting rows' smoothed features. The threshold is a quantile of the fitting
rows' own scores times a factor (with a trailing mean, the first fitting rows average fewer rows and score far
higher than full windows, so a quantile near 1 is set by them: the threshold then sits at the T² of nearly
unsmoothed rows, well above the smoothed rows' spread), and a persistence rule ("all" or "majority" of the last
``persistence`` raw alarms) decides each row. Every predicted row uses only itself and earlier rows; the detector
keeps the context it needs, so later rows can be fed in chunks of any size, with the same result as one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inspection.config import from_dict, to_dict
from inspection.errors import ConfigError, DataError, NotCalibratedError


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


SMOOTHINGS: tuple[str, ...] = ("box", "ewma")
"""Causal smoothings of :class:`SlopeT2Detector`: trailing mean, exponential average."""

PERSISTENCE_RULES: tuple[str, ...] = ("all", "majority")
"""Persistence rules: a row alarms iff all / more than half of the last ``persistence`` raw alarms are set."""

#: Features whose fitting-row standard deviation is below this are constant there and dropped.
_CONSTANT_STD = 1e-9


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class SlopeT2Config:
    """Configuration of :class:`SlopeT2Detector`.

    The defaults are label-free: a rule fixed before any labelled data is scored (for SKAB, the a-priori
    configuration ``inspection.skab_protocol.A_PRIORI``): lag and box window of one minute at 1 Hz, the usual
    control-chart limit (0.99 quantile of the fitting rows' own scores, factor 1) and no persistence rule. They
    are not tuned on any labelled file.

    Attributes:
    channels: names of the input columns, in order (for SKAB, ``inspection.data.skab.FEATURES``).
    differenced: channels that enter only as their ``lag``-row difference x[t] − x[t−lag] (channels whose level
        drifts in normal operation, e.g. temperatures); every other channel enters as its level. Features are
        ordered: levels in input order, then differences in this order.
    lag: rows between the two readings of a difference.
    smoothing: ``"box"`` (trailing mean over ``window`` rows) or ``"ewma"`` (exponential average, rate ``rate``).
    window: rows of the trailing mean (box only).
    rate: weight λ of the newest row in the exponential average, in (0, 1] (ewma only).
    warmup: first fitting rows an exponential average needs before its scores count (ewma only).
    quantile: quantile of the fitting rows' own scores the threshold starts from, in (0, 1] (1 = their maximum).
    factor: multiplier on that quantile.
    rule: ``"all"`` (a row alarms iff its last ``persistence`` raw alarms are all set) or ``"majority"`` (more
        than half of them; fewer rows at the start of the predicted rows).
    persistence: rows the rule looks back over (1: the raw alarm).
    ridge: added to the covariance diagonal, as a share of the mean feature variance (trace / features).
    """

    channels: tuple[str, ...]
    differenced: tuple[str, ...] = ()
    lag: int = 60
    smoothing: str = "box"
    window: int = 60
    rate: float = 0.1
    warmup: int = 60
    quantile: float = 0.99
    factor: float = 1.0
    rule: str = "all"
    persistence: int = 1
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("channels", "differenced"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
                raise ConfigError(f"SlopeT2Config.{name} must be a sequence of channel names; got {value!r}")
            names = tuple(value)
            if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"SlopeT2Config.{name} must hold distinct non-empty names; got {names!r}")
            object.__setattr__(self, name, names)
        if not self.channels:
            raise ConfigError("SlopeT2Config.channels must name at least one input column; got none")
        unknown = [n for n in self.differenced if n not in self.channels]
        if unknown:
            raise ConfigError(f"SlopeT2Config.differenced names {unknown}, which are not among the channels "
                              f"{self.channels}")
        for name, low in (("lag", 1), ("window", 1), ("warmup", 0), ("persistence", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"SlopeT2Config.{name} must be an integer >= {low}; got {value!r}")
        if self.smoothing not in SMOOTHINGS:
            raise ConfigError(f"SlopeT2Config.smoothing must be one of {SMOOTHINGS}; got {self.smoothing!r}")
        if self.rule not in PERSISTENCE_RULES:
            raise ConfigError(f"SlopeT2Config.rule must be one of {PERSISTENCE_RULES}; got {self.rule!r}")
        if not (_is_number(self.rate) and 0 < self.rate <= 1):
            raise ConfigError(f"SlopeT2Config.rate must be in (0, 1]; got {self.rate!r}")
        if not (_is_number(self.quantile) and 0 < self.quantile <= 1):
            raise ConfigError(f"SlopeT2Config.quantile must be in (0, 1]; got {self.quantile!r}")
        if not (_is_number(self.factor) and math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"SlopeT2Config.factor must be a finite number > 0; got {self.factor!r}")
        if not (_is_number(self.ridge) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise ConfigError(f"SlopeT2Config.ridge must be a finite number >= 0; got {self.ridge!r}")

    @property
    def label(self) -> str:
        """Short description of the free parameters, e.g. ``"lag 20, box 30, q 0.999 x 1.2, all 1"``."""
        smooth = f"box {self.window}" if self.smoothing == "box" else f"ewma {self.rate:g}"
        lag = f"lag {self.lag}, " if self.differenced else ""
        return f"{lag}{smooth}, q {self.quantile:g} x {self.factor:g}, {self.rule} {self.persistence}"

    def to_dict(self) -> dict:
        """JSON-safe form; :meth:`from_dict` reads it back."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SlopeT2Config:
        """Build from :meth:`to_dict` output, strictly (unknown keys and wrong types are rejected)."""
        return from_dict(cls, data)


def persistent_alarms(raw: np.ndarray, rule: str, persistence: int) -> np.ndarray:
    """Apply a persistence rule to raw alarms along the last axis.

    Args:
        raw: raw alarms, bool [..., T], the first row being the first one the rule may look at.
        rule: ``"all"``: row i alarms iff rows i−persistence+1..i all alarm (rows with fewer earlier rows
            never alarm); ``"majority"``: iff more than half of those rows alarm (fewer at the start).
        persistence: rows the rule looks back over, >= 1.

    Returns:
        bool [..., T].
    """
    raw = np.asarray(raw, dtype=bool)
    if rule not in PERSISTENCE_RULES:
        raise ConfigError(f"persistence rule must be one of {PERSISTENCE_RULES}; got {rule!r}")
    if not _is_int(persistence) or persistence < 1:
        raise ConfigError(f"persistence must be an integer >= 1; got {persistence!r}")
    if persistence == 1:
        return raw.copy()
    rows = raw.shape[-1]
    c = np.cumsum(np.concatenate([np.zeros(raw.shape[:-1] + (1,), np.int64), raw], axis=-1, dtype=np.int64),
                  axis=-1)
    idx = np.arange(1, rows + 1)
    if rule == "all":
        out = np.zeros(raw.shape, dtype=bool)
        full = idx >= persistence
        out[..., full] = (c[..., idx[full]] - c[..., idx[full] - persistence]) == persistence
        return out
    lo = np.maximum(idx - persistence, 0)
    return (c[..., idx] - c[..., lo]) / (idx - lo) > 0.5


def _window_sums(padded: np.ndarray, window: int) -> np.ndarray:
    """``[P, F]`` -> ``[P - window + 1, F]``: sums of each full ``window``-row window, added oldest row first, so
    a row's sum depends only on the rows in its window (the same for any chunking of a stream)."""
    rows = len(padded) - window + 1
    acc = padded[:rows].copy()
    for j in range(1, window):
        acc += padded[j:j + rows]
    return acc


class SlopeT2Detector:
    """Fit on a run's first normal rows, then score or classify its later rows as they arrive (see the module
    docstring).

    :meth:`score` and :meth:`predict` consume rows: each call's rows must directly follow the rows of the
    previous call, or the fitting rows for the first call. The detector keeps the context it needs (the last
    ``lag`` readings of the differenced channels, the smoothing's state, the last ``persistence − 1`` raw
    alarms), so feeding rows in chunks gives the same result as one call. Persistence counts raw alarms from
    the first row after the fitting rows.

    Attributes (after :meth:`fit`):
        features: names of the kept features (``"<channel>"`` levels, ``"d<lag> <channel>"`` differences).
        fitted_scores: T² of the fitting rows, float64 [T_fit]; NaN during the ewma warm-up. For box smoothing
            the first ``window − 1`` rows average the rows available, so they score far above full windows and
            a ``quantile`` near 1 is set by them.
        threshold: ``quantile`` of ``fitted_scores`` (NaN ignored) × ``factor``; a row's raw alarm is T² above it.
    """

    def __init__(self, config: SlopeT2Config) -> None:
        if not isinstance(config, SlopeT2Config):
            raise ConfigError(f"expected a SlopeT2Config; got {type(config).__name__}")
        self.config = config
        c = config
        self._level_idx = [i for i, name in enumerate(c.channels) if name not in c.differenced]
        self._diff_idx = [c.channels.index(name) for name in c.differenced]
        self._fitted = False

    def _check_rows(self, rows: np.ndarray, what: str) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        width = len(self.config.channels)
        if rows.ndim != 2 or rows.shape[1] != width or len(rows) == 0:
            raise DataError(f"{what}: expected [T, {width}] rows (T >= 1, columns {self.config.channels}); "
                            f"got shape {rows.shape}")
        if not bool(np.isfinite(rows).all()):
            bad = int(np.argwhere(~np.isfinite(rows))[0, 0])
            raise DataError(f"{what}: rows must be finite; row {bad} holds NaN or infinity")
        return rows

    def _min_fit_rows(self) -> int:
        c = self.config
        lead = c.window - 1 if c.smoothing == "box" else c.warmup
        return max(lead, c.lag if self._diff_idx else 0) + len(self._level_idx) + len(self._diff_idx) + 2

    def fit(self, normal: np.ndarray) -> SlopeT2Detector:
        """Fit on ``[T, C]`` normal rows (columns in ``config.channels`` order); resets the stream.

        The first ``lag`` rows, which have no reading ``lag`` rows earlier, take the fitting part's first
        difference x[lag] − x[0]. The mean and covariance come from the smoothed rows with a full window (box)
        or after the warm-up (ewma).

        Raises:
            DataError: rows of the wrong shape or not finite.
            ConfigError: too few rows for the configuration, or every feature constant.
        """
        c = self.config
        normal = self._check_rows(normal, "fit")
        need = self._min_fit_rows()
        if len(normal) < need:
            raise ConfigError(f"need at least {need} fitting rows for lag {c.lag}, {c.smoothing} smoothing "
                              f"(window {c.window}, warm-up {c.warmup}) and "
                              f"{len(self._level_idx) + len(self._diff_idx)} features; got {len(normal)}")
        levels = normal[:, self._level_idx]
        if self._diff_idx:
            thermal = normal[:, self._diff_idx]
            first = np.repeat((thermal[c.lag] - thermal[0])[None], c.lag, axis=0)
            diffs = np.vstack([first, thermal[c.lag:] - thermal[:-c.lag]])
            feats = np.hstack([levels, diffs])  # [T, F_all]
        else:
            feats = levels
        names = [c.channels[i] for i in self._level_idx] + [f"d{c.lag} {c.channels[i]}" for i in self._diff_idx]
        std = feats.std(axis=0)
        keep = std >= _CONSTANT_STD
        if not bool(keep.any()):
            raise ConfigError(f"every feature {names} is constant over the {len(normal)} fitting rows")
        self.features = [n for n, k in zip(names, keep, strict=True) if k]
        self._keep = keep
        self._mean = feats.mean(axis=0)[keep]
        self._std = std[keep]
        z = (feats[:, keep] - self._mean) / self._std  # [T, F]
        if c.smoothing == "box":
            padded = np.vstack([np.zeros((c.window - 1, z.shape[1])), z])
            counts = np.minimum(np.arange(1, len(z) + 1), c.window)[:, None]
            smooth = _window_sums(padded, c.window) / counts
            reference = smooth[c.window - 1:]
            self._z_tail = z[len(z) - (c.window - 1):]
        else:
            smooth, self._ewma = self._exponential(z, z[0].copy())
            reference = smooth[c.warmup:]
        self._center = reference.mean(axis=0)
        cov = np.atleast_2d(np.cov(reference - self._center, rowvar=False))
        cov = cov + c.ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
        try:
            self._inverse = np.linalg.inv(cov)
        except np.linalg.LinAlgError as exc:
            raise ConfigError(f"the covariance of the fitting rows' features {self.features} is singular; "
                              "set ridge > 0") from exc
        scores = self._t2(smooth)
        if c.smoothing == "ewma":
            scores[:c.warmup] = np.nan
        scores.flags.writeable = False
        self.fitted_scores = scores
        self.threshold = float(np.nanquantile(scores, c.quantile)) * c.factor
        self._diff_tail = normal[len(normal) - c.lag:][:, self._diff_idx]
        self._raw_tail = np.zeros(0, dtype=bool)
        self._fitted = True
        return self

    def _exponential(self, z: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rate = self.config.rate
        out = np.empty_like(z)
        for t in range(len(z)):
            state = rate * z[t] + (1 - rate) * state
            out[t] = state
        return out, state

    def _t2(self, smooth: np.ndarray) -> np.ndarray:
        d = smooth - self._center  # [T, F]
        return np.einsum("ti,ij,tj->t", d, self._inverse, d)

    def _advance(self, rows: np.ndarray) -> np.ndarray:
        """T² of ``rows`` (which follow the rows seen so far); updates the stream state."""
        if not self._fitted:
            raise NotCalibratedError("the detector has not been fitted on normal rows; call fit() first")
        c = self.config
        rows = self._check_rows(rows, "score")
        levels = rows[:, self._level_idx]
        if self._diff_idx:
            thermal = np.vstack([self._diff_tail, rows[:, self._diff_idx]])
            feats = np.hstack([levels, thermal[c.lag:] - thermal[:-c.lag]])
            diff_tail = thermal[len(thermal) - c.lag:]
        else:
            feats, diff_tail = levels, self._diff_tail
        z = (feats[:, self._keep] - self._mean) / self._std  # [T, F]
        if c.smoothing == "box":
            padded = np.vstack([self._z_tail, z])
            smooth = _window_sums(padded, c.window) / c.window
            self._z_tail = padded[len(padded) - (c.window - 1):]
        else:
            smooth, self._ewma = self._exponential(z, self._ewma)
        self._diff_tail = diff_tail
        return self._t2(smooth)

    def _remember(self, raw: np.ndarray) -> None:
        keep = self.config.persistence - 1
        self._raw_tail = np.concatenate([self._raw_tail, raw])[max(0, len(self._raw_tail) + len(raw) - keep):]

    def score(self, rows: np.ndarray) -> np.ndarray:
        """``[T]`` T² of ``[T, C]`` rows that follow the rows seen so far (above ``threshold``: a raw alarm).

        Raises:
            NotCalibratedError: before :meth:`fit`.
            DataError: rows of the wrong shape or not finite.
        """
        t2 = self._advance(rows)
        self._remember(t2 > self.threshold)
        return t2

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """``[T]`` int8 alarms of ``[T, C]`` rows that follow the rows seen so far: the persistence rule over
        the raw alarms (T² > ``threshold``) of the rows predicted or scored since :meth:`fit`.

        Raises:
            NotCalibratedError: before :meth:`fit`.
            DataError: rows of the wrong shape or not finite.
        """
        raw = self._advance(rows) > self.threshold
        history = self._raw_tail
        alarms = persistent_alarms(np.concatenate([history, raw]), self.config.rule, self.config.persistence)
        self._remember(raw)
        return alarms[len(history):].astype(np.int8)
