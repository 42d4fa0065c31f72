"""The drift-tracking normal-only detector: closed forms, a synthetic drifting plant, and SKAB's normal run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inspection.anomaly import (
    DriftTrackingConfig,
    DriftTrackingDetector,
    NormalDrift,
    learn_normal_drift,
    normal_segments,
    track_deviations,
)
from inspection.errors import ConfigError, DataError, NotCalibratedError

TRAIN_ROWS = 400
RUN_ROWS = 1150
TARGET_FAR = 0.10
#: A margin calibrated on one set of normal runs may alarm more on fresh runs of the same plant; twice the target
#: is the most we accept (sampling of a 10 % tail over a few dozen runs, not a systematic miss).
FRESH_FAR_FACTOR = 2.0
#: Float reassociation in the recursive baseline: far below any quantity the tests compare.
CLOSED_FORM_ATOL = 1e-12


def plant_run(rng: np.random.Generator, rows: int = RUN_ROWS) -> np.ndarray:
    """[rows, 3] normal operation: channel 0 warms up slowly at a random rate (smooth drift, up to ~8 noise sd
    over a run), channels 1 and 2 are white noise around fixed set points."""
    t = np.arange(rows)
    warming = rng.uniform(0.0, 8.0) * t / rows + np.cumsum(rng.normal(0, 0.02, rows))
    return np.column_stack([
        warming + rng.normal(0, 1.0, rows),
        5.0 + rng.normal(0, 1.0, rows),
        -2.0 + rng.normal(0, 0.5, rows),
    ])


@pytest.fixture(scope="module")
def learned() -> NormalDrift:
    rng = np.random.default_rng(0)
    runs = [plant_run(rng) for _ in range(40)]
    return learn_normal_drift(runs, DriftTrackingConfig(), train_rows=TRAIN_ROWS, target_far=TARGET_FAR)


def test_the_baseline_follows_a_step_exponentially_unless_the_channel_is_over_its_limit():
    tau = 50.0
    z = np.ones((1, 200, 1))  # a unit step right after fitting, [S, T, F]
    followed = track_deviations(z, np.ones(1), math.inf, tau)[0, :, 0]
    np.testing.assert_allclose(followed, (1 - 1 / tau) ** np.arange(200), rtol=0, atol=CLOSED_FORM_ATOL)
    held = track_deviations(z, np.ones(1), 0.5, tau)[0, :, 0]  # 1 > 0.5 from the first row: the baseline stops
    np.testing.assert_array_equal(held, np.ones(200))
    # scales divide, per channel
    two = track_deviations(np.ones((1, 3, 2)), np.array([2.0, 4.0]), 0.1, tau)[0]
    np.testing.assert_array_equal(two, [[0.5, 0.25]] * 3)


def test_a_drifting_channel_gets_a_wide_scale_and_fresh_normal_runs_stay_quiet(learned: NormalDrift):
    assert learned.far <= TARGET_FAR
    # channel 0 drifts several noise sd over a run; the white-noise channels only average their noise down
    assert learned.scales[0] > 3 * max(learned.scales[1], learned.scales[2])
    rng = np.random.default_rng(1)
    alarms = []
    for _ in range(20):
        run = plant_run(rng)
        det = DriftTrackingDetector(DriftTrackingConfig(), learned).fit(run[:TRAIN_ROWS])
        alarms.append(det.predict(run[TRAIN_ROWS:]))
    assert np.concatenate(alarms).mean() <= FRESH_FAR_FACTOR * TARGET_FAR


def test_a_sustained_shift_of_a_steady_channel_alarms_throughout_and_clears_after(learned: NormalDrift):
    config = DriftTrackingConfig()
    rng = np.random.default_rng(2)
    hits, after = [], []
    for _ in range(10):
        run = plant_run(rng)
        start, stop = TRAIN_ROWS + 150, TRAIN_ROWS + 550  # 400 rows: longer than tau would absorb unstopped
        run[start:stop, 1] += 1.5  # 1.5 noise sd: invisible row by row, clear in a 60-row mean
        det = DriftTrackingDetector(config, learned).fit(run[:TRAIN_ROWS])
        pred = det.predict(run[TRAIN_ROWS:])
        settle = config.window + config.persistence  # rows for the trailing mean to fill with shifted rows
        hits.append(pred[150 + settle:550])
        after.append(pred[550 + settle:])
    assert np.concatenate(hits).mean() > 0.95
    assert np.concatenate(after).mean() <= FRESH_FAR_FACTOR * TARGET_FAR


def test_learning_rejects_bad_inputs():
    config = DriftTrackingConfig()
    rng = np.random.default_rng(3)
    runs = [plant_run(rng) for _ in range(3)]
    with pytest.raises(ConfigError, match="target_far"):
        learn_normal_drift(runs, config, train_rows=TRAIN_ROWS, target_far=1.5)
    with pytest.raises(ConfigError, match="at least one"):
        learn_normal_drift([], config, train_rows=TRAIN_ROWS, target_far=TARGET_FAR)
    with pytest.raises(ConfigError, match="one \\[T, F\\] shape"):
        learn_normal_drift([runs[0], runs[1][:900]], config, train_rows=TRAIN_ROWS, target_far=TARGET_FAR)
    with pytest.raises(ConfigError, match="train_rows"):
        learn_normal_drift(runs, config, train_rows=RUN_ROWS, target_far=TARGET_FAR)
    frozen = [np.column_stack([r[:, :2], np.full(RUN_ROWS, 7.0)]) for r in runs]  # channel 2 never moves
    with pytest.raises(ConfigError, match=r"channel\(s\) \[2\]"):
        learn_normal_drift(frozen, config, train_rows=TRAIN_ROWS, target_far=TARGET_FAR)
    with pytest.raises(ConfigError, match="stride"):
        normal_segments(runs[0], 500, 0)
    cut = normal_segments(runs[0][:1000], 500, 300)  # starts 0 and 300; one at 600 would end past row 1000
    assert len(cut) == 2
    np.testing.assert_array_equal(cut[1], runs[0][300:800])


def test_detector_state_fails_loudly_before_it_exists(learned: NormalDrift):
    rows = plant_run(np.random.default_rng(4))
    with pytest.raises(NotCalibratedError, match="fit"):
        DriftTrackingDetector(DriftTrackingConfig(), learned).predict(rows)
    fitted = DriftTrackingDetector(DriftTrackingConfig()).fit(rows[:TRAIN_ROWS])
    assert fitted.deviations(rows[TRAIN_ROWS:]).shape == (RUN_ROWS - TRAIN_ROWS, 3)
    with pytest.raises(NotCalibratedError, match="NormalDrift"):
        fitted.predict(rows[TRAIN_ROWS:])
    with pytest.raises(ConfigError, match="3 channels"):
        DriftTrackingDetector(DriftTrackingConfig(), learned).fit(rows[:TRAIN_ROWS, :2])
    with pytest.raises(ConfigError, match="T >= 61"):
        DriftTrackingDetector(DriftTrackingConfig()).fit(rows[:30])
    with pytest.raises(ConfigError, match=r"\[T, 3\]"):
        fitted.deviations(rows[TRAIN_ROWS:, :2])


@pytest.mark.parametrize("bad", [{"window": 0}, {"persistence": 1.5}, {"tau": 0.5}, {"tau": math.inf},
                                 {"scale_quantile": 1.0}, {"window": True}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DriftTrackingConfig(**bad)


def test_normal_drift_validates_and_round_trips_through_json(learned: NormalDrift):
    back = NormalDrift.from_dict(json.loads(json.dumps(learned.to_dict())))
    np.testing.assert_array_equal(back.scales, learned.scales)
    assert (back.margin, back.far) == (learned.margin, learned.far)
    with pytest.raises(ConfigError, match="unknown NormalDrift key"):
        NormalDrift.from_dict({**learned.to_dict(), "thresholds": 1})
    with pytest.raises(ConfigError, match="scales"):
        NormalDrift(scales=np.array([1.0, 0.0]), margin=1.0, far=0.1)
    with pytest.raises(ConfigError, match="margin"):
        NormalDrift(scales=np.ones(2), margin=math.nan, far=0.1)
    with pytest.raises(ValueError):  # learned state is read-only
        learned.scales[0] = 1.0


@pytest.mark.data
def test_skab_normal_run_margin_carries_over_between_its_halves():
    """Learned on the first half of SKAB's anomaly-free recording, the detector keeps its false alarms on
    file-sized segments of the second half within twice the target, and vice versa."""
    from inspection.data import skab
    from inspection.skab_protocol import SEGMENT_ROWS, SEGMENT_STRIDE

    try:
        free = skab.load_skab_anomaly_free().values
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")
    half = len(free) // 2
    config = DriftTrackingConfig()
    parts = (free[:half], free[half:])
    for learn_on, check_on in ((0, 1), (1, 0)):
        drift = learn_normal_drift(normal_segments(parts[learn_on], SEGMENT_ROWS, SEGMENT_STRIDE), config,
                                   train_rows=skab.TRAIN_ROWS, target_far=TARGET_FAR)
        alarms = [DriftTrackingDetector(config, drift).fit(seg[:skab.TRAIN_ROWS]).predict(seg[skab.TRAIN_ROWS:])
                  for seg in normal_segments(parts[check_on], SEGMENT_ROWS, SEGMENT_STRIDE)]
        assert np.concatenate(alarms).mean() <= FRESH_FAR_FACTOR * TARGET_FAR, (learn_on, check_on)
