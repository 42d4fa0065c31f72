"""Read input topics back: drain a consumer and decode its records into readings (or reasoned rejections).

Used by ``inspection consume``, the demo and the integration tests; the stream service has its own pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from inspection.codec import CodecLimits, decode_reading
from inspection.errors import BrokerError, RecordError
from inspection.records import InputCoordinate, Reading, Unit
from services.broker import TopicNames


@dataclass(frozen=True)
class Received:
    """One consumed input record: where it was, and what it decoded to (a reading or the rejection)."""

    coordinate: InputCoordinate
    key: bytes | None
    reading: Reading | None
    error: RecordError | None


def drain(consumer, *, max_messages: int | None = None, idle_timeout_s: float = 5.0, deadline_s: float | None = None):
    """Yield consumer records until ``max_messages`` arrived, or none arrived for ``idle_timeout_s``.

    Raises:
        BrokerError: polling failed.
    """
    from kafka.errors import KafkaError

    seen = 0
    last = time.monotonic()
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s
    while max_messages is None or seen < max_messages:
        try:
            batch = consumer.poll(timeout_ms=200)
        except KafkaError as exc:
            raise BrokerError(f"polling failed after {seen} records: {exc}") from exc
        got = False
        for records in batch.values():
            for rec in records:
                got = True
                seen += 1
                yield rec
        now = time.monotonic()
        if got:
            last = now
        elif now - last >= idle_timeout_s:
            return
        if stop_at is not None and now >= stop_at:
            return


def decode_record(record, topics: TopicNames, limits: CodecLimits | None = None) -> Received:
    """Decode one input-topic record; validation failures are returned, not raised."""
    coord = InputCoordinate(record.topic, record.partition, record.offset)
    modality = topics.modality_of(record.topic)
    try:
        reading = decode_reading(record.value, record.headers, key=record.key, expected_modality=modality,
                                 limits=limits)
        return Received(coord, record.key, reading, None)
    except RecordError as exc:
        return Received(coord, record.key, None, exc)


def assemble_units(received: Iterator[Received] | list[Received]) -> dict[str, Unit]:
    """Group decoded readings by unit id into units (labels are not on the wire, so units come back unlabelled)."""
    parts: dict[str, dict[str, Reading]] = {}
    for item in received:
        if item.reading is not None:
            parts.setdefault(item.reading.unit_id, {})[item.reading.modality] = item.reading
    out = {}
    for unit_id, readings in parts.items():
        line_id = next(iter(readings.values())).line_id
        out[unit_id] = Unit(unit_id, line_id, **readings)
    return out
