"""A documented thermal simulator: the fallback temperature source when SKAB is not available.

Model (per window, 1 Hz by default). Channel 0 is a motor/bearing housing, channel 1 the ambient air near it::

    T_amb(t) = A0 + a * sin(2 pi t / P + phase) + random walk (slow drift)
    dT_h/dt  = (R_th * Q(t) - (T_h - T_amb)) / tau        first-order heating of the housing

with heat input ``Q`` (W, the machine's load with small fluctuations), thermal resistance ``R_th`` (K/W) and
time constant ``tau`` (s). The housing starts near its steady state. Both probes add Gaussian noise and 0.01 degC
quantisation.

Defect signatures, each starting at a random onset inside the window:

- ``friction``: extra heat that grows linearly (a dry or damaged bearing): Q += k * (t - onset).
- ``cooling_loss``: the thermal resistance jumps (a fan or coolant failure): R_th *= 1.6-2.2.
- ``sensor_spike``: a few isolated spikes of 4-15 degC on one probe (a loose thermocouple).

Everything that used this simulator must say "synthetic temperature": the composite builder records it in each
unit's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAULTS = ("friction", "cooling_loss", "sensor_spike")
CHANNELS = ("housing", "ambient")
SYNTHETIC_NOTE = "synthetic temperature"


@dataclass(frozen=True)
class ThermalConfig:
    """Parameters of the simulated machine; every window draws its own values around these.

    Attributes:
        sample_rate_hz: probe rate.
        ambient_c: mean ambient temperature.
        heat_w: mean heat input of the running machine.
        resistance_k_per_w: housing-to-ambient thermal resistance.
        tau_s: thermal time constant of the housing.
        noise_c: probe noise (standard deviation, degC).
    """

    sample_rate_hz: float = 1.0
    ambient_c: float = 24.0
    heat_w: float = 400.0
    resistance_k_per_w: float = 0.1
    tau_s: float = 240.0
    noise_c: float = 0.05

    def __post_init__(self) -> None:
        for name in ("sample_rate_hz", "heat_w", "resistance_k_per_w", "tau_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ThermalConfig.{name} must be > 0; got {getattr(self, name)}")
        if self.noise_c < 0:
            raise ValueError(f"ThermalConfig.noise_c must be >= 0; got {self.noise_c}")


def simulate(
    rng: np.random.Generator, samples: int, fault: str | None = None, config: ThermalConfig = ThermalConfig()
) -> np.ndarray:
    """Simulate one window of the two probes.

    Args:
        rng: the random source (seeded by the caller).
        samples: window length S.
        fault: None for a healthy machine, or one of :data:`FAULTS`.

    Returns:
        float32 ``[2, S]`` in degC: housing, ambient.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2; got {samples}")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be None or one of {FAULTS}; got {fault!r}")
    dt = 1.0 / config.sample_rate_hz
    t = np.arange(samples) * dt
    ambient = (
        config.ambient_c
        + rng.normal(0, 2.0)
        + rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * t / rng.uniform(1800, 7200) + rng.uniform(0, 2 * np.pi))
        + np.cumsum(rng.normal(0, 0.01, samples))
    )
    heat_level = config.heat_w * rng.uniform(0.7, 1.3)
    heat = heat_level * (1 + 0.03 * rng.standard_normal(samples))
    resistance = np.full(samples, config.resistance_k_per_w * rng.uniform(0.85, 1.15))
    tau = config.tau_s * rng.uniform(0.8, 1.2)
    onset = int(rng.integers(samples // 6, samples // 2)) if fault else samples
    if fault == "friction":
        # grows to +60-150 % extra heat by the end of the window
        slope = config.heat_w * rng.uniform(0.6, 1.5) / max(samples - onset, 1)
        heat = heat + np.where(np.arange(samples) >= onset, slope * (np.arange(samples) - onset), 0.0)
    elif fault == "cooling_loss":
        resistance[onset:] *= rng.uniform(1.6, 2.2)

    housing = np.empty(samples)
    housing[0] = ambient[0] + resistance[0] * heat_level + rng.normal(0, 0.3)  # near steady state
    for i in range(1, samples):
        target = ambient[i - 1] + resistance[i - 1] * heat[i - 1]
        housing[i] = housing[i - 1] + (target - housing[i - 1]) * (1 - np.exp(-dt / tau))

    out = np.stack([housing, ambient]) + rng.normal(0, config.noise_c, (2, samples))
    if fault == "sensor_spike":
        channel = int(rng.integers(0, 2))
        n_spikes = int(rng.integers(2, 5))
        where = rng.choice(np.arange(onset, samples), size=min(n_spikes, samples - onset), replace=False)
        out[channel, where] += rng.choice([-1.0, 1.0], size=len(where)) * rng.uniform(4, 15, size=len(where))
    return (np.round(out, 2)).astype(np.float32)
