"""Waveform preprocessing and encoder options: level invariance, envelope modulation depth, token branches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspection.encoders import WAVEFORM_BRANCHES, WaveformEncoderConfig, create_encoder
from inspection.errors import ConfigError, DataError
from inspection.preprocess import WaveformPreprocess

RATE_HZ = 48_000.0
SECONDS = 0.25  # 12,000 samples: FFT bins every 4 Hz, so 80 Hz and 5 kHz fall on bins
#: The same float64 pipeline on a scaled copy: only rounding of the scale and the float32 output differ.
GAIN_RTOL = 1e-5
#: Amplitude read off one Hann-windowed FFT bin of a tone that sits exactly on that bin (float64 FFT).
BIN_ATOL = 1e-3
DIM = 32
#: log(e + 1e-6) against envelope bins of ~1e-2 and more: the offset moves a log value by at most ~1e-4.
LOG_OFFSET_ATOL = 1e-3


def modulated_carrier(depth: float, f_mod: float = 80.0, f_carrier: float = 5_000.0) -> np.ndarray:
    """[1, S] a resonance at ``f_carrier`` whose amplitude pulses at ``f_mod`` with the given depth."""
    t = np.arange(int(RATE_HZ * SECONDS)) / RATE_HZ
    return ((1 + depth * np.cos(2 * np.pi * f_mod * t)) * np.cos(2 * np.pi * f_carrier * t))[None]


def env_bin(p: WaveformPreprocess, hz: float) -> int:
    return int(hz // (p.env_max_hz / p.env_bins))


def test_envelope_modulation_reads_the_modulation_depth_whatever_the_level():
    p = WaveformPreprocess(env_modulation=True)
    plain = WaveformPreprocess()
    for depth in (0.2, 0.5):
        x = modulated_carrier(depth)
        for gain in (0.1, 1.0, 30.0):
            env = np.exp(p(gain * x, RATE_HZ)["envelope"][0].astype(np.float64)) - 1e-6
            assert env[env_bin(p, 80.0)] == pytest.approx(depth, abs=BIN_ATOL)
            raw = np.exp(plain(gain * x, RATE_HZ)["envelope"][0].astype(np.float64)) - 1e-6
            assert raw[env_bin(plain, 80.0)] == pytest.approx(gain * depth, rel=BIN_ATOL)  # plain: scales with level
        # away from the modulation frequency and its neighbours' leakage, nothing
        assert env[env_bin(p, 400.0)] < BIN_ATOL


def test_level_invariant_spectrum_and_waveform_ignore_the_gain():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, int(RATE_HZ * SECONDS))) + modulated_carrier(0.3)
    inv = WaveformPreprocess(level_invariant=True, env_modulation=True)
    a, b = inv(x, RATE_HZ), inv(7.5 * x, RATE_HZ)
    for key in ("spectrum", "envelope", "wave"):
        np.testing.assert_allclose(a[key], b[key], rtol=GAIN_RTOL, atol=GAIN_RTOL)
    plain = WaveformPreprocess()
    centred = x - x.mean()
    unit = plain(centred / np.sqrt(np.mean(centred**2)), RATE_HZ)  # the same as dividing by the RMS first
    for key in ("spectrum", "wave"):
        np.testing.assert_allclose(a[key], unit[key], rtol=GAIN_RTOL, atol=GAIN_RTOL)
    c, d = plain(x, RATE_HZ), plain(7.5 * x, RATE_HZ)
    assert np.median(d["spectrum"] - c["spectrum"]) == pytest.approx(np.log(7.5), rel=1e-3)


def test_floor_subtraction_leaves_peak_prominence_and_drops_any_common_factor():
    rng = np.random.default_rng(1)
    x = 100.0 * (modulated_carrier(0.3) + 0.05 * rng.standard_normal((1, int(RATE_HZ * SECONDS))))
    p = WaveformPreprocess(env_floor_bins=15)
    a, b = p(x, RATE_HZ)["envelope"][0], p(20.0 * x, RATE_HZ)["envelope"][0]
    # a common factor is a shift in log terms; only the 1e-6 offset inside the log (against a floor ~1e-2) differs
    np.testing.assert_allclose(a, b, rtol=0, atol=LOG_OFFSET_ATOL)
    peak = a[env_bin(p, 80.0)]
    assert peak > np.log(10)  # the modulation stands an order of magnitude out of the floor
    assert abs(np.median(a)) < 0.1 and peak == a.max()  # the floor itself sits at 0


def test_envelope_low_pass_keeps_a_resonance_above_it_out():
    rate = 97_656.0
    t = np.arange(int(rate * SECONDS)) / rate
    high = ((1 + 0.5 * np.cos(2 * np.pi * 80.0 * t)) * np.cos(2 * np.pi * 30_000.0 * t))[None]
    low = 0.2 * np.cos(2 * np.pi * 5_000.0 * t)[None]  # an unmodulated resonance inside the band
    full, limited = WaveformPreprocess(), WaveformPreprocess(env_low_pass_hz=20_000.0)
    k = env_bin(full, 80.0)
    assert np.exp(full(high + low, rate)["envelope"][0, k]) > 0.1  # demodulated from the 30 kHz resonance
    assert np.exp(limited(high + low, rate)["envelope"][0, k]) < 1e-3  # out of band: nothing pulses at 80 Hz


@pytest.mark.parametrize("bad, match", [
    (dict(env_relative=True, env_modulation=True), "env_relative and env_modulation"),
    (dict(env_relative=True, env_floor_bins=9), "env_relative and env_floor_bins"),
    (dict(env_floor_bins=-1), "env_floor_bins must be an integer"),
    (dict(env_floor_bins=300), "env_floor_bins must be an integer"),
    (dict(env_low_pass_hz=500.0), "env_low_pass_hz must be above"),
])
def test_preprocess_rejects_bad_envelope_options(bad, match):
    with pytest.raises(ConfigError, match=match):
        WaveformPreprocess(**bad)


def test_default_branches_keep_the_stored_weight_layout():
    enc = create_encoder("waveform")
    assert enc.config.branches == WAVEFORM_BRANCHES == ("spectrum", "envelope", "wave")
    prefixes = {k.split(".")[0] for k in enc.state_dict()}
    assert prefixes == {"norm_spec", "norm_env", "norm_wave", "spec_in", "env_in", "conv", "pos"}
    assert enc.n_tokens == 1024 // 32 + 256 // 32 + 16


@pytest.mark.parametrize("branches", [("envelope",), ("envelope", "wave"), ("wave", "spectrum")])
def test_branch_subsets_make_only_their_tokens_and_train_every_parameter(branches):
    torch.manual_seed(0)
    p = WaveformPreprocess(n_bins=64, env_bins=32, wave_len=512)
    enc = create_encoder("waveform", embed_dim=DIM, preprocess=p, band_bins=16, env_band_bins=16, wave_tokens=4,
                         branches=branches)
    rng = np.random.default_rng(0)
    x = {"spectrum": torch.from_numpy(rng.normal(-6, 2, (4, 1, 64)).astype(np.float32)),
         "envelope": torch.from_numpy(rng.normal(-8, 2, (4, 1, 32)).astype(np.float32)),
         "wave": torch.from_numpy(rng.standard_normal((4, 1, 512)).astype(np.float32))}
    enc.fit_normalisation(x)
    enc.train()
    out = enc.forward_features(x)
    sizes = {"spectrum": 64 // 16, "envelope": 32 // 16, "wave": 4}
    assert out.shape == (4, sum(sizes[b] for b in branches), DIM)  # [B, N, D]
    kinds = [t.kind for t in enc.token_info()]
    expected = [{"spectrum": "spectrum", "envelope": "envelope", "wave": "waveform"}[b] for b in branches
                for _ in range(sizes[b])]
    assert kinds == expected
    out.square().mean().backward()
    missing = [n for n, q in enc.named_parameters() if q.grad is None or not q.grad.abs().sum()]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("branches", [(), ("envelope", "envelope"), ("envelope", "cepstrum")])
def test_bad_branch_lists_are_rejected(branches):
    with pytest.raises(ConfigError, match="branches must be distinct names"):
        WaveformEncoderConfig(branches=branches)


@pytest.mark.data
def test_real_race_faults_pulse_at_their_fault_frequency():
    """On real recordings the modulation spectrum peaks at the outer-race (BPFO) or inner-race (BPFI) fault
    frequency of the recording's metadata, at every load."""
    from inspection.data.bearings import load_bearings

    try:
        recordings = load_bearings()
    except DataError as exc:
        pytest.skip(f"bearing recordings not available: {exc}")
    p = WaveformPreprocess(env_modulation=True, level_invariant=True)
    step = p.env_max_hz / p.env_bins
    centres = (np.arange(p.env_bins) + 0.5) * step
    checked = 0
    for rec in recordings:
        if rec.label == "baseline":
            continue
        fault = rec.metadata["BPFO" if rec.label == "outer_race" else "BPFI"]
        other = rec.metadata["BPFI" if rec.label == "outer_race" else "BPFO"]
        window = rec.signal[None, : int(SECONDS * rec.sample_rate_hz)]
        env = p(window, rec.sample_rate_hz)["envelope"][0]
        def near(hz: float, env: np.ndarray = env) -> float:  # the envelope bins around one frequency
            return float(env[np.abs(centres - hz) <= step].max())

        assert near(fault) > near(other), rec.name
        checked += 1
    assert checked == 17
