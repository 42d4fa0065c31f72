"""Normal-only detection of fused units: fit on defect-free units only, score by per-modality deviation.

B units · D feature width of one modality · M modalities (``MODALITIES`` order) · N fitting/calibration units

Plants often start with no labelled defects, only units they know are good. This detector needs nothing else.

Method: **per-modality deviations, fused by their maximum.**

1. Each modality a unit has becomes one fixed feature vector, computed by the model's own encoders and
   preprocessing (nothing here is trained, so nothing can learn the defects away):

   - vision: the ImageNet-pretrained backbone of :class:`~inspection.encoders.VisionEncoder` (the packaged
     EfficientNet-Lite0 weights, loaded offline) in eval mode, its final feature map globally average-pooled.
     Pretrained features already separate cracks, dark areas and broken fingers from a clean cell without any
     label: a Gaussian over them is the approach of Rippel et al. (2020), "Modeling the distribution of normal
     data in pre-trained deep features for anomaly detection".
   - vibration (kHz waveform): the log spectrum and the log envelope spectrum that
     :class:`~inspection.preprocess.WaveformPreprocess` computes for the waveform encoder, each averaged into a
     modest number of equal frequency bands. Bearing faults show exactly there: impacts raise the broadband
     resonance level, and their repetition rate (BPFO, BPFI) puts peaks into the envelope spectrum.
   - temperature (and low-rate vibration series): the series preprocessing's output summarised per channel as
     level, slope and spread (the scatter around the fitted line), or the preprocessed series itself.

2. Per modality, a Gaussian is fitted to the normal units' features: each feature standardised with its fitting
   mean and spread, then a Ledoit-Wolf shrunk covariance (its shrinkage target, a multiple of the identity,
   needs features on one scale). The deviation of a unit is its Mahalanobis distance. A Gaussian is cheap (one
   matrix per modality), explainable (a distance from what normal looked like) and needs only a few hundred
   normal units, where the shrinkage keeps even the 1,280 image features well conditioned.

3. Distances of different modalities live on different scales (they grow with D), so each is standardised on
   *held-out* normal units (the fitting units' own distances are biased low): the standardised deviation is the
   z of the log-distance, ``(log d - median) / (1.4826 * MAD)`` of the held-out log-distances. It keeps ranking
   units beyond the largest held-out distance (an empirical tail p-value from N units stops at 1 / (N + 1), so
   two clearly deviating modalities would tie), and the median and MAD ignore the odd borderline unit that
   normal data always holds.

4. The fused score is the maximum standardised deviation over the modalities a unit has (a missing modality is
   simply not considered), and the decision threshold is set on the held-out normal units' fused scores so that
   at most ``target_far`` of them (default 1 %) would alarm.

A decision's attribution is the per-modality standardised deviations and which one is the largest: the
modality that moved furthest from normal, in comparable units. A served decision (``services/scoring.py``)
explains its fused score with exact Shapley values of the game :func:`coalition_scores`: a coalition's value is
the fused score of its modalities only, the empty coalition's the baseline :data:`BASELINE_DEVIATION`.

Calibrated state (the standardisations and the threshold) is NaN until :meth:`NormalOnlyDetector.calibrate`;
scoring before that raises :class:`~inspection.errors.NotCalibratedError`. A detector is saved to the model
store as safetensors (the backbone's weights, every Gaussian, the standardisations, the threshold) plus a JSON
card with ``"mode": "normal-only"``; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from inspection.calibration import choose_threshold
from inspection.config import from_dict, to_dict
from inspection.encoders import Encoder, SeriesEncoder, VisionEncoder, WaveformEncoder
from inspection.errors import ConfigError, DataError, NotCalibratedError
from inspection.model import EncoderSpec
from inspection.records import MODALITIES, Unit
from inspection.store import ModelStore, ModelVersion

#: The card's ``mode`` of a normal-only artifact (a supervised model's card says ``supervised``).
MODE = "normal-only"
#: The card's ``method``: what the detector computes, in one line.
METHOD = ("per-modality Gaussian (standardised features, Ledoit-Wolf covariance) -> Mahalanobis distance -> "
          "z of log-distance on held-out normal units -> max over present modalities -> threshold at a target "
          "false-alarm rate")
#: The class a decision over the threshold gets (a card's ``defect_class`` may name another).
DEFECT_CLASS = "anomaly"
#: Value of the empty coalition in a decision's modality attribution: the standardised deviation of the median
#: held-out normal unit (the standardisation's centre), i.e. what "nothing unusual" scores.
BASELINE_DEVIATION = 0.0
#: Fewest units with a modality that fitting or calibrating it accepts.
MIN_UNITS = 10
#: MAD -> standard deviation of a normal distribution.
MAD_TO_STD = 1.4826
#: Floor of a standardisation scale (log-distance units): held-out distances that are all equal carry no spread.
_MIN_DEVIATION_SCALE = 1e-6
#: A feature's spread is floored at this share of the median spread, so a feature that never moved on the normal
#: units (a dead backbone channel) does not turn float noise into a huge deviation.
_MIN_FEATURE_SCALE_RATIO = 1e-3
#: State-dict key of the threshold: the store's calibration check reads this name (see ModelStore.promote).
_THRESHOLD_KEY = "thresholds"
_BACKBONE_PREFIX = "vision.backbone."
#: Width given to the encoders' projections, which the detector never runs (it reads their inputs and the
#: backbone); small so that building them costs nothing.
_UNUSED_DIM = 8
SERIES_FEATURES = ("summary", "series")


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class NormalOnlyConfig:
    """What the detector reads and how each modality becomes one feature vector.

    Attributes:
        encoders: modality -> encoder spec (as in a :class:`~inspection.model.ModelConfig`); the detector reads
            these modalities with that encoder's preprocessing (and, for vision, its pretrained backbone).
        spectrum_bands: vibration: equal bands the log spectrum is averaged into, per channel.
        envelope_bands: vibration: equal bands the log envelope spectrum is averaged into, per channel.
        series_features: temperature and low-rate series: ``summary`` (level, slope and spread per channel) or
            ``series`` (the preprocessed series itself, ``channels * samples`` features).
        batch_size: images per backbone pass.
    """

    encoders: dict[str, EncoderSpec]
    spectrum_bands: int = 32
    envelope_bands: int = 32
    series_features: str = "summary"
    batch_size: int = 32

    def __post_init__(self) -> None:
        unknown = set(self.encoders) - set(MODALITIES)
        if unknown or not self.encoders:
            raise ConfigError(f"encoders must map some of {MODALITIES} to encoder specs; got {sorted(self.encoders)}")
        for name, value in (("spectrum_bands", self.spectrum_bands), ("envelope_bands", self.envelope_bands),
                            ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        if self.series_features not in SERIES_FEATURES:
            raise ConfigError(f"series_features must be one of {SERIES_FEATURES}; got {self.series_features!r}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.encoders)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> NormalOnlyConfig:
        return from_dict(cls, dict(data))


# ---------------------------------------------------------------------------------------- numeric core
@dataclass(frozen=True)
class GaussianFit:
    """A Gaussian of one modality's normal features.

    Attributes:
        mean: ``[D]`` feature means of the fitting units.
        scale: ``[D]`` feature spreads (floored; see ``_MIN_FEATURE_SCALE_RATIO``).
        precision: ``[D, D]`` inverse of the Ledoit-Wolf covariance of the standardised features.
        shrinkage: the Ledoit-Wolf shrinkage intensity (0: sample covariance, 1: scaled identity).
    """

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    shrinkage: float


def fit_gaussian(x: np.ndarray) -> GaussianFit:
    """Fit a Gaussian to normal features ``x [N, D]``: standardise each feature, then Ledoit-Wolf.

    Raises:
        DataError: fewer than two rows, a non-2-D array or non-finite values.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise DataError(f"fitting a Gaussian needs features [N >= 2, D >= 1]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{int((~np.isfinite(x)).sum())} feature values are NaN or infinite; fix the readings")
    mean = x.mean(axis=0)  # [D]
    scale = x.std(axis=0)  # [D]
    floor = max(float(np.median(scale)) * _MIN_FEATURE_SCALE_RATIO, 1e-12)
    scale = np.maximum(scale, floor)
    z = (x - mean) / scale  # [N, D]
    lw = LedoitWolf(assume_centered=True).fit(z)
    return GaussianFit(mean, scale, np.asarray(lw.precision_, np.float64), float(lw.shrinkage_))


def mahalanobis(x: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """``[B, D]`` features -> ``[B]`` Mahalanobis distances (not squared) from the fitted Gaussian."""
    z = (np.asarray(x, np.float64) - fit.mean) / fit.scale  # [B, D]
    d2 = np.einsum("bi,ij,bj->b", z, fit.precision, z)  # [B]
    return np.sqrt(np.maximum(d2, 0.0))


def fit_standardisation(distances: np.ndarray) -> tuple[float, float]:
    """``(centre, scale)`` of held-out normal distances ``[N]``: the median and 1.4826 x MAD of ``log d``.

    Raises:
        DataError: fewer than two distances, or non-positive / non-finite ones.
    """
    d = np.asarray(distances, np.float64)
    if d.ndim != 1 or d.size < 2 or not np.isfinite(d).all() or (d <= 0).any():
        raise DataError(f"standardising needs >= 2 positive, finite distances; got {d.size} "
                        f"(min {d.min() if d.size else 'none'})")
    log_d = np.log(d)
    centre = float(np.median(log_d))
    scale = max(MAD_TO_STD * float(np.median(np.abs(log_d - centre))), _MIN_DEVIATION_SCALE)
    return centre, scale


def standardise(distances: np.ndarray, centre: float, scale: float) -> np.ndarray:
    """``[B]`` distances -> ``[B]`` standardised deviations ``(log d - centre) / scale``."""
    return (np.log(np.maximum(np.asarray(distances, np.float64), 1e-300)) - centre) / scale


def far_threshold(scores: np.ndarray, target_far: float) -> float:
    """The lowest threshold at which at most ``floor(target_far * N)`` of the normal ``scores [N]`` satisfy
    ``score >= threshold``: just above the (k+1)-th largest score, so ties never push the rate over the target.

    Raises:
        ConfigError: ``target_far`` outside (0, 1).
        DataError: no scores, or non-finite ones.
    """
    if not 0.0 < target_far < 1.0:
        raise ConfigError(f"target_far must be in (0, 1); got {target_far!r}")
    s = np.asarray(scores, np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        raise DataError(f"calibration needs finite scores of normal units; got {s.size} scores")
    return choose_threshold(s, np.zeros(s.size, dtype=bool), "far", target_far)


# -------------------------------------------------------------------------------------------- features
def _band_means(x: np.ndarray, bands: int, what: str) -> np.ndarray:
    """``[C, F]`` -> ``[C, bands]``: means of ``bands`` equal groups of contiguous bins."""
    c, f = x.shape
    if f % bands:
        raise ConfigError(f"{what} has {f} bins, which {bands} bands do not divide; choose a divisor of {f}")
    return x.reshape(c, bands, f // bands).mean(axis=2)


def series_summary(series: np.ndarray) -> np.ndarray:
    """``[C, S]`` -> ``[C, 3]``: level (mean), slope (least squares, per sample) and spread (standard deviation of
    the residual around that line) of each channel."""
    s = np.asarray(series, np.float64)
    t = np.arange(s.shape[1], dtype=np.float64)
    t = t - t.mean()
    level = s.mean(axis=1)  # [C]
    slope = (s - level[:, None]) @ t / (t @ t)  # [C]
    resid = s - level[:, None] - slope[:, None] * t  # [C, S]
    return np.stack([level, slope, resid.std(axis=1)], axis=1)


class FeatureExtractor(nn.Module):
    """The detector's fixed feature vector per modality, built from the model's own encoders (see the module
    docstring). Holds the vision backbone (frozen, eval mode); the other modalities are pure preprocessing.

    Args:
        config: the detector's config.
        pretrained_weights: load the backbone's packaged ImageNet weights; False when its weights come from a
            saved detector (:meth:`NormalOnlyDetector.load`).
    """

    def __init__(self, config: NormalOnlyConfig, pretrained_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({m: config.encoders[m].build(_UNUSED_DIM, pretrained_weights)
                                       for m in config.modalities})
        for m, enc in self.encoders.items():
            if enc.modality != m:
                raise ConfigError(f"encoder {config.encoders[m].name!r} reads {enc.modality}, not {m}")
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        ref = next(iter(self.parameters()), None)
        return ref.device if ref is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> FeatureExtractor:  # noqa: ARG002 - the features are fixed: always eval
        return super().train(False)

    def modality(self, modality: str, readings: Sequence) -> np.ndarray:
        """Feature vectors ``[B, D]`` (float64) of one modality's readings."""
        enc: Encoder = self.encoders[modality]
        if isinstance(enc, VisionEncoder):
            return self._vision(enc, readings)
        rows = [self._vector(enc, enc.prepare(r)) for r in readings]
        return np.stack(rows).astype(np.float64) if rows else np.zeros((0, 0))

    def modality_lenient(self, modality: str, readings: Sequence, width: int | None = None,
                         map_fn=map) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
        """Feature vectors of the readings the preprocessing accepts, and what went wrong with the others.

        Args:
            modality: which modality the readings are.
            readings: the readings.
            width: the feature width the caller needs (a fitted Gaussian's ``D``); a reading whose vector has
                another width (a sensor with another channel count) is rejected. None: any width.
            map_fn: ``map``-like function the per-reading preprocessing runs through (e.g. a thread pool's
                ``map``: image decoding and resizing release the GIL).

        Returns:
            ``kept`` (indices into ``readings``), their features ``[len(kept), D]`` (float64) and
            ``(index, reason)`` for each reading left out.
        """
        enc: Encoder = self.encoders[modality]

        def prepare(reading) -> tuple[Mapping[str, np.ndarray] | None, str | None]:
            try:
                return enc.prepare(reading), None
            except Exception as exc:  # noqa: BLE001 - one bad reading must not cost the others
                return None, f"{type(exc).__name__}: {exc}"

        prepared = list(map_fn(prepare, readings))
        failures = [(i, why) for i, (_, why) in enumerate(prepared) if why is not None]
        ok = [i for i, (p, _) in enumerate(prepared) if p is not None]
        if isinstance(enc, VisionEncoder):
            rows = list(self._vision_images(enc, [prepared[i][0]["image"] for i in ok])) if ok else []
        else:
            rows = []
            for i in list(ok):
                try:
                    rows.append(self._vector(enc, prepared[i][0]))
                except Exception as exc:  # noqa: BLE001
                    failures.append((i, f"{type(exc).__name__}: {exc}"))
                    ok.remove(i)
        kept, vectors = [], []
        for i, row in zip(ok, rows, strict=True):
            if width is not None and row.size != width:
                failures.append((i, f"its {modality} features have {row.size} values where the detector was "
                                    f"fitted on {width} (another channel count or sample rate?)"))
                continue
            kept.append(i)
            vectors.append(row)
        x = np.stack(vectors).astype(np.float64) if vectors else np.zeros((0, width or 0))
        return kept, x, sorted(failures)

    def _vision(self, enc: VisionEncoder, readings: Sequence) -> np.ndarray:
        out = []
        step = self.config.batch_size
        for i in range(0, len(readings), step):
            out.append(self._vision_images(enc, [enc.prepare(r)["image"] for r in readings[i:i + step]]))
        return np.concatenate(out) if out else np.zeros((0, 0))

    @torch.inference_mode()
    def _vision_images(self, enc: VisionEncoder, images: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed images ``[3, S, S]`` -> pooled backbone features ``[B, F]`` (float64), in batches."""
        out = []
        step = self.config.batch_size
        for i in range(0, len(images), step):
            x = torch.from_numpy(np.stack(images[i:i + step])).to(self.device)  # [B, 3, S, S]
            fmap = enc.backbone.forward_features(x)  # [B, F, h, w]
            out.append(fmap.float().mean(dim=(2, 3)).cpu().numpy())  # [B, F]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))

    def _vector(self, enc: Encoder, prepared: Mapping[str, np.ndarray]) -> np.ndarray:
        cfg = self.config
        if isinstance(enc, WaveformEncoder):
            spectrum = _band_means(prepared["spectrum"], cfg.spectrum_bands, "the vibration spectrum")  # [C, bands]
            envelope = _band_means(prepared["envelope"], cfg.envelope_bands, "the vibration envelope")  # [C, bands]
            return np.concatenate([spectrum.ravel(), envelope.ravel()])
        if isinstance(enc, SeriesEncoder):
            series = prepared["series"]  # [C, S]
            return (series_summary(series) if cfg.series_features == "summary" else series).ravel()
        raise ConfigError(f"no normal-only features for encoder {type(enc).__name__}")

    def forward(self, units: Sequence[Unit]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """modality -> (``[B_m]`` indices of the units that have it, ``[B_m, D]`` features)."""
        out = {}
        for m in self.config.modalities:
            rows = np.array([i for i, u in enumerate(units) if getattr(u, m) is not None], dtype=np.int64)
            if rows.size:
                out[m] = (rows, self.modality(m, [getattr(units[i], m) for i in rows]))
        return out


# -------------------------------------------------------------------------------------------- detector
@dataclass
class NormalOnlyScores:
    """Scores of a batch of units.

    Attributes:
        score: ``[B]`` fused score: the largest standardised deviation over the modalities a unit has.
        deviations: ``[B, M]`` standardised deviation per modality (``MODALITIES`` order; NaN where absent or
            not read by the detector): the decision's attribution.
        distances: ``[B, M]`` raw Mahalanobis distances (NaN where absent).
        decision: ``[B]`` bool, ``score >= threshold``.
        threshold: the calibrated threshold the decisions used.
        unit_ids: the units, in order.
    """

    score: np.ndarray
    deviations: np.ndarray
    distances: np.ndarray
    decision: np.ndarray
    threshold: float
    unit_ids: list[str] = field(default_factory=list)

    @property
    def top_modality(self) -> list[str]:
        """The modality with the largest standardised deviation, per unit."""
        filled = np.where(np.isnan(self.deviations), -np.inf, self.deviations)
        return [MODALITIES[int(i)] for i in filled.argmax(axis=1)]

    def attribution(self, i: int) -> dict:
        """Unit ``i``'s decision in words: score, threshold, decision, deviations per present modality, the top."""
        devs = {m: float(self.deviations[i, mi]) for mi, m in enumerate(MODALITIES)
                if not np.isnan(self.deviations[i, mi])}
        return {"unit_id": self.unit_ids[i] if self.unit_ids else str(i), "score": float(self.score[i]),
                "threshold": self.threshold, "decision": "defect" if self.decision[i] else "ok",
                "deviations": devs, "top_modality": self.top_modality[i]}


class NormalOnlyDetector:
    """Fit on normal units, calibrate on held-out normal units, score any units (see the module docstring).

    Example:
        >>> det = NormalOnlyDetector(NormalOnlyConfig({"vibration": EncoderSpec("waveform")}))
        >>> det.fit(normal_train).calibrate(normal_val, target_far=0.01)
        >>> scores = det.score(units)  # scores.score [B], scores.deviations [B, M], scores.decision [B]
    """

    def __init__(self, config: NormalOnlyConfig, *, pretrained_weights: bool = True) -> None:
        self.config = config
        self.extractor = FeatureExtractor(config, pretrained_weights)
        self.gaussians: dict[str, GaussianFit] = {}
        self.standardisation: dict[str, tuple[float, float]] = {m: (float("nan"), float("nan"))
                                                                 for m in config.modalities}
        self.threshold = float("nan")
        self.target_far = float("nan")
        self.n_fit: dict[str, int] = {}
        self.n_calibration: dict[str, int] = {}
        self.calibration_far = float("nan")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    @property
    def fitted(self) -> bool:
        return set(self.gaussians) == set(self.modalities)

    @property
    def calibrated(self) -> bool:
        return self.fitted and bool(np.isfinite(self.threshold)) and all(
            np.isfinite(c) and np.isfinite(s) for c, s in self.standardisation.values())

    def to(self, device: torch.device | str) -> NormalOnlyDetector:
        """Run the feature extraction (the vision backbone) on ``device``."""
        self.extractor.to(torch.device(device))
        return self

    # ------------------------------------------------------------------------------------- fit/calibrate
    def features(self, units: Sequence[Unit]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """modality -> (``[B_m]`` indices of the units that have it, ``[B_m, D]`` features)."""
        return self.extractor(list(units))

    def fit(self, units: Sequence[Unit]) -> NormalOnlyDetector:
        """Fit one Gaussian per modality on defect-free units (any calibration is discarded).

        Raises:
            DataError: a unit is labelled defective, or a modality has fewer than :data:`MIN_UNITS` units.
        """
        return self.fit_features(self.features(_normal(units, "fit")), len(units))

    def fit_features(self, feats: Mapping[str, tuple[np.ndarray, np.ndarray]], n_units: int) -> NormalOnlyDetector:
        """:meth:`fit` on features already extracted with :meth:`features` from ``n_units`` normal units."""
        _check_counts(feats, self.modalities, "fitting", n_units)
        self.gaussians = {m: fit_gaussian(feats[m][1]) for m in self.modalities}
        self.n_fit = {m: int(len(feats[m][0])) for m in self.modalities}
        self.standardisation = {m: (float("nan"), float("nan")) for m in self.modalities}
        self.threshold = self.target_far = self.calibration_far = float("nan")
        return self

    def calibrate(self, units: Sequence[Unit], target_far: float = 0.01) -> NormalOnlyDetector:
        """Standardise each modality's deviation and set the threshold on held-out normal units (never the
        fitting units, whose distances are biased low), so that at most ``target_far`` of them alarm.

        Raises:
            NotCalibratedError: before :meth:`fit`.
            ConfigError: ``target_far`` outside (0, 1).
            DataError: a unit is labelled defective, or a modality has fewer than :data:`MIN_UNITS` units.
        """
        units = _normal(units, "calibrate")
        return self.calibrate_features(self.features(units), len(units), target_far)

    def calibrate_features(self, feats: Mapping[str, tuple[np.ndarray, np.ndarray]], n_units: int,
                           target_far: float = 0.01) -> NormalOnlyDetector:
        """:meth:`calibrate` on features already extracted with :meth:`features` from ``n_units`` units."""
        self._require_fitted()
        if not 0.0 < target_far < 1.0:
            raise ConfigError(f"target_far must be in (0, 1); got {target_far!r}")
        _check_counts(feats, self.modalities, "calibrating", n_units)
        for m in self.modalities:
            self.standardisation[m] = fit_standardisation(mahalanobis(feats[m][1], self.gaussians[m]))
        fused = self._fuse(feats, n_units)[0]  # [B]
        self.threshold = far_threshold(fused, target_far)
        self.target_far = float(target_far)
        self.calibration_far = float((fused >= self.threshold).mean())
        self.n_calibration = {m: int(len(feats[m][0])) for m in self.modalities}
        return self

    # --------------------------------------------------------------------------------------------- score
    def score(self, units: Sequence[Unit]) -> NormalOnlyScores:
        """Fused scores, per-modality standardised deviations and decisions of ``units``.

        Raises:
            NotCalibratedError: before :meth:`fit` and :meth:`calibrate`.
            DataError: a unit has none of the modalities the detector reads.
        """
        units = list(units)
        self._require_calibrated()
        return self.score_features(self.features(units), len(units), [u.unit_id for u in units])

    def score_features(self, feats: Mapping[str, tuple[np.ndarray, np.ndarray]], n_units: int,
                       unit_ids: Sequence[str] = ()) -> NormalOnlyScores:
        """:meth:`score` on features already extracted with :meth:`features`."""
        self._require_calibrated()
        score, deviations, distances = self._fuse(feats, n_units)
        return NormalOnlyScores(score, deviations, distances, score >= self.threshold, self.threshold,
                                list(unit_ids))

    def extract(self, units: Sequence[Unit], map_fn=map) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                                  list[tuple[int, str, str]]]:
        """:meth:`features` that leaves out, instead of raising on, a reading the preprocessing rejects or whose
        feature vector does not fit the fitted Gaussian (the serving path: one bad reading never costs a unit its
        other modalities, nor the batch its other units).

        Args:
            units: the units.
            map_fn: ``map``-like function the per-reading preprocessing runs through.

        Returns:
            ``features`` as :meth:`features` gives them (only accepted readings) and ``(unit index, modality,
            reason)`` for every reading left out.

        Raises:
            NotCalibratedError: before :meth:`fit`.
        """
        self._require_fitted()
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        failures: list[tuple[int, str, str]] = []
        for m in self.modalities:
            rows = [i for i, u in enumerate(units) if getattr(u, m) is not None]
            if not rows:
                continue
            kept, x, bad = self.extractor.modality_lenient(m, [getattr(units[i], m) for i in rows],
                                                           self.gaussians[m].mean.size, map_fn)
            failures += [(rows[j], m, why) for j, why in bad]
            if kept:
                feats[m] = (np.array([rows[j] for j in kept], dtype=np.int64), x)
        return feats, sorted(failures)

    def _fuse(self, feats: Mapping[str, tuple[np.ndarray, np.ndarray]],
              n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        distances = np.full((n_units, len(MODALITIES)), np.nan)  # [B, M]
        deviations = np.full((n_units, len(MODALITIES)), np.nan)  # [B, M]
        for m in self.modalities:
            if m not in feats:
                continue
            rows, x = feats[m]
            mi = MODALITIES.index(m)
            distances[rows, mi] = mahalanobis(x, self.gaussians[m])
            deviations[rows, mi] = standardise(distances[rows, mi], *self.standardisation[m])
        missing = np.isnan(deviations).all(axis=1)
        if missing.any():
            raise DataError(f"{int(missing.sum())} unit(s) have none of the modalities this detector reads "
                            f"({', '.join(self.modalities)}); e.g. unit #{int(np.flatnonzero(missing)[0])}")
        return np.nanmax(deviations, axis=1), deviations, distances

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise NotCalibratedError("the normal-only detector has not been fitted; call fit() on defect-free "
                                     "units first")

    def _require_calibrated(self) -> None:
        self._require_fitted()
        if not self.calibrated:
            raise NotCalibratedError("the normal-only detector is not calibrated; call calibrate() on held-out "
                                     "defect-free units (not the fitting units) first")

    # ------------------------------------------------------------------------------------------ persist
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the detector needs: the vision backbone's weights, each modality's Gaussian and
        standardisation, and the threshold (float64 where the scores are computed in float64)."""
        self._require_calibrated()
        state: dict[str, torch.Tensor] = {}
        if "vision" in self.modalities:
            backbone = self.extractor.encoders["vision"].backbone
            state.update({_BACKBONE_PREFIX + k: v for k, v in backbone.state_dict().items()})
        for m, g in self.gaussians.items():
            state[f"{m}.mean"] = torch.from_numpy(g.mean.copy())  # [D]
            state[f"{m}.scale"] = torch.from_numpy(g.scale.copy())  # [D]
            state[f"{m}.precision"] = torch.from_numpy(g.precision.copy())  # [D, D]
            state[f"{m}.standardisation"] = torch.tensor(self.standardisation[m], dtype=torch.float64)  # [2]
        state[_THRESHOLD_KEY] = torch.tensor([self.threshold], dtype=torch.float64)  # [1]
        return state

    def card(self) -> dict:
        """The JSON model card of this detector (the store adds its own fields)."""
        self._require_calibrated()
        digest = hashlib.sha256(repr((self.threshold, sorted(self.standardisation.items()))).encode()).hexdigest()
        return {
            "mode": MODE,
            "method": METHOD,
            "modalities": list(self.modalities),
            "features": self.config.to_dict(),
            "feature_dims": {m: int(g.mean.size) for m, g in self.gaussians.items()},
            "shrinkage": {m: g.shrinkage for m, g in self.gaussians.items()},
            "standardisation": {m: {"centre": c, "scale": s} for m, (c, s) in self.standardisation.items()},
            "target_far": self.target_far,
            "threshold": self.threshold,
            "threshold_version": "n-" + digest[:10],
            "calibration_far": self.calibration_far,
            "n_normal_units": dict(self.n_fit),
            "n_calibration_units": dict(self.n_calibration),
        }

    def save(self, store: ModelStore, card: Mapping | None = None, *, promote: bool = False) -> ModelVersion:
        """Save to a :class:`~inspection.store.ModelStore` (safetensors + JSON card) and return the
        :class:`~inspection.store.ModelVersion`. ``card`` adds fields (data, metrics) beside the detector's own.

        Raises:
            NotCalibratedError: before calibration.
            ConfigError: ``card`` repeats a field the detector writes.
        """
        own = self.card()
        extra = dict(card or {})
        clash = sorted(set(extra) & set(own))
        if clash:
            raise ConfigError(f"card fields {clash} are written by the detector itself; rename them")
        return store.save(self.state_dict(), {**extra, **own}, promote=promote)

    @classmethod
    def load(cls, store: ModelStore, version: str | None = None) -> tuple[NormalOnlyDetector, dict]:
        """The detector saved as ``version`` (None: the promoted one) of a model store, and its card. The store
        verifies the weights' SHA-256 before reading them; the backbone's weights come from the artifact, so a
        scoring host needs no weights package.

        Raises:
            StoreError: see :meth:`inspection.store.ModelStore.load` (a tampered artifact among them).
            ConfigError: the version is not a normal-only artifact, or its tensors do not fit its card.
        """
        state, card = store.load(version)
        if card.get("mode") != MODE:
            raise ConfigError(f"version {card.get('version')} is a {card.get('mode')!r} model, not {MODE!r}; load "
                              "it with the supervised model's loader")
        det = cls(NormalOnlyConfig.from_dict(card["features"]), pretrained_weights=False)
        try:
            if "vision" in det.modalities:
                prefix = len(_BACKBONE_PREFIX)
                det.extractor.encoders["vision"].backbone.load_state_dict(
                    {k[prefix:]: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)})
            for m in det.modalities:
                std = state[f"{m}.standardisation"].numpy()
                det.gaussians[m] = GaussianFit(state[f"{m}.mean"].numpy(), state[f"{m}.scale"].numpy(),
                                               state[f"{m}.precision"].numpy(), float(card["shrinkage"][m]))
                det.standardisation[m] = (float(std[0]), float(std[1]))
            det.threshold = float(state[_THRESHOLD_KEY][0])
        except (KeyError, RuntimeError, IndexError) as exc:
            raise ConfigError(f"version {card.get('version')} does not hold a complete normal-only detector: "
                              f"{exc}") from exc
        for m, g in det.gaussians.items():
            d = g.mean.size
            if g.scale.shape != (d,) or g.precision.shape != (d, d) or d != card["feature_dims"][m]:
                raise ConfigError(f"version {card.get('version')}: the {m} Gaussian's tensors do not fit its card's "
                                  f"feature_dims ({card['feature_dims'][m]})")
        det.target_far = float(card["target_far"])
        det.calibration_far = float(card["calibration_far"])
        det.n_fit = dict(card["n_normal_units"])
        det.n_calibration = dict(card["n_calibration_units"])
        return det, card


# ---------------------------------------------------------------------------------------- coalitions
def coalition_scores(deviations: Mapping[str, float]) -> dict[frozenset[str], float]:
    """The fused score of every coalition of a unit's modalities: the game its modality attribution explains.

    A coalition's value is the detector's fused score on those modalities only, the largest of their standardised
    deviations; the empty coalition's value is :data:`BASELINE_DEVIATION`, the deviation of the median held-out
    normal unit. The Shapley values of this game add up to ``score - BASELINE_DEVIATION``.

    Args:
        deviations: modality -> standardised deviation, for the modalities the unit has (at least one).

    Returns:
        Every subset of ``deviations``' modalities (the empty one included) -> its value.

    Raises:
        DataError: no modality, or a deviation that is not finite.
    """
    if not deviations or not all(np.isfinite(v) for v in deviations.values()):
        raise DataError(f"a coalition game needs >= 1 finite deviation; got {dict(deviations)}")
    names = [m for m in MODALITIES if m in deviations]
    out: dict[frozenset[str], float] = {}
    for mask in range(2 ** len(names)):
        members = frozenset(m for k, m in enumerate(names) if mask >> k & 1)
        out[members] = max((float(deviations[m]) for m in members), default=BASELINE_DEVIATION)
    return out


def deviation_probability(deviation: float) -> float:
    """The standard normal CDF of a standardised deviation, in [0, 1]: under the standardisation's Gaussian
    reading, the share of normal units whose deviation of one modality lies below it (0.5 at the baseline). It is
    not a defect probability: there are no defects to calibrate one on."""
    return 0.5 * math.erfc(-float(deviation) / math.sqrt(2.0))


# --------------------------------------------------------------------------------------------- helpers
def _normal(units: Sequence[Unit], action: str) -> list[Unit]:
    """The units, refusing any labelled defective (unlabelled units are taken as normal)."""
    units = list(units)
    bad = [u.unit_id for u in units if u.label is not None and u.label.defect]
    if bad:
        raise DataError(f"normal-only {action} takes defect-free units; {len(bad)} of {len(units)} are labelled "
                        f"defective (e.g. {bad[:3]}); leave them out")
    return units


def _check_counts(feats: Mapping[str, tuple[np.ndarray, np.ndarray]], modalities: Sequence[str], action: str,
                  n_units: int) -> None:
    for m in modalities:
        n = len(feats[m][0]) if m in feats else 0
        if n < MIN_UNITS:
            raise DataError(f"{action} the normal-only detector needs >= {MIN_UNITS} units with {m}; {n} of the "
                            f"{n_units} given have it")


__all__ = [
    "BASELINE_DEVIATION", "DEFECT_CLASS", "METHOD", "MIN_UNITS", "MODE", "FeatureExtractor", "GaussianFit",
    "NormalOnlyConfig", "NormalOnlyDetector", "NormalOnlyScores", "coalition_scores", "deviation_probability",
    "far_threshold", "fit_gaussian", "fit_standardisation", "mahalanobis", "series_summary", "standardise",
]
