"""SKAB from the shared folder: layout, parsing, the published protocol, and the T² harness sanity check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from inspection.data.skab import (
    FEATURES,
    TEMPERATURE_CHANNELS,
    VIBRATION_CHANNELS,
    SkabFile,
    hotelling_t2_baseline,
    load_skab,
    load_skab_anomaly_free,
    protocol_split,
    skab_root,
    skab_score,
)
from inspection.errors import DataError

pytestmark = pytest.mark.data

# The published leaderboard row of Hotelling T² (outlier detection, pooled test parts of the 34 files), and
# the independent reimplementation's FAR, which differs from the published 19.21 in the last digit.
PUBLISHED_F1 = 0.66
REPRODUCED_FAR_PERCENT = 19.20
PUBLISHED_MAR_PERCENT = 42.60
# The leaderboard prints F1 with two decimals; half a unit in that place is the rounding it allows.
F1_TOLERANCE = 0.005
# FAR and MAR are printed with two decimals; 0.05 % is about 10 of ~11,000 normal rows (FAR) or 7 of ~12,800
# anomalous rows (MAR): tight enough that a wrong split, window or limit (hundreds of rows) fails.
RATE_TOLERANCE_PERCENT = 0.05

EXPECTED_HEADER = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return skab_root()
    except DataError as exc:
        pytest.skip(f"SKAB folder (../shared/data/skab) is not available: {exc}")


@pytest.fixture(scope="module")
def files(root: Path) -> list[SkabFile]:
    return load_skab(root)


def test_34_labelled_files_in_group_order(files: list[SkabFile]) -> None:
    assert len(files) == 34
    groups = Counter(f.name.split("/")[0] for f in files)
    assert groups == {"valve1": 16, "valve2": 4, "other": 14}
    expected = (
        [f"valve1/{i}" for i in range(16)]
        + [f"valve2/{i}" for i in range(4)]
        + [f"other/{i}" for i in range(1, 15)]
    )
    assert [f.name for f in files] == expected


def test_columns_types_and_labels(files: list[SkabFile]) -> None:
    assert FEATURES == EXPECTED_HEADER
    assert VIBRATION_CHANNELS == ("Accelerometer1RMS", "Accelerometer2RMS")
    assert TEMPERATURE_CHANNELS == ("Temperature", "Thermocouple")
    for f in files:
        rows = len(f)
        assert f.times.dtype == np.dtype("datetime64[s]") and f.times.shape == (rows,)
        assert np.all(np.diff(f.times).astype(np.int64) > 0)
        assert f.values.dtype == np.float64 and f.values.shape == (rows, 8)
        assert not f.values.flags.writeable
        for labels in (f.anomaly, f.changepoint):
            assert labels is not None and labels.dtype == np.int8 and labels.shape == (rows,)
            assert set(np.unique(labels)) <= {0, 1}
        assert f.anomaly.any()


def test_first_row_of_valve1_0_is_parsed_exactly(files: list[SkabFile]) -> None:
    # 2020-03-09 10:14:33;0.0265878;0.0401113;1.3302;0.054711;79.3366;26.0199;233.062;32.0;0.0;0.0
    first = files[0]
    assert first.times[0] == np.datetime64("2020-03-09T10:14:33")
    np.testing.assert_array_equal(
        first.values[0], [0.0265878, 0.0401113, 1.3302, 0.054711, 79.3366, 26.0199, 233.062, 32.0]
    )
    assert first.anomaly[0] == 0 and first.changepoint[0] == 0


def test_channels_are_channel_major(files: list[SkabFile]) -> None:
    f = files[0]
    vib = f.channels(VIBRATION_CHANNELS)
    assert vib.shape == (2, len(f))
    np.testing.assert_array_equal(vib[1], f.values[:, 1])
    temp = f.channels(TEMPERATURE_CHANNELS)
    np.testing.assert_array_equal(temp, f.values[:, [4, 5]].T)
    with pytest.raises(ValueError, match="unknown"):
        f.channels(["Humidity"])


def test_anomaly_free_file(root: Path) -> None:
    free = load_skab_anomaly_free(root)
    assert len(free) == 9405
    assert free.values.shape == (9405, 8)
    assert free.anomaly is None and free.changepoint is None


def test_protocol_split_is_400_rows_then_the_rest(files: list[SkabFile]) -> None:
    for f in files:
        train, test = protocol_split(f)
        assert len(train) == 400
        assert len(test) == len(f) - 400
        assert train.times[-1] < test.times[0]
        np.testing.assert_array_equal(np.concatenate([train.values, test.values]), f.values)
        np.testing.assert_array_equal(np.concatenate([train.anomaly, test.anomaly]), f.anomaly)
    with pytest.raises(ValueError):
        protocol_split(files[0], train_rows=len(files[0]))


def test_skab_score_on_a_hand_made_case() -> None:
    y_true = [np.array([0, 0, 1, 1, 0]), np.array([1, 0])]
    y_pred = [np.array([0, 1, 1, 0, 0]), np.array([1, 1])]
    # file 1: row 2 TP, row 1 FP, row 3 FN, rows 0 and 4 TN; file 2: row 0 TP, row 1 FP.
    tp, fp, tn, fn = 2, 2, 2, 1
    score = skab_score(y_true, y_pred)
    assert (score.tp, score.fp, score.tn, score.fn) == (tp, fp, tn, fn)
    assert score.f1 == pytest.approx(4 / 7)  # 2 / (2 + (2 + 1) / 2)
    assert score.far == pytest.approx(50.0)  # 2 / (2 + 2)
    assert score.mar == pytest.approx(100 / 3)  # 1 / (1 + 2)


def test_skab_score_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="as many"):
        skab_score([np.zeros(3)], [np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="expected 3 predictions"):
        skab_score([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ValueError, match="0 and 1"):
        skab_score([np.zeros(3)], [np.array([0, 2, 1])])


def test_hotelling_t2_reproduces_the_published_row(files: list[SkabFile]) -> None:
    y_true, y_pred = [], []
    for f in files:
        _, test = protocol_split(f)
        pred = hotelling_t2_baseline(f)
        assert pred.shape == (len(test),)
        assert not pred[:4].any()  # no full 5-row window yet
        y_true.append(test.anomaly)
        y_pred.append(pred)
    score = skab_score(y_true, y_pred)
    assert score.f1 == pytest.approx(PUBLISHED_F1, abs=F1_TOLERANCE)
    assert score.far == pytest.approx(REPRODUCED_FAR_PERCENT, abs=RATE_TOLERANCE_PERCENT)
    assert score.mar == pytest.approx(PUBLISHED_MAR_PERCENT, abs=RATE_TOLERANCE_PERCENT)


def test_a_missing_root_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="does not exist"):
        skab_root(tmp_path / "absent")
    monkeypatch.setenv("INSPECTION_SKAB_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="INSPECTION_SKAB_DIR"):
        load_skab()


def test_a_wrong_header_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "anomaly-free" / "anomaly-free.csv"
    bad.parent.mkdir()
    bad.write_text("datetime;Accelerometer1RMS\n2020-02-08 13:30:47;0.2\n")
    with pytest.raises(DataError, match="anomaly-free.csv"):
        load_skab_anomaly_free(tmp_path)
