"""Input masking: each way of removing a group from a reading, checked on signals whose answer is known, and the
level-2 explanation with ``masking="input"`` through the one API."""

from __future__ import annotations

import math

import numpy as np
import pytest

from explain.masking import band_stop, baseline_segments, envelope_stop, flatten_segments, remove_regions

RATE = 10_000.0


def tone(f_hz: float, n: int = 10_000, amp: float = 1.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * f_hz * np.arange(n) / RATE)


def power_at(x: np.ndarray, f_hz: float) -> float:
    spec = np.abs(np.fft.rfft(x)) / len(x)
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spec[np.argmin(np.abs(freqs - f_hz))])


def test_band_stop_removes_the_band_and_keeps_the_rest():
    x = (tone(500) + tone(2_000))[None]
    y = band_stop(x, RATE, [(1_500, 2_500)])[0]
    assert power_at(y, 2_000) < 1e-9 and power_at(y, 500) == pytest.approx(0.5, rel=1e-6)


def test_envelope_stop_removes_the_modulation_in_the_band_only():
    n = 20_000
    t = np.arange(n) / RATE
    carrier = np.sin(2 * np.pi * 3_000 * t)
    x = ((1 + 0.5 * np.sin(2 * np.pi * 40 * t) + 0.5 * np.sin(2 * np.pi * 7 * t)) * carrier)[None]
    y = envelope_stop(x, RATE, [(20, 60)])[0]

    def modulation(sig, f):
        from scipy.signal import hilbert

        env = np.abs(hilbert(sig))
        return power_at(env - env.mean(), f)

    assert modulation(x[0], 40) > 0.2 and modulation(y, 40) < 0.02  # the 40 Hz modulation is gone
    assert modulation(y, 7) == pytest.approx(modulation(x[0], 7), rel=0.1)  # the 7 Hz one stays


def test_flatten_and_baseline_segments_replace_only_their_stretch():
    x = np.vstack([np.arange(100.0), np.arange(100.0) ** 1.5])
    flat = flatten_segments(x, 10.0, [(2.0, 3.0)])
    assert np.all(flat[:, 20:30] == x.mean(axis=1, keepdims=True)) and np.array_equal(flat[:, :20], x[:, :20])
    # window = the last 50 samples; channel 1, samples 10-20 of it = reading samples 60-70
    line = baseline_segments(x, 50, [(1, 10, 20)])
    assert np.array_equal(line[0], x[0]) and np.array_equal(line[1, :60], x[1, :60])
    assert np.allclose(np.diff(line[1, 59:71]), (x[1, 70] - x[1, 59]) / 11)  # a straight line across the gap


def test_remove_regions_blurs_inside_the_box_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 300), dtype=np.uint8)
    out = remove_regions(image, [(0.0, 32.0, 32.0, 64.0)], (64.0, 64.0))  # top rows, right half
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[:, :150], image[:, :150]) and np.array_equal(out[150:], image[150:])
    assert out[:150, 150:].std() < image[:150, 150:].std() / 4  # structure gone
    assert abs(float(out[:150, 150:].mean()) - float(image[:150, 150:].mean())) < 5  # brightness kept


def test_level2_input_masking_is_efficient_and_differs_from_token_masking(small_model_factory, unit_factory):
    from explain import explain

    model = small_model_factory()
    rng = np.random.default_rng(1)
    units = [unit_factory(i, rng) for i in range(2)]
    model.fit_normalisation(model.batch(units))
    by_input = explain(model, units, level=2, budget=128, masking="input", seed=0)
    by_tokens = explain(model, units, level=2, budget=128, masking="tokens", seed=0)
    for a, b in zip(by_input, by_tokens, strict=True):
        assert a.masking == "input" and abs(a.efficiency_gap) < 1e-4
        for m, groups in a.groups.items():
            assert math.fsum(g.phi for g in groups) == pytest.approx(a.modality.phi[m], abs=1e-4)
        assert [g.phi for g in a.groups["vision"]] != pytest.approx([g.phi for g in b.groups["vision"]], abs=1e-6)
