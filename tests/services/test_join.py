"""The unit joiner: completion in any order, timeouts, watermarks, capacity, late readings, held offsets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspection.errors import ConfigError
from inspection.records import (
    MODALITIES,
    InputCoordinate,
    TemperatureReading,
    VibrationReading,
    VisionReading,
)
from services.join import CLOSE_REASONS, JoinConfig, JoinedUnit, LateReading, UnitJoiner

T0 = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
TOPICS = {m: f"inspection.{m}" for m in MODALITIES}


@cache
def reading(modality: str, unit_id: str = "u-1", line_id: str = "line-1", event_s: float = 0.0, copy: int = 0):
    """A small valid reading; cached so property tests do not re-encode images."""
    env = dict(unit_id=unit_id, line_id=line_id, reading_id=f"{unit_id}-{modality}-{copy}", source="plant/x",
               event_time=T0 + timedelta(seconds=event_s))
    if modality == "vision":
        return VisionReading.from_array(np.full((8, 8), 7, np.uint8), **env)
    if modality == "vibration":
        return VibrationReading(values=np.zeros((1, 16), np.float32), sample_rate_hz=1000.0, unit="g", **env)
    return TemperatureReading(values=np.full((2, 8), 20.0), sample_rate_hz=1.0, unit="degC", **env)


def coord(modality: str, offset: int, partition: int = 0) -> InputCoordinate:
    return InputCoordinate(TOPICS[modality], partition, offset)


def only_joined(out: list) -> JoinedUnit:
    assert len(out) == 1 and isinstance(out[0], JoinedUnit), out
    return out[0]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs", [
    dict(expected=()),
    dict(expected=("vision", "sound")),
    dict(expected="vision"),
    dict(expected=("vision", "vision")),
    dict(expected=None),
    dict(timeout_s=0),
    dict(timeout_s=-1.0),
    dict(timeout_s=float("nan")),
    dict(timeout_s=float("inf")),
    dict(timeout_s=True),
    dict(watermark_lag_s=0.0),
    dict(watermark_lag_s="30"),
    dict(max_pending=0),
    dict(max_pending=2.5),
    dict(max_pending=True),
    dict(late_memory=0),
    dict(late_memory=-3),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        JoinConfig(**kwargs)


def test_config_normalises_expected_to_canonical_order():
    cfg = JoinConfig(expected=["temperature", "vision"], timeout_s=2, max_pending=3)
    assert cfg.expected == ("vision", "temperature")
    assert cfg.timeout_s == 2.0 and isinstance(cfg.timeout_s, float)
    assert JoinConfig().expected == MODALITIES


def test_joiner_rejects_wrong_argument_types():
    j = UnitJoiner(JoinConfig())
    with pytest.raises(ConfigError):
        UnitJoiner({"timeout_s": 1.0})
    with pytest.raises(TypeError):
        j.add("not a reading", coord("vision", 0), 0.0)
    with pytest.raises(TypeError):
        j.add(reading("vision"), ("inspection.vision", 0, 0), 0.0)
    with pytest.raises(ValueError):
        j.add(reading("vision"), coord("vision", 0), float("nan"))
    assert j.pending == 0


# ------------------------------------------------------------------------------------------- completion
@settings(max_examples=30, deadline=None)
@given(order=st.permutations(MODALITIES))
def test_any_arrival_order_gives_one_complete_unit(order):
    j = UnitJoiner(JoinConfig())
    outs = [j.add(reading(m), coord(m, offset=10 + i), now=float(i)) for i, m in enumerate(order)]
    assert outs[0] == [] and outs[1] == []
    joined = only_joined(outs[2])
    assert joined.complete and joined.missing == () and joined.closed_by == "complete"
    assert dict(joined.inputs) == {m: coord(m, 10 + i) for i, m in enumerate(order)}
    assert joined.unit.unit_id == "u-1" and joined.unit.line_id == "line-1" and joined.unit.label is None
    assert all(getattr(joined.unit, m) is reading(m) for m in MODALITIES)
    assert (joined.first_seen, joined.last_seen, joined.duplicates) == (0.0, 2.0, 0)
    assert joined.coordinates == tuple(sorted(joined.inputs.values()))
    assert j.pending == 0 and j.held_offsets() == {}
    assert j.poll(1_000.0) == [] and j.flush() == []
    assert j.stats()["completed"] == 1


def test_completion_needs_only_expected_and_extras_are_attached():
    j = UnitJoiner(JoinConfig(expected=("vision", "vibration")))
    assert j.add(reading("temperature"), coord("temperature", 0), 0.0) == []
    assert j.add(reading("vision"), coord("vision", 0), 0.1) == []
    joined = only_joined(j.add(reading("vibration"), coord("vibration", 0), 0.2))
    assert joined.complete and joined.unit.present == MODALITIES
    assert set(joined.inputs) == set(MODALITIES)
    # an extra arriving after completion is late
    j2 = UnitJoiner(JoinConfig(expected=("vision",)))
    assert only_joined(j2.add(reading("vision"), coord("vision", 0), 0.0)).unit.present == ("vision",)
    late = j2.add(reading("temperature"), coord("temperature", 0), 0.1)
    assert late == [LateReading(reading("temperature"), coord("temperature", 0), "u-1", "late")]


# ---------------------------------------------------------------------------------------------- timeout
def test_timeout_closes_a_partial_unit_with_its_missing_modalities():
    j = UnitJoiner(JoinConfig(timeout_s=5.0))
    j.add(reading("vibration", "u-1"), coord("vibration", 3), now=100.0)
    j.add(reading("vision", "u-2"), coord("vision", 4), now=102.0)
    j.add(reading("temperature", "u-1"), coord("temperature", 5), now=104.0)  # later readings do not extend it
    assert j.poll(104.999) == []
    joined = only_joined(j.poll(105.0))
    assert joined.unit.unit_id == "u-1" and joined.closed_by == "timeout"
    assert not joined.complete and joined.missing == ("vision",)
    assert joined.unit.present == ("vibration", "temperature")
    assert (joined.first_seen, joined.last_seen) == (100.0, 104.0)
    assert j.pending == 1
    second = only_joined(j.poll(200.0))
    assert second.unit.unit_id == "u-2" and second.missing == ("vibration", "temperature")
    assert j.stats()["timed_out"] == 2 and j.pending == 0


def test_processing_time_never_goes_backwards():
    j = UnitJoiner(JoinConfig(timeout_s=5.0))
    j.add(reading("vision", "u-1"), coord("vision", 0), now=10.0)
    j.add(reading("vision", "u-2"), coord("vision", 1), now=3.0)  # treated as 10.0
    closed = j.poll(15.0)
    assert [u.unit.unit_id for u in closed] == ["u-1", "u-2"]
    assert [u.first_seen for u in closed] == [10.0, 10.0]


# -------------------------------------------------------------------------------------------- watermark
def test_watermark_closes_units_whose_event_time_lags_on_their_partition():
    j = UnitJoiner(JoinConfig(timeout_s=1_000.0, watermark_lag_s=30.0))
    j.add(reading("vision", "u-old", event_s=0.0), coord("vision", 0, partition=0), 0.0)
    j.add(reading("vision", "u-other-partition", event_s=0.0), coord("vision", 0, partition=1), 0.0)
    j.add(reading("vision", "u-edge", event_s=20.0), coord("vision", 1, partition=0), 0.0)
    assert j.poll(1.0) == []
    assert j.watermark(0) == T0 + timedelta(seconds=20.0 - 30.0) and j.watermark(7) is None
    j.add(reading("vibration", "u-new", event_s=50.0), coord("vibration", 0, partition=0), 2.0)
    closed = j.poll(3.0)
    assert [(u.unit.unit_id, u.closed_by) for u in closed] == [("u-old", "watermark")]
    assert closed[0].missing == ("vibration", "temperature") and not closed[0].complete
    # u-edge sits exactly on the watermark (50 - 30 = 20): not behind yet
    assert j.pending == 3 and j.poll(3.0) == []
    j.add(reading("temperature", "u-new", event_s=50.001), coord("temperature", 0, partition=0), 4.0)
    assert [u.unit.unit_id for u in j.poll(5.0)] == ["u-edge"]
    assert j.stats()["watermark_closed"] == 2


def test_a_unit_arriving_behind_the_watermark_is_closed_at_the_next_poll():
    j = UnitJoiner(JoinConfig(timeout_s=1_000.0, watermark_lag_s=10.0))
    j.add(reading("vision", "u-1", event_s=100.0), coord("vision", 0), 0.0)
    assert j.poll(1.0) == []
    j.add(reading("vision", "u-2", event_s=0.0), coord("vision", 1), 2.0)
    assert [(u.unit.unit_id, u.closed_by) for u in j.poll(3.0)] == [("u-2", "watermark")]


def test_timeout_takes_precedence_over_watermark():
    j = UnitJoiner(JoinConfig(timeout_s=5.0, watermark_lag_s=1.0))
    j.add(reading("vision", "u-1", event_s=0.0), coord("vision", 0), 0.0)
    j.add(reading("vision", "u-2", event_s=10.0), coord("vision", 1), 1.0)
    assert [(u.unit.unit_id, u.closed_by) for u in j.poll(5.5)] == [("u-1", "timeout")]


# --------------------------------------------------------------------------------------------- capacity
def test_capacity_closes_the_oldest_pending_unit_first():
    j = UnitJoiner(JoinConfig(max_pending=2, timeout_s=1_000.0))
    assert j.add(reading("vision", "u-1"), coord("vision", 0), 0.0) == []
    assert j.add(reading("vision", "u-2"), coord("vision", 1), 1.0) == []
    j.add(reading("vibration", "u-1"), coord("vibration", 0), 2.0)  # touching u-1 keeps its place
    evicted = only_joined(j.add(reading("vision", "u-3"), coord("vision", 2), 3.0))
    assert evicted.unit.unit_id == "u-1" and evicted.closed_by == "capacity"
    assert evicted.missing == ("temperature",) and j.pending == 2
    assert only_joined(j.add(reading("vision", "u-4"), coord("vision", 3), 4.0)).unit.unit_id == "u-2"
    assert j.stats()["capacity_closed"] == 2


def test_a_unit_completed_by_the_new_reading_does_not_evict_anyone():
    j = UnitJoiner(JoinConfig(max_pending=1, expected=("vision", "vibration"), timeout_s=100.0))
    j.add(reading("vibration", "u-1"), coord("vibration", 0), 0.0)
    out = j.add(reading("vision", "u-1"), coord("vision", 0), 1.0)
    assert only_joined(out).closed_by == "complete" and j.pending == 0
    single = UnitJoiner(JoinConfig(max_pending=1, expected=("vision",)))
    assert only_joined(single.add(reading("vision", "u-9"), coord("vision", 0), 0.0)).closed_by == "complete"


# ------------------------------------------------------------------------------------ late and duplicates
def test_a_reading_for_a_decided_unit_is_late():
    j = UnitJoiner(JoinConfig(timeout_s=1.0))
    j.add(reading("vision"), coord("vision", 0), 0.0)
    assert only_joined(j.poll(1.0)).closed_by == "timeout"
    out = j.add(reading("vibration"), coord("vibration", 8), 2.0)
    assert out == [LateReading(reading("vibration"), coord("vibration", 8), "u-1", "late")]
    assert j.pending == 0 and j.held_offsets() == {} and j.stats()["late"] == 1


def test_late_memory_is_a_bounded_lru():
    j = UnitJoiner(JoinConfig(expected=("vision",), late_memory=2))
    for i, uid in enumerate(["u-1", "u-2"]):
        j.add(reading("vision", uid), coord("vision", i), 0.0)
    # a late hit on u-1 refreshes it, so deciding u-3 forgets u-2
    assert isinstance(j.add(reading("vision", "u-1", copy=1), coord("vision", 2), 0.0)[0], LateReading)
    j.add(reading("vision", "u-3"), coord("vision", 3), 0.0)
    assert isinstance(j.add(reading("vision", "u-1", copy=2), coord("vision", 4), 0.0)[0], LateReading)
    again = only_joined(j.add(reading("vision", "u-2", copy=1), coord("vision", 5), 0.0))
    assert again.unit.unit_id == "u-2" and again.inputs["vision"] == coord("vision", 5)


def test_the_first_reading_of_a_modality_wins_and_later_ones_are_counted():
    j = UnitJoiner(JoinConfig())
    j.add(reading("vision", copy=0), coord("vision", 1), 0.0)
    assert j.add(reading("vision", copy=1), coord("vision", 2), 0.5) == []
    assert j.add(reading("vision", copy=2), coord("vision", 3), 0.6) == []
    j.add(reading("vibration"), coord("vibration", 1), 1.0)
    joined = only_joined(j.add(reading("temperature"), coord("temperature", 1), 2.0))
    assert joined.duplicates == 2 and j.stats()["duplicates"] == 2
    assert joined.unit.vision is reading("vision", copy=0) and joined.inputs["vision"] == coord("vision", 1)


def test_unit_id_is_the_key_and_another_line_is_rejected():
    j = UnitJoiner(JoinConfig())
    j.add(reading("vision", line_id="line-1"), coord("vision", 0), 0.0)
    out = j.add(reading("vibration", line_id="line-2"), coord("vibration", 0), 1.0)
    assert out == [LateReading(reading("vibration", line_id="line-2"), coord("vibration", 0), "u-1", "line_mismatch")]
    assert j.stats()["line_mismatches"] == 1 and j.held_offsets() == {("inspection.vision", 0): 0}
    joined = only_joined(j.flush())
    assert joined.unit.line_id == "line-1" and joined.unit.present == ("vision",)


# ------------------------------------------------------------------------------------ flush and offsets
def test_flush_closes_everything_in_arrival_order():
    j = UnitJoiner(JoinConfig())
    for i, uid in enumerate(["u-3", "u-1", "u-2"]):
        j.add(reading(MODALITIES[i], uid), coord(MODALITIES[i], i), float(i))
    flushed = j.flush()
    assert [u.unit.unit_id for u in flushed] == ["u-3", "u-1", "u-2"]
    assert all(u.closed_by == "flush" and not u.complete for u in flushed)
    assert [u.missing for u in flushed] == [("vibration", "temperature"), ("vision", "temperature"),
                                            ("vision", "vibration")]
    assert j.pending == 0 and j.flush() == [] and j.stats()["flushed"] == 3


def test_held_offsets_are_the_smallest_pending_offset_per_partition():
    j = UnitJoiner(JoinConfig(timeout_s=10.0))
    j.add(reading("vision", "u-1"), coord("vision", 5, partition=0), 0.0)
    j.add(reading("vision", "u-2"), coord("vision", 6, partition=0), 1.0)
    j.add(reading("vibration", "u-2"), coord("vibration", 40, partition=0), 1.0)
    j.add(reading("vision", "u-3"), coord("vision", 2, partition=1), 2.0)
    assert j.held_offsets() == {("inspection.vision", 0): 5, ("inspection.vibration", 0): 40,
                                ("inspection.vision", 1): 2}
    assert j.oldest_pending_coordinates() == j.held_offsets()
    assert only_joined(j.poll(10.0)).unit.unit_id == "u-1"
    assert j.held_offsets() == {("inspection.vision", 0): 6, ("inspection.vibration", 0): 40,
                                ("inspection.vision", 1): 2}
    j.add(reading("temperature", "u-2"), coord("temperature", 9, partition=0), 11.0)  # completes u-2
    assert j.held_offsets() == {("inspection.vision", 1): 2}
    j.flush()
    assert j.held_offsets() == {}


# ------------------------------------------------------------------------------- conservation property
UNITS = [f"u-{i}" for i in range(6)]

step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(UNITS), st.sampled_from(MODALITIES),
              st.integers(0, 60), st.floats(0.0, 3.0)),
    st.tuples(st.just("poll"), st.floats(0.0, 3.0)),
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(step, max_size=60),
    max_pending=st.integers(1, 4),
    late_memory=st.integers(1, 8),
    expected=st.sampled_from([MODALITIES, ("vision", "vibration"), ("temperature",)]),
)
def test_every_reading_is_joined_once_counted_as_duplicate_or_late(steps, max_pending, late_memory, expected):
    j = UnitJoiner(JoinConfig(expected=expected, timeout_s=5.0, watermark_lag_s=20.0,
                              max_pending=max_pending, late_memory=late_memory))
    now = 0.0
    offsets: dict[tuple[str, int], int] = {}
    added: dict[InputCoordinate, object] = {}
    outstanding: set[InputCoordinate] = set()  # kept by a pending unit
    joined: list[JoinedUnit] = []
    late: list[LateReading] = []
    duplicates = 0

    def take(out):
        for item in out:
            if isinstance(item, JoinedUnit):
                joined.append(item)
                outstanding.difference_update(item.inputs.values())
            else:
                late.append(item)

    for s in steps:
        if s[0] == "add":
            _, uid, m, event_s, dt = s
            now += dt
            partition = int(uid[-1]) % 2
            key = (TOPICS[m], partition)
            offsets[key] = offsets.get(key, -1) + 1
            c = InputCoordinate(TOPICS[m], partition, offsets[key])
            r = reading(m, uid, event_s=float(event_s), copy=offsets[key])
            added[c] = r
            before = j.duplicates
            out = j.add(r, c, now)
            if j.duplicates > before:
                assert out == [] or all(isinstance(x, JoinedUnit) for x in out)
                duplicates += 1
            elif not any(isinstance(x, LateReading) for x in out):
                outstanding.add(c)
            take(out)
        else:
            now += s[1]
            take(j.poll(now))
        assert j.pending <= max_pending
        expected_held: dict[tuple[str, int], int] = {}
        for c in outstanding:
            k = (c.topic, c.partition)
            expected_held[k] = min(c.offset, expected_held.get(k, c.offset))
        assert j.held_offsets() == expected_held

    take(j.flush())
    assert j.pending == 0 and not outstanding and j.held_offsets() == {}

    used = [c for u in joined for c in u.inputs.values()]
    late_coords = [x.coordinate for x in late]
    assert len(used) == len(set(used)), "a reading was emitted twice"
    assert not set(used) & set(late_coords)
    assert len(used) + len(late_coords) + duplicates == len(added), "a reading was lost"
    assert sum(u.duplicates for u in joined) == j.duplicates == duplicates

    for u in joined:
        assert u.closed_by in CLOSE_REASONS
        assert u.complete == (u.closed_by == "complete") == (not u.missing)
        assert u.missing == tuple(m for m in expected if m not in u.inputs)
        for m, c in u.inputs.items():
            assert getattr(u.unit, m) is added[c] and added[c].unit_id == u.unit.unit_id
    for x in late:
        assert x.reason == "late" and x.reading is added[x.coordinate]

    stats = j.stats()
    assert stats["late"] == len(late)
    closes = {r: sum(u.closed_by == r for u in joined) for r in CLOSE_REASONS}
    assert (stats["completed"], stats["timed_out"], stats["watermark_closed"], stats["capacity_closed"],
            stats["flushed"]) == tuple(closes[r] for r in CLOSE_REASONS)
