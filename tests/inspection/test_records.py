"""Records validate themselves when built; units, labels and decisions keep their invariants."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from inspection.errors import Reason, RecordError
from inspection.records import (
    Decision,
    InputCoordinate,
    Label,
    TemperatureReading,
    Unit,
    VibrationReading,
    VisionReading,
    decision_id,
)

T0 = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)


def env(modality: str, unit_id: str = "u-1", line_id: str = "line-1") -> dict:
    return dict(unit_id=unit_id, line_id=line_id, reading_id=f"{unit_id}-{modality}", source="plant/x", event_time=T0)


def vib(unit_id: str = "u-1", **kw) -> VibrationReading:
    args = dict(values=np.zeros((1, 16), np.float32), sample_rate_hz=1000.0, unit="g") | kw
    return VibrationReading(**args, **env("vibration", unit_id))


def temp(unit_id: str = "u-1") -> TemperatureReading:
    return TemperatureReading(values=np.full((2, 8), 20.0), sample_rate_hz=1.0, unit="degC", **env("temperature", unit_id))


def test_arrays_are_private_read_only_float32_copies():
    source = np.arange(32, dtype=np.float64).reshape(2, 16)
    r = vib(values=source)
    source[0, 0] = 99.0
    assert r.values.dtype == np.float32 and r.values[0, 0] == 0.0
    with pytest.raises(ValueError):
        r.values[0, 0] = 1.0
    assert (r.channels, r.samples, r.duration_s) == (2, 16, 0.016)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(values=np.zeros((16,), np.float32)), Reason.BAD_SHAPE),
    (dict(values=np.zeros((1, 0), np.float32)), Reason.BAD_SHAPE),
    (dict(values=np.zeros((1, 4), np.int16)), Reason.BAD_DTYPE),
    (dict(values=np.array([[0.0, np.nan]])), Reason.NON_FINITE),
    (dict(sample_rate_hz=0.0), Reason.BAD_SAMPLE_RATE),
    (dict(sample_rate_hz=float("inf")), Reason.BAD_SAMPLE_RATE),
    (dict(sample_rate_hz=True), Reason.BAD_SAMPLE_RATE),
    (dict(unit="degC"), Reason.BAD_PHYSICAL_UNIT),
])
def test_array_reading_checks(kwargs, reason):
    with pytest.raises(RecordError) as info:
        vib(**kwargs)
    assert info.value.reason is reason


@pytest.mark.parametrize("field, value, reason", [
    ("unit_id", "", Reason.BAD_UNIT_ID),
    ("unit_id", "-leading-dash", Reason.BAD_UNIT_ID),
    ("unit_id", "x" * 129, Reason.BAD_UNIT_ID),
    ("line_id", "line 1", Reason.BAD_LINE_ID),
    ("reading_id", "", Reason.BAD_READING_ID),
    ("source", "", Reason.BAD_SOURCE),
    ("event_time", datetime(2026, 1, 1), Reason.BAD_EVENT_TIME),
    ("event_time", "2026-01-01T00:00:00Z", Reason.BAD_EVENT_TIME),
])
def test_envelope_checks(field, value, reason):
    args = env("vibration") | {field: value}
    with pytest.raises(RecordError) as info:
        VibrationReading(values=np.zeros((1, 4)), sample_rate_hz=1.0, unit="g", **args)
    assert info.value.reason is reason


def test_vision_reading_checks_its_bytes():
    with pytest.raises(RecordError) as info:
        VisionReading(data=b"", content_type="image/png", **env("vision"))
    assert info.value.reason is Reason.EMPTY_PAYLOAD
    png = VisionReading.from_array(np.zeros((16, 16), np.uint8), **env("vision")).data
    with pytest.raises(RecordError) as info:
        VisionReading(data=png, content_type="image/jpeg", **env("vision"))
    assert info.value.reason is Reason.IMAGE_FORMAT_MISMATCH
    with pytest.raises(RecordError) as info:
        VisionReading.from_array(np.zeros((16, 16), np.float32), **env("vision"))
    assert info.value.reason is Reason.IMAGE_BAD_DEPTH
    with pytest.raises(RecordError) as info:
        VisionReading.from_array(np.zeros((16, 16), np.uint16), content_type="image/jpeg", **env("vision"))
    assert info.value.reason is Reason.IMAGE_BAD_DEPTH


def test_unit_presence_and_membership():
    u = Unit("u-1", "line-1", vibration=vib(), temperature=temp())
    assert u.present == ("vibration", "temperature") and u.missing == ("vision",)
    assert u.without("temperature").present == ("vibration",)
    with pytest.raises(RecordError) as info:
        u.without("vibration", "temperature")
    assert info.value.reason is Reason.EMPTY_UNIT
    with pytest.raises(RecordError) as info:
        Unit("u-1", "line-1", vibration=vib("u-2"))
    assert info.value.reason is Reason.UNIT_MISMATCH
    with pytest.raises(RecordError) as info:
        Unit("u-1", "line-1", vibration=temp())
    assert info.value.reason is Reason.UNIT_MISMATCH


def test_unit_event_time_is_the_latest_reading():
    late = VibrationReading(values=np.zeros((1, 4)), sample_rate_hz=1.0, unit="g",
                            **(env("vibration") | {"event_time": T0 + timedelta(seconds=3)}))
    assert Unit("u-1", "line-1", vibration=late, temperature=temp()).event_time == T0 + timedelta(seconds=3)


@pytest.mark.parametrize("kwargs", [
    dict(defect=True),  # a defect needs a culprit
    dict(defect=False, culprits={"vision"}),  # a good unit has none
    dict(defect=True, culprits={"audio"}),
    dict(defect=1, culprits={"vision"}),
    dict(defect=True, culprits={"vision"}, severity=1.5),
    dict(defect=False, defect_class=""),
])
def test_label_consistency(kwargs):
    with pytest.raises(RecordError) as info:
        Label(**kwargs)
    assert info.value.reason is Reason.BAD_LABEL


def make_decision(**kw) -> Decision:
    args = dict(
        unit_id="u-1", line_id="line-1", decision="defect", score=0.91, threshold=0.5, defect_class="vibration",
        modality_scores={"vibration": 0.95, "temperature": 0.1}, present=("vibration", "temperature"),
        missing=("vision",), attributions={"modality": {"vibration": 0.4, "temperature": 0.01}},
        model_version="m-3", threshold_version="t-2",
        inputs=(InputCoordinate("inspection.vibration", 2, 17), InputCoordinate("inspection.temperature", 2, 9)),
        event_time=T0, decided_at=T0 + timedelta(milliseconds=40), latency_ms=40.0, report_url="reports/u-1.html",
    ) | kw
    return Decision(**args)


def test_decision_json_round_trip_and_cloudevent_shape():
    d = make_decision()
    ev = json.loads(d.to_json())
    assert ev["specversion"] == "1.0" and ev["type"] == "inspection.decision.v1" and ev["subject"] == "u-1"
    assert ev["id"] == d.id and ev["data"]["modalities"] == {"present": ["vibration", "temperature"],
                                                             "missing": ["vision"]}
    assert Decision.from_json(d.to_json()) == d


def test_decision_id_is_deterministic_and_order_free():
    a = make_decision()
    b = make_decision(inputs=tuple(reversed(a.inputs)), score=0.2, decision="ok", decided_at=T0 + timedelta(hours=1))
    assert a.id == b.id  # a redelivery re-scored later keeps its id
    assert make_decision(model_version="m-4").id != a.id
    assert make_decision(inputs=(InputCoordinate("inspection.vibration", 2, 18),)).id != a.id
    assert decision_id("u-1", "m-3", a.inputs) == a.id


def test_decision_rejects_tampering_and_bad_values():
    ev = json.loads(make_decision().to_json())
    ev["data"]["model_version"] = "m-forged"
    with pytest.raises(RecordError) as info:
        Decision.from_json(json.dumps(ev).encode())
    assert info.value.reason is Reason.BAD_DECISION
    with pytest.raises(RecordError):
        Decision.from_json(b"{not json")
    for bad in (dict(decision="maybe"), dict(score=float("nan")), dict(present=("vision",), missing=("vision",))):
        with pytest.raises(RecordError) as info:
            make_decision(**bad)
        assert info.value.reason is Reason.BAD_DECISION
