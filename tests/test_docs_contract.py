"""docs/wire-contract.md and docs/troubleshooting.md stay true to the codec, the decision record and the DLQ.

Every header the codec requires, every reason code a dead letter can carry, every ``dlq_*`` header the service
writes and every field of a decision is named on the pages; the decision shown on the page is a valid decision
whose id is the one its unit, model version and inputs give; and the partitioner advice holds on a real broker:
confluent-kafka with ``murmur2_random`` puts a key on the partition kafka-python (``inspection produce``) does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from inspection import codec
from inspection.errors import Reason
from inspection.records import PHYSICAL_UNITS, Decision, InputCoordinate
from services import dlq

ROOT = Path(__file__).resolve().parents[1]
WIRE = (ROOT / "docs" / "wire-contract.md").read_text(encoding="utf-8")
TROUBLE = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_header_content_type_and_unit_of_the_codec_is_on_the_wire_page():
    table = _section(WIRE, "Headers of a reading")
    for header in (*codec._REQUIRED, *codec._REQUIRED_ARRAY):
        assert f"| `{header}` |" in table, header
    for ce_type in codec.CE_TYPES.values():
        assert f"`{ce_type}`" in table
    for content_type in ("image/png", "image/jpeg", codec.ARRAY_CONTENT_TYPE):
        assert f"`{content_type}`" in table
    for units in PHYSICAL_UNITS.values():
        for unit in units:
            assert f"`{unit}`" in table


def test_the_limits_on_the_wire_page_are_the_codec_defaults():
    limits = codec.CodecLimits()
    payloads = _section(WIRE, "Payloads") + _section(WIRE, "Topics and keys")
    assert f"`limits.max_payload_bytes` ({limits.max_payload_bytes // 2**20} MiB" in payloads
    assert f"`limits.max_pixels` ({limits.max_pixels // 1_000_000} M)" in payloads
    assert f"`limits.max_channels` ({limits.max_channels})" in payloads
    assert f"`limits.max_values` ({limits.max_values // 1_000_000} M)" in payloads


def test_every_reason_code_is_explained_on_the_troubleshooting_page():
    reasons = _section(TROUBLE, "Dead-letter reasons")
    for code in [r.value for r in Reason] + list(dlq.SERVICE_REASONS):
        assert f"`{code}`" in reasons, f"reason {code} is not on docs/troubleshooting.md"
    for stage in dlq.STAGES:
        assert f"| `{stage}` |" in reasons, stage


def test_every_dlq_header_the_service_writes_is_on_the_wire_page():
    letter = dlq.dead_letter(key=b"u1", value=b"x", headers=[("ce_id", b"r1")], coordinate=InputCoordinate("t", 0, 5),
                             stage="deserialize", reason="missing_header", detail="d", timestamp_ms=1)
    marker = dlq.batch_marker(topic="t", partition=0, first_offset=3, last_offset=9, codec="zstd", detail="d")
    names = {name for name, _ in letter.headers + marker.headers if name.startswith("dlq_")}
    assert {"dlq_stage", "dlq_reason", "dlq_last_offset", "dlq_codec"} <= names
    section = _section(WIRE, "The dead-letter message")
    for name in sorted(names):
        assert f"`{name}`" in section, name


def test_the_decision_on_the_wire_page_is_a_valid_decision_with_its_real_id():
    example = json.loads(re.search(r"```json\n(.*?)```", _section(WIRE, "The decision message"), re.S).group(1))
    example["data"]["routing"] = None  # the page shortens the routing lists
    decision = Decision.from_json(json.dumps(example).encode())  # checks every field and recomputes the id
    assert decision.id == example["id"]
    table = _section(WIRE, "The decision message")
    for key in decision.to_cloudevent()["data"]:
        assert f"`data.{key}`" in table or f"`data.{key}`," in table, f"data.{key} is not explained"
    from services.serve import DECISION_CONTENT_TYPE

    assert DECISION_CONTENT_TYPE.decode() in " ".join(table.split())


@pytest.mark.slow
def test_murmur2_random_puts_keys_where_kafka_python_does(broker, topics):
    confluent_kafka = pytest.importorskip("confluent_kafka", reason="the dev set-up installs confluent-kafka")
    from services.clients import make_producer

    keys = [f"unit-{i:04d}" for i in range(24)]
    python_producer = make_producer(broker.bootstrap)
    try:
        futures = [python_producer.send(topics.vision, key=k.encode(), value=b"x") for k in keys]
        python_producer.flush(30)
        by_kafka_python = {k: f.get(30).partition for k, f in zip(keys, futures, strict=True)}
    finally:
        python_producer.close(timeout=10)

    def librdkafka_partitions(partitioner: str) -> dict[str, int]:
        got: dict[str, int] = {}
        producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "partitioner": partitioner})
        for k in keys:
            producer.produce(topics.vibration, key=k, value=b"x",
                             on_delivery=lambda err, msg: got.__setitem__(msg.key().decode(), msg.partition()))
        assert producer.flush(30) == 0
        return got

    assert librdkafka_partitions("murmur2_random") == by_kafka_python
    assert librdkafka_partitions("consistent_random") != by_kafka_python  # librdkafka's default hash differs
