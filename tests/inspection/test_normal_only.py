"""The normal-only detector: its numeric core against closed forms, the calibrated false-alarm rate, the store
round trip and tamper check, and real data (bearing windows, composite units)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from inspection.errors import ConfigError, DataError, NotCalibratedError, StoreError
from inspection.model import EncoderSpec
from inspection.normal_only import (
    MAD_TO_STD,
    MODE,
    GaussianFit,
    NormalOnlyConfig,
    NormalOnlyDetector,
    far_threshold,
    fit_gaussian,
    fit_standardisation,
    mahalanobis,
    series_summary,
    standardise,
)
from inspection.records import MODALITIES
from inspection.store import ModelStore

#: Relative error allowed on a covariance entry fitted from 20,000 samples (sampling error ~ sqrt(2 / n) ~ 1 %).
COVARIANCE_RTOL = 0.05
#: Float64 agreement of two ways to compute the same distance.
EXACT_RTOL = 1e-10
#: Bearings fold 0 AUROC of healthy vs faulty test windows: measured 1.000; random features give ~0.5 and a sign
#: error ~0.0, so 0.9 leaves a margin and still fails both.
BEARINGS_MIN_AUROC = 0.9
#: Share of faulty test windows alarmed at the calibrated threshold: measured 1.000.
BEARINGS_MIN_RECALL = 0.9
#: Share of vibration-only composite units whose largest deviation is vibration: measured 1.00 (73 units, the
#: smallest margin over the next modality 6.2); comparing raw distances instead of standardised deviations gives
#: 0.64, chance one in three.
VIBRATION_POINTING_MIN = 0.8


# --------------------------------------------------------------------------------------------- closed forms
def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + d * np.eye(d)


def test_mahalanobis_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 6
    cov = _spd(rng, d)
    mean, scale = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
    # the fit's precision acts on standardised features z = (x - mean) / scale: Σ_z = S⁻¹ Σ S⁻¹
    cov_z = cov / np.outer(scale, scale)
    fit = GaussianFit(mean, scale, np.linalg.inv(cov_z), 0.0)
    x = rng.standard_normal((50, d)) * 3
    got = mahalanobis(x, fit)  # [50]
    want = np.array([scipy_mahalanobis(row, mean, np.linalg.inv(cov)) for row in x])
    np.testing.assert_allclose(got, want, rtol=EXACT_RTOL)
    assert got.shape == (50,)


def test_fit_gaussian_recovers_mean_covariance_and_chi_square() -> None:
    rng = np.random.default_rng(1)
    d, n = 5, 20_000
    cov, mean = _spd(rng, d), rng.standard_normal(d) * 10
    fit = fit_gaussian(rng.multivariate_normal(mean, cov, n))
    assert fit.shrinkage < 0.01  # n >> d: Ledoit-Wolf keeps the sample covariance
    err = fit.mean - mean  # n errᵀ Σ⁻¹ err ~ χ²(d)
    assert n * err @ np.linalg.solve(cov, err) < stats.chi2.ppf(0.999, d)
    cov_hat = np.linalg.inv(fit.precision) * np.outer(fit.scale, fit.scale)
    np.testing.assert_allclose(cov_hat, cov, rtol=COVARIANCE_RTOL, atol=COVARIANCE_RTOL * np.sqrt(np.outer(
        np.diag(cov), np.diag(cov))).max())
    # fresh samples: d² ~ χ²(d), mean d, standard error sqrt(2d / n)
    d2 = mahalanobis(rng.multivariate_normal(mean, cov, n), fit) ** 2
    assert abs(d2.mean() - d) < 4 * np.sqrt(2 * d / n) + 0.01 * d


def test_fit_gaussian_shrinks_when_features_outnumber_units() -> None:
    rng = np.random.default_rng(2)
    fit = fit_gaussian(rng.standard_normal((30, 200)))  # [N=30, D=200]: the sample covariance is singular
    assert 0.5 < fit.shrinkage <= 1.0
    assert np.isfinite(fit.precision).all()


def test_standardisation_matches_chi_distribution() -> None:
    """Distances of a D-dimensional standard Gaussian are χ_D: the median of log d is ½ log(median of χ²_D), and
    the MAD m solves P(|log d - centre| <= m) = ½."""
    rng = np.random.default_rng(3)
    d, n = 20, 200_000
    dist = np.sqrt(rng.chisquare(d, n))
    centre, scale = fit_standardisation(dist)
    want_centre = 0.5 * np.log(stats.chi2.median(d))

    def inside(m: float) -> float:
        lo, hi = np.exp(2 * (want_centre - m)), np.exp(2 * (want_centre + m))
        return stats.chi2.cdf(hi, d) - stats.chi2.cdf(lo, d) - 0.5

    want_scale = MAD_TO_STD * optimize.brentq(inside, 1e-6, 5.0)
    assert abs(centre - want_centre) < 0.005
    assert abs(scale / want_scale - 1) < 0.01
    z = standardise(dist[:5], centre, scale)
    np.testing.assert_allclose(z, (np.log(dist[:5]) - centre) / scale, rtol=EXACT_RTOL)


def test_series_summary_closed_form() -> None:
    t = np.arange(60, dtype=float)
    series = np.stack([20 + 0.5 * t, 30 + np.where(t % 2 == 0, 1.0, -1.0)])  # [C=2, S=60]
    out = series_summary(series)  # [C, 3]
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], [20 + 0.5 * t.mean(), 0.5, 0.0], atol=1e-9)
    assert abs(out[1, 0] - 30) < 1e-9 and abs(out[1, 1]) < 0.01 and abs(out[1, 2] - 1.0) < 0.01


@pytest.mark.parametrize("target_far", [0.01, 0.05, 0.2])
def test_far_threshold_is_lowest_with_at_most_the_target(target_far: float) -> None:
    rng = np.random.default_rng(4)
    scores = np.round(rng.standard_normal(537), 1)  # many ties
    th = far_threshold(scores, target_far)
    assert (scores >= th).mean() <= target_far
    below = np.nextafter(th, -np.inf)
    assert (scores >= below).mean() > target_far  # one step lower breaks the target: the threshold is the lowest


def test_far_threshold_rejects_bad_target() -> None:
    with pytest.raises(ConfigError, match="target_far"):
        far_threshold(np.arange(10.0), 1.0)


# ----------------------------------------------------------------------------------------------- real data
def _bearings_fold0():
    from inspection.benches import default_model_config, load_bench
    from inspection.data.bearings import load_bearings

    try:
        load_bearings()
    except DataError as exc:
        pytest.skip(f"bearing recordings unavailable: {exc}")
    return load_bench("bearings", 0, fold=0), NormalOnlyConfig(default_model_config("bearings").encoders)


@pytest.fixture(scope="module")
def bearings_fitted():
    data, config = _bearings_fold0()
    det = NormalOnlyDetector(config)
    healthy_val = [u for u in data.val if not u.label.defect]
    det.fit([u for u in data.train if not u.label.defect]).calibrate(healthy_val, target_far=0.05)
    return det, data, healthy_val


@pytest.mark.data
@pytest.mark.slow
def test_bearings_healthy_fit_separates_faulty_test_windows(bearings_fitted) -> None:
    from sklearn.metrics import roc_auc_score

    det, data, _ = bearings_fitted
    scores = det.score(data.test)
    y = np.array([u.label.defect for u in data.test])
    assert 0 < y.sum() < len(y)
    assert roc_auc_score(y, scores.score) > BEARINGS_MIN_AUROC
    assert scores.decision[y].mean() >= BEARINGS_MIN_RECALL
    vib = MODALITIES.index("vibration")
    np.testing.assert_array_equal(scores.score, scores.deviations[:, vib])  # one modality: fused = its deviation
    assert np.isnan(np.delete(scores.deviations, vib, axis=1)).all()


@pytest.mark.data
@pytest.mark.slow
def test_calibrated_threshold_meets_target_far_on_calibration_units(bearings_fitted) -> None:
    det, _, healthy_val = bearings_fitted
    scores = det.score(healthy_val)
    assert scores.decision.mean() <= det.target_far == 0.05
    assert det.calibration_far == scores.decision.mean()


@pytest.mark.data
@pytest.mark.slow
def test_fit_and_calibrate_refuse_defective_units_and_uncalibrated_scoring(bearings_fitted) -> None:
    _, data, healthy_val = bearings_fitted
    det = NormalOnlyDetector(bearings_fitted[0].config)
    with pytest.raises(NotCalibratedError, match="fit"):
        det.score(data.test[:3])
    with pytest.raises(DataError, match="labelled defective"):
        det.fit(data.train)
    with pytest.raises(DataError, match=">= 10 units"):
        det.fit(healthy_val[:5])
    det.fit(healthy_val)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        det.score(data.test[:3])


@pytest.fixture(scope="module")
def composite_fitted():
    """A detector on all three modalities of real composite units (images at 128 px to keep it short)."""
    from inspection.benches import default_model_config, load_bench

    try:
        data = load_bench("composite", 0, n_train=300, n_val=300, n_test=600)
    except DataError as exc:
        pytest.skip(f"composite sources unavailable: {exc}")
    det = NormalOnlyDetector(NormalOnlyConfig(default_model_config("composite", image_size=128).encoders))
    det.fit([u for u in data.train if not u.label.defect])
    det.calibrate([u for u in data.val if not u.label.defect], target_far=0.01)
    return det, data


@pytest.mark.data
@pytest.mark.slow
def test_vibration_culprits_have_the_largest_vibration_deviation(composite_fitted) -> None:
    det, data = composite_fitted
    units = [u for u in data.test if u.label.culprits == frozenset({"vibration"})]
    assert len(units) >= 30
    scores = det.score(units)
    pointing = np.mean([top == "vibration" for top in scores.top_modality])
    assert pointing >= VIBRATION_POINTING_MIN, f"vibration is the top deviation of {pointing:.2f} of {len(units)}"
    att = scores.attribution(0)
    assert set(att["deviations"]) == set(MODALITIES) and att["top_modality"] in MODALITIES
    assert att["decision"] in ("ok", "defect")


@pytest.mark.data
@pytest.mark.slow
def test_store_round_trip_gives_equal_scores_and_detects_tampering(composite_fitted, tmp_path) -> None:
    det, data = composite_fitted
    test = data.test[:24]
    before = det.score(test)
    store = ModelStore(tmp_path / "store")
    saved = det.save(store, {"data": {"bench": "composite", "seed": 0}}, promote=True)
    assert saved.card["mode"] == MODE and saved.card["target_far"] == 0.01
    assert saved.card["n_normal_units"] == det.n_fit and saved.card["threshold"] == det.threshold
    assert store.promote(saved.version).promoted  # the store's calibration check accepts the artifact
    loaded, card = NormalOnlyDetector.load(store)
    after = loaded.score(test)
    np.testing.assert_array_equal(after.score, before.score)
    np.testing.assert_array_equal(after.deviations, before.deviations)
    np.testing.assert_array_equal(after.decision, before.decision)
    assert card["data"] == {"bench": "composite", "seed": 0}

    weights = saved.path / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="tampered or corrupted"):
        NormalOnlyDetector.load(store, saved.version)


@pytest.mark.data
@pytest.mark.slow
def test_save_refuses_clashing_card_and_load_refuses_other_modes(composite_fitted, tmp_path) -> None:
    import torch

    det, _ = composite_fitted
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ConfigError, match="threshold"):
        det.save(store, {"threshold": 0.5})
    other = store.save({"w": torch.zeros(2)}, {"mode": "supervised"})
    with pytest.raises(ConfigError, match="not 'normal-only'"):
        NormalOnlyDetector.load(store, other.version)


def test_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="series_features"):
        NormalOnlyConfig({"temperature": EncoderSpec("series")}, series_features="raw")
    with pytest.raises(ConfigError, match="encoders"):
        NormalOnlyConfig({"sound": EncoderSpec("series")})
    with pytest.raises(ConfigError, match="unknown key"):
        NormalOnlyConfig.from_dict({"encoders": {}, "bands": 3})


# ------------------------------------------------------------------------------------- serving helpers
def test_coalition_scores_are_the_max_deviation_with_a_zero_baseline() -> None:
    from inspection.normal_only import BASELINE_DEVIATION, coalition_scores

    got = coalition_scores({"temperature": -0.5, "vision": 1.5, "vibration": 3.0})
    s = frozenset
    assert BASELINE_DEVIATION == 0.0
    assert got == {s(): 0.0, s({"vision"}): 1.5, s({"vibration"}): 3.0, s({"temperature"}): -0.5,
                   s({"vision", "vibration"}): 3.0, s({"vision", "temperature"}): 1.5,
                   s({"vibration", "temperature"}): 3.0, s({"vision", "vibration", "temperature"}): 3.0}
    assert coalition_scores({"vibration": -2.0}) == {s(): 0.0, s({"vibration"}): -2.0}
    with pytest.raises(DataError, match="finite deviation"):
        coalition_scores({})
    with pytest.raises(DataError, match="finite deviation"):
        coalition_scores({"vision": float("nan")})


def test_deviation_probability_is_the_standard_normal_cdf() -> None:
    from inspection.normal_only import deviation_probability

    z = np.array([-40.0, -3.0, -0.5, 0.0, 1.0, 2.326, 8.0, 40.0])
    got = np.array([deviation_probability(v) for v in z])
    np.testing.assert_allclose(got, stats.norm.cdf(z), rtol=1e-12, atol=1e-300)
    assert deviation_probability(0.0) == 0.5


def test_extract_leaves_out_readings_it_cannot_read() -> None:
    """A vibration reading with another channel count is listed with its reason; the other units' features are
    those :meth:`features` gives, and a unit without vibration is simply absent."""
    from datetime import UTC, datetime

    from inspection.records import TemperatureReading, Unit, VibrationReading

    env = dict(line_id="line-1", source="plant/line-1/sensor", event_time=datetime(2026, 2, 1, tzinfo=UTC))

    def unit(i: int, channels: int = 1) -> Unit:
        values = np.random.default_rng(i).standard_normal((channels, 2000))
        return Unit(f"u{i}", "line-1", vibration=VibrationReading(
            values=values, sample_rate_hz=48_828.0, unit="g", unit_id=f"u{i}", reading_id=f"u{i}-v", **env))

    config = NormalOnlyConfig({"vibration": EncoderSpec(
        "waveform", {"preprocess": {"n_bins": 64, "env_bins": 32, "wave_len": 512}})},
        spectrum_bands=16, envelope_bands=16)
    det = NormalOnlyDetector(config).fit([unit(i) for i in range(12)])
    no_vibration = Unit("u22", "line-1", temperature=TemperatureReading(
        values=np.full((2, 30), 20.0), sample_rate_hz=1.0, unit="degC", unit_id="u22", reading_id="u22-t", **env))
    units = [unit(20), unit(21, channels=2), no_vibration, unit(23)]
    feats, failures = det.extract(units)
    assert [(b, m) for b, m, _ in failures] == [(1, "vibration")] and "1 channel" in failures[0][2]
    rows, x = feats["vibration"]
    assert rows.tolist() == [0, 3] and x.shape == (2, 32)
    np.testing.assert_array_equal(x, det.features([units[0], units[3]])["vibration"][1])
