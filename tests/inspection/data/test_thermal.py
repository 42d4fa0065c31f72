"""The thermal simulator: healthy windows are steady, each fault leaves its documented signature."""

from __future__ import annotations

import numpy as np
import pytest

from inspection.data import thermal

N = 200  # windows per case
S = 120  # samples per window (2 minutes at 1 Hz)


def windows(fault, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([thermal.simulate(rng, S, fault) for _ in range(N)])  # [N, 2, S]


def rise(w):  # housing: mean of the last 10 s minus mean of the first 10 s
    return w[:, 0, -10:].mean(axis=1) - w[:, 0, :10].mean(axis=1)


def spikes(w):  # largest jump between neighbouring samples on either probe
    return np.abs(np.diff(w, axis=2)).max(axis=(1, 2))


def test_shape_dtype_and_physical_range():
    w = windows(None)
    assert w.shape == (N, 2, S) and w.dtype == np.float32
    assert (w[:, 1] > 10).all() and (w[:, 1] < 40).all()  # ambient
    assert (w[:, 0] > w[:, 1]).mean() > 0.99  # a running machine is warmer than its surroundings


def test_healthy_windows_are_steady():
    w = windows(None)
    assert np.abs(rise(w)).max() < 1.5
    assert spikes(w).max() < 1.0


@pytest.mark.parametrize("fault", ["friction", "cooling_loss"])
def test_heating_faults_raise_the_housing_temperature(fault):
    healthy, faulty = rise(windows(None)), rise(windows(fault, seed=1))
    assert np.median(faulty) > np.percentile(healthy, 99) + 1.0
    assert (faulty > np.abs(healthy).max()).mean() > 0.8


def test_sensor_spikes_are_isolated_jumps():
    w = windows("sensor_spike", seed=2)
    assert (spikes(w) > 3.5).all()
    assert np.abs(rise(w)).max() < 20  # no sustained heating


def test_seeded_and_validated():
    a = thermal.simulate(np.random.default_rng(5), S, "friction")
    b = thermal.simulate(np.random.default_rng(5), S, "friction")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        thermal.simulate(np.random.default_rng(0), S, "meltdown")
    with pytest.raises(ValueError):
        thermal.ThermalConfig(tau_s=0)
