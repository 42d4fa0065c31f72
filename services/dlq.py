"""Dead letters: what the service could not use, with its original bytes, headers, stage and reason.

A dead letter on ``inspection.dlq`` is the rejected record's key and value, unchanged, with its original
headers, unchanged and in order, followed by these headers (UTF-8):

==================  =================================================================================
``dlq_stage``       where it failed: ``fetch`` (the Kafka client could not decode a record batch: see
                    below), ``deserialize`` (the wire codec), ``validate`` (decoded, but its event time is
                    outside the service's bounds), ``join`` (late, wrong line, a modality the model does
                    not read) or ``score`` (preprocessing/model)
``dlq_reason``      a stable reason code: a :class:`~inspection.errors.Reason` value for ``deserialize``
                    and ``validate``, or one of :data:`SERVICE_REASONS`
``dlq_detail``      human-readable explanation (at most :data:`MAX_DETAIL_CHARS` characters)
``dlq_topic``       the topic it was read from
``dlq_partition``   its partition (decimal)
``dlq_offset``      its offset (decimal); for a ``fetch`` marker, the batch's first offset
``dlq_last_offset`` ``fetch`` markers only: the batch's last offset (decimal)
``dlq_codec``       ``fetch`` markers only: the batch's compression codec (``none``, ``gzip``, ``snappy``,
                    ``lz4``, ``zstd`` or ``unknown``)
``dlq_timestamp``   its Kafka timestamp in ms (decimal), when it had one
``dlq_at``          when it was dead-lettered, RFC 3339
``dlq_null_headers`` only when some original header had a null value (the protocol allows it; the
                    client library cannot write one back): their names, comma-separated, in order; each
                    is written with an empty value
``dlq_null_value`` ``true`` only when the original record had neither a key nor a value (Kafka clients cannot
                    write such a record): it is written with an empty value
``dlq_reencoded``   ``true`` only when the original record was no longer held and the reading was written
                    back through the codec (same value bytes, canonical CloudEvents headers): ``score`` stage
==================  =================================================================================

Key = the original key, so a dead letter lands beside its unit's other records when the DLQ is
co-partitioned.

A record batch the Kafka client cannot decode (its payload is corrupt, or it was compressed with a codec the
client lacks) has no records to forward: its dead letter is a *marker* without a key whose value is a JSON object
(``topic``, ``partition``, ``first_offset``, ``last_offset``, ``codec``, ``error``), stage ``fetch``, reason
``undecodable_batch``, and the offsets it covered (``dlq_offset`` .. ``dlq_last_offset``); the original bytes
stay in the input topic for as long as its retention keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from inspection.codec import encode_reading
from inspection.records import InputCoordinate, Reading, format_time

STAGES: tuple[str, ...] = ("fetch", "deserialize", "validate", "join", "score")
#: The Kafka client could not decode a fetched record batch; the service skipped it (a ``fetch`` marker).
UNDECODABLE_BATCH = "undecodable_batch"
#: The codec failed in a way it has no reason code for (never expected; kept so no input can stop the service).
DECODE_FAILED = "decode_failed"
#: A reading arrived after its unit was decided.
LATE = "late"
#: A reading named a unit that is pending under another line id.
LINE_MISMATCH = "line_mismatch"
#: A reading of a modality the model in use does not read.
MODALITY_NOT_SCORED = "modality_not_scored"
#: The model's preprocessing rejected a unit's reading.
PREPROCESS_FAILED = "preprocess_failed"
#: The model failed on a unit scored on its own.
SCORE_FAILED = "score_failed"
#: Reason codes the service adds to the codec's :class:`~inspection.errors.Reason` values.
SERVICE_REASONS: tuple[str, ...] = (UNDECODABLE_BATCH, DECODE_FAILED, LATE, LINE_MISMATCH, MODALITY_NOT_SCORED, PREPROCESS_FAILED, SCORE_FAILED)
MAX_DETAIL_CHARS = 1000

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True)
class DeadLetter:
    """A record ready to be written to the DLQ."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    coordinate: InputCoordinate
    stage: str
    reason: str
    detail: str


def dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Headers | None,
    coordinate: InputCoordinate,
    stage: str,
    reason: str,
    detail: str,
    timestamp_ms: int | None = None,
    reencoded: bool = False,
) -> DeadLetter:
    """Build the dead letter of one input record (original key, value and headers plus the ``dlq_*`` ones).

    Raises:
        ValueError: an unknown stage or an empty reason.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    if not reason:
        raise ValueError("a dead letter needs a reason code")
    detail = detail[:MAX_DETAIL_CHARS]
    extra = [
        ("dlq_stage", stage),
        ("dlq_reason", reason),
        ("dlq_detail", detail),
        ("dlq_topic", coordinate.topic),
        ("dlq_partition", str(coordinate.partition)),
        ("dlq_offset", str(coordinate.offset)),
    ]
    if timestamp_ms is not None and timestamp_ms >= 0:
        extra.append(("dlq_timestamp", str(int(timestamp_ms))))
    extra.append(("dlq_at", format_time(datetime.now(UTC))))
    original = list(headers or ())
    nulls = [k for k, v in original if v is None]
    if nulls:
        extra.append(("dlq_null_headers", ",".join(nulls)))
    if key is None and value is None:
        value = b""
        extra.append(("dlq_null_value", "true"))
    if reencoded:
        extra.append(("dlq_reencoded", "true"))
    out: list[tuple[str, bytes | None]] = [(k, b"" if v is None else bytes(v)) for k, v in original]
    out += [(k, v.encode("utf-8")) for k, v in extra]
    return DeadLetter(key, value, out, coordinate, stage, reason, detail)


def batch_marker(*, topic: str, partition: int, first_offset: int, last_offset: int, codec: str,
                 detail: str) -> DeadLetter:
    """The dead letter of a record batch that could not be decoded: no key, a JSON value naming the offsets it
    covered, its codec and the error (see the module docstring).

    Raises:
        ValueError: ``last_offset`` before ``first_offset``.
    """
    if last_offset < first_offset:
        raise ValueError(f"last_offset ({last_offset}) must be >= first_offset ({first_offset})")
    value = json.dumps({"topic": topic, "partition": partition, "first_offset": first_offset,
                        "last_offset": last_offset, "codec": codec, "error": detail}).encode()
    letter = dead_letter(key=None, value=value, headers=(), coordinate=InputCoordinate(topic, partition, first_offset),
                         stage="fetch", reason=UNDECODABLE_BATCH, detail=detail)
    letter.headers.extend([("dlq_last_offset", str(last_offset).encode()), ("dlq_codec", codec.encode())])
    return letter


def dead_letter_reading(reading: Reading, coordinate: InputCoordinate, *, stage: str, reason: str,
                        detail: str) -> DeadLetter:
    """The dead letter of a decoded reading whose raw record is no longer held (written back by the codec)."""
    msg = encode_reading(reading)
    return dead_letter(key=msg.key, value=msg.value, headers=msg.headers, coordinate=coordinate, stage=stage,
                       reason=reason, detail=detail, timestamp_ms=msg.timestamp_ms, reencoded=True)
