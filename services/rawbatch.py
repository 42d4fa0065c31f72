"""Write record batches to Kafka the way any client may: any codec, null header values, or a corrupt payload.

The project's own producer (kafka-python) cannot write some things other clients do write: a header without a
value (librdkafka and the Java client send them), or a batch compressed with a codec chosen per batch. And no
healthy client writes a corrupt batch, yet a bit flip in a compressed payload whose checksum was recomputed, or
a codec the consumer cannot decode, is what a service must survive. :func:`produce_batch` builds a record batch
(message format v2) with kafka-python's batch builder, optionally corrupts its compressed payload, and writes it
with a hand-built ProduceRequest (v3, ``acks=all``) over a plain socket: fault injection for the tests, the
chaos run (``bench/chaos.py``) and demos. Not a production producer: no retries, no idempotence, one batch per
connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from inspection.errors import BrokerError, ConfigError

#: Kafka's compression codecs (the low three bits of a record batch's attributes).
CODECS: dict[str, int] = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
#: Bytes of a v2 record batch header; the (compressed) records follow.
BATCH_HEADER_BYTES = 61
#: Where the CRC-32C of a v2 batch sits, and where the bytes it covers start.
_CRC_AT, _CRC_FROM = 17, 21


@dataclass(frozen=True)
class RawMessage:
    """One record of a raw batch: key, value and headers as they go on the wire (a header value may be None)."""

    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp_ms: int = 0


def partition_for(key: bytes, partitions: int) -> int:
    """The partition kafka-python's and the Java client's default partitioner pick for ``key`` (murmur2)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def build_batch(messages: Sequence[RawMessage], codec: str = "none", *, corrupt: bool = False) -> bytes:
    """One v2 record batch holding ``messages``, compressed with ``codec``.

    Args:
        messages: the records, in offset order (at least one).
        codec: one of :data:`CODECS`.
        corrupt: overwrite the middle of the (compressed) records section with garbage and recompute the
            batch CRC, so the broker and the consumer's checksum accept it and only decoding fails.

    Raises:
        ConfigError: an unknown codec or no messages.
    """
    if codec not in CODECS:
        raise ConfigError(f"codec must be one of {list(CODECS)}; got {codec!r}")
    if not messages:
        raise ConfigError("a batch needs at least one message")
    from kafka.record.default_records import DefaultRecordBatchBuilder
    from kafka.record.util import calc_crc32c

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=CODECS[codec], is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    for delta, msg in enumerate(messages):
        if builder.append(delta, msg.timestamp_ms, msg.key, msg.value, list(msg.headers)) is None:
            raise ConfigError(f"message {delta} does not fit in one batch")
    batch = bytearray(builder.build())
    if corrupt:
        body = len(batch) - BATCH_HEADER_BYTES
        start = BATCH_HEADER_BYTES + body // 4
        for i in range(start, min(len(batch), start + max(8, body // 2))):
            batch[i] ^= 0xA5
        struct.pack_into(">I", batch, _CRC_AT, calc_crc32c(bytes(batch[_CRC_FROM:])))
    return bytes(batch)


def produce_batch(bootstrap: str, topic: str, partition: int, messages: Sequence[RawMessage], codec: str = "none",
                  *, corrupt: bool = False, timeout_s: float = 10.0) -> int:
    """Write one batch to ``topic[partition]`` and return the offset of its first record.

    Args:
        bootstrap: ``host:port`` of the partition's leader (the embedded broker is the leader of everything).
        topic: the topic.
        partition: the partition (see :func:`partition_for` for the one a key maps to).
        messages: the records.
        codec: one of :data:`CODECS`.
        corrupt: see :func:`build_batch`.
        timeout_s: socket and broker timeout.

    Raises:
        ConfigError: see :func:`build_batch`.
        BrokerError: the broker could not be reached or answered with an error code.
    """
    batch = build_batch(messages, codec, corrupt=corrupt)

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack(">h", len(raw)) + raw

    body = (struct.pack(">hhi", 0, 3, 1) + string("raw-producer")  # header: Produce v3, correlation id 1
            + struct.pack(">hhi", -1, -1, int(timeout_s * 1000))  # no transactional id, acks=all, timeout
            + struct.pack(">i", 1) + string(topic) + struct.pack(">i", 1) + struct.pack(">i", partition)
            + struct.pack(">i", len(batch)) + batch)
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _read(sock, 4))
            reply = _read(sock, size)
    except OSError as exc:
        raise BrokerError(f"raw produce to {topic}[{partition}] at {bootstrap} failed: {exc}") from exc
    pos = 4 + 4  # correlation id, topic count
    (name_len,) = struct.unpack_from(">h", reply, pos)
    pos += 2 + name_len + 4  # topic name, partition count
    got_partition, error, offset = struct.unpack_from(">ihq", reply, pos)
    if error != 0 or got_partition != partition:
        raise BrokerError(f"raw produce to {topic}[{partition}] failed with error code {error}")
    return offset


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the broker closed the connection")
        data += chunk
    return data
