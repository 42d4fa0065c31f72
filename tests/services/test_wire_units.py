"""Real composite units through a real broker: 1,000 units out and back identical, co-partitioned, split by a group."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from inspection.data import skab
from inspection.data.composite import CompositeBuilder, CompositeConfig
from inspection.errors import DataError
from inspection.records import MODALITIES
from services.clients import make_consumer, make_producer, wait_for_assignment, wait_for_group
from services.publish import FaultPlan, publish_units
from services.readback import assemble_units, decode_record, drain

pytestmark = [pytest.mark.slow, pytest.mark.data]

N_UNITS = 1000


@pytest.fixture(scope="module")
def units():
    try:
        skab.skab_root()
        source = "auto"
    except DataError:
        source = "synthetic"
    return CompositeBuilder(CompositeConfig(seed=3, temperature_source=source)).units("test", N_UNITS)


def test_thousand_units_round_trip_identical(broker, topics, group_id, units):
    consumer = make_consumer(topics.inputs, broker.bootstrap, group_id)
    try:
        assert len(wait_for_assignment(consumer, timeout_s=60)) == 9
        producer = make_producer(broker.bootstrap)
        try:
            report = publish_units(producer, units, topics)
        finally:
            producer.close(timeout=10)
        assert report.messages == 3 * N_UNITS
        received = [decode_record(r, topics) for r in drain(consumer, max_messages=3 * N_UNITS, idle_timeout_s=20)]
    finally:
        consumer.close(autocommit=False)

    assert not [r.error for r in received if r.error is not None]
    assert Counter(r.coordinate.topic for r in received) == {t: N_UNITS for t in topics.inputs}
    assert len({r.coordinate for r in received}) == 3 * N_UNITS  # no duplicates
    back = assemble_units(received)
    assert set(back) == {u.unit_id for u in units}
    for u in units:
        assert back[u.unit_id].readings == u.readings, u.unit_id  # bytes of images and arrays identical
    # key = unit_id puts every reading of a unit on the same partition number of each topic
    for u in units:
        parts = {report.coordinates[(u.unit_id, m)].partition for m in MODALITIES}
        assert len(parts) == 1, u.unit_id
    by_coordinate = {r.coordinate: r.reading for r in received}
    for (unit_id, _), coord in list(report.coordinates.items())[:50]:
        assert by_coordinate[coord].unit_id == unit_id


def test_group_of_two_splits_partitions_and_keeps_units_whole(broker, topics, units):
    group = f"g-{uuid.uuid4().hex}"
    a = make_consumer(topics.inputs, broker.bootstrap, group)
    b = make_consumer(topics.inputs, broker.bootstrap, group)
    subset = units[:300]
    try:
        # both members keep polling, each from its own thread, while the group forms (see wait_for_group)
        pa, pb = wait_for_group([a, b], lambda s: all(s) and not s[0] & s[1] and len(s[0] | s[1]) == 9, 90)
        # the range assignor gives the same partition number of all three topics to the same member
        assert {tp.partition for tp in pa}.isdisjoint({tp.partition for tp in pb})
        for tp in pa | pb:  # start both from the beginning regardless of how the join went
            (a if tp in pa else b).seek(tp, 0)
        producer = make_producer(broker.bootstrap)
        try:
            publish_units(producer, subset, topics, faults=FaultPlan())
        finally:
            producer.close(timeout=10)
        got_a, got_b = [], []
        for _ in range(600):
            for consumer, sink in ((a, got_a), (b, got_b)):
                for records in consumer.poll(timeout_ms=50).values():
                    sink.extend(decode_record(r, topics) for r in records)
            if len(got_a) + len(got_b) >= 900:
                break
    finally:
        a.close(autocommit=False)
        b.close(autocommit=False)
    assert len(got_a) + len(got_b) == 900
    assert got_a and got_b
    units_a = {r.reading.unit_id for r in got_a}
    units_b = {r.reading.unit_id for r in got_b}
    assert not units_a & units_b  # a unit's three readings all went to one member
    whole_a, whole_b = assemble_units(got_a), assemble_units(got_b)
    assert all(len(u.present) == 3 for u in (*whole_a.values(), *whole_b.values()))
    assert len(whole_a) + len(whole_b) == 300
