"""Batched torch preprocessing against the per-reading numpy/SciPy reference (inspection.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspection.batchprep import waveform_features
from inspection.benches import BEARINGS_WAVEFORM
from inspection.preprocess import WaveformPreprocess

CONFIGS = {
    "default": WaveformPreprocess(),
    "bearings": WaveformPreprocess(**BEARINGS_WAVEFORM),
    "relative": WaveformPreprocess(env_relative=True),
    "modulation-floor": WaveformPreprocess(env_modulation=True, env_floor_bins=8),
}
# (rate, samples): the rig's two rates (decimation by 2 and 4), the waveform branch's own rate (no resampling),
# a rational ratio with upsampling (24414/50000 -> 12207/25000, limited to a denominator <= 1000), odd lengths
RATES = [(48828.0, 12207), (97656.0, 24414), (24414.0, 5000), (50000.0, 4001), (25600.0, 6400)]


def _readings(rate: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    carrier = rng.standard_normal((3, 1, n))
    return carrier * (1.0 + 0.5 * np.sin(2 * np.pi * 81.0 * t)) + 0.2 * np.sin(2 * np.pi * 3000.0 * t)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("rate", "n"), RATES)
def test_float64_batch_equals_the_reference(name, rate, n):
    cfg = CONFIGS[name]
    x = _readings(rate, n, seed=n)
    want = [cfg(xi, rate) for xi in x]
    got = waveform_features(cfg, torch.from_numpy(x), rate)
    for key in ("spectrum", "envelope", "wave"):
        assert got[key].shape == (3, *want[0][key].shape)
        for i in range(3):
            # the reference rounds its output to float32: agreement to that rounding
            np.testing.assert_allclose(got[key][i].numpy(), want[i][key], rtol=0, atol=2e-6 * max(
                1.0, float(np.abs(want[i][key]).max())), err_msg=f"{key} of reading {i}")


@pytest.mark.parametrize(("rate", "n"), RATES)
def test_float32_batch_is_within_the_stated_tolerance(rate, n):
    cfg = CONFIGS["bearings"]
    x = _readings(rate, n, seed=1)
    want = [cfg(xi, rate) for xi in x]
    got = waveform_features(cfg, torch.from_numpy(x).float(), rate)
    for i in range(3):
        assert np.abs(got["spectrum"][i].numpy() - want[i]["spectrum"]).max() < 1e-4  # log amplitude
        assert np.abs(got["envelope"][i].numpy() - want[i]["envelope"]).max() < 1e-4
        assert np.abs(got["wave"][i].numpy() - want[i]["wave"]).max() < 1e-4 * np.abs(want[i]["wave"]).max()


def test_real_bearing_windows_match_the_reference():
    from inspection.benches import bearings_bench
    from inspection.errors import DataError

    try:
        units = bearings_bench(0).test[::20]
    except DataError as exc:  # the recordings come from PyPI (as in tests/inspection/data/test_bearings.py)
        pytest.skip(f"bearing recordings unavailable: {exc}")
    cfg = CONFIGS["bearings"]
    by_rate: dict[float, list] = {}
    for u in units:
        by_rate.setdefault(u.vibration.sample_rate_hz, []).append(u.vibration)
    assert len(by_rate) == 2  # both of the rig's sample rates
    for rate, readings in by_rate.items():
        x = torch.from_numpy(np.stack([r.values.astype(np.float64) for r in readings]))
        got = waveform_features(cfg, x, rate)
        for i, r in enumerate(readings):
            want = cfg(r.values, rate)
            for key in want:
                np.testing.assert_allclose(got[key][i].numpy(), want[key], rtol=0,
                                           atol=2e-6 * max(1.0, float(np.abs(want[key]).max())))


def test_silent_and_constant_readings_stay_finite():
    cfg = CONFIGS["bearings"]
    x = np.zeros((2, 1, 4096))
    x[1] += 3.0
    got = waveform_features(cfg, torch.from_numpy(x), 48828.0)
    want = [cfg(xi, 48828.0) for xi in x]
    for key in want[0]:
        assert torch.isfinite(got[key]).all()
        for i in range(2):
            np.testing.assert_allclose(got[key][i].numpy(), want[i][key], atol=2e-5)
