"""Input that used to wedge or poison the service, against the real broker: batches compressed with every
Kafka codec, an undecodable batch, event times far in the future or past, a reading without a key, and two
readings of one modality for one unit."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from inspection.codec import encode_reading
from inspection.records import MODALITIES
from services.rawbatch import CODECS, RawMessage, build_batch, partition_for, produce_batch

pytestmark = [pytest.mark.slow]

PARTITIONS = 3


def restamped(unit, when: datetime):
    """The unit with every reading's event time set to ``when`` (plus a few ms per modality)."""
    readings = {m: dataclasses.replace(getattr(unit, m), event_time=when + timedelta(milliseconds=10 * i))
                for i, m in enumerate(MODALITIES) if getattr(unit, m) is not None}
    return dataclasses.replace(unit, **readings)


def raw(reading, *, key: bytes | None | str = "subject") -> RawMessage:
    msg = encode_reading(reading)
    return RawMessage(msg.key if key == "subject" else key, msg.value, list(msg.headers), msg.timestamp_ms)


def write(bootstrap: str, topics, modality: str, readings, codec: str = "none", **kw) -> tuple[int, int]:
    """Write the readings (all of one partition) as one batch; returns (partition, first offset)."""
    partition = partition_for(readings[0].unit_id.encode(), PARTITIONS)
    assert all(partition_for(r.unit_id.encode(), PARTITIONS) == partition for r in readings)
    messages = [raw(r) for r in readings]
    return partition, produce_batch(bootstrap, topics.for_modality(modality), partition, messages, codec, **kw)


def by_partition(units) -> dict[int, list]:
    out: dict[int, list] = {}
    for u in units:
        out.setdefault(partition_for(u.unit_id.encode(), PARTITIONS), []).append(u)
    return out


# --------------------------------------------------------------------------------------------- the batches
@pytest.mark.parametrize("codec", list(CODECS))
def test_batch_builder_writes_the_codec_and_corrupts_only_the_payload(codec):
    from kafka.record.default_records import DefaultRecordBatch

    messages = [RawMessage(f"u{i}".encode(), bytes(2000), [("h", b"x")], 1_000 + i) for i in range(5)]
    good = DefaultRecordBatch(build_batch(messages, codec))
    assert good.compression_type == CODECS[codec] and good.validate_crc()
    assert [(r.offset, r.key, r.value, r.timestamp) for r in good] == [
        (i, f"u{i}".encode(), bytes(2000), 1_000 + i) for i in range(5)]
    if codec != "none":
        assert len(build_batch(messages, codec)) < len(build_batch(messages, "none")) // 3  # really compressed
    bad = DefaultRecordBatch(build_batch(messages, codec, corrupt=True))
    assert bad.validate_crc() and (bad.base_offset, bad.next_offset) == (0, 5)  # header intact, checksum valid
    try:
        values = [r.value for r in bad]
    except Exception:  # noqa: BLE001 - each codec's library raises its own error type
        values = None
    assert values != [bytes(2000)] * 5


# ---------------------------------------------------------------------------------------------- codecs
def test_batches_compressed_with_every_codec_are_decided(broker, topics, unit_factory, service_config, run_service,
                                                          read_topic, parse_decisions, metric_value):
    rng = np.random.default_rng(3)
    units = [unit_factory(i, rng) for i in range(30)]
    # per partition and modality one batch, its codec cycling so that each modality meets zstd and lz4
    plan = {"vision": ("zstd", "lz4", "snappy"), "vibration": ("lz4", "zstd", "gzip"),
            "temperature": ("snappy", "gzip", "zstd")}
    # the service's own producer compresses too (docs/service.example.yaml's example setting)
    config = service_config(kafka={"producer": {"compression_type": "zstd"}})
    with run_service(config, broker.bootstrap) as service:
        for p, group in sorted(by_partition(units).items()):
            for modality in MODALITIES:
                write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in group], plan[modality][p])
        decisions = parse_decisions(read_topic(topics.decisions, len(units)))
        assert metric_value(service, "inspection_undecodable_batches_total") == 0
    assert sorted(d.unit_id for d in decisions) == sorted(u.unit_id for u in units)
    assert all(d.missing == () for d in decisions)


# ------------------------------------------------------------------------------------ undecodable batches
def test_undecodable_batch_is_dead_lettered_as_a_marker_and_the_partition_goes_on(
        broker, topics, unit_factory, service_config, run_service, read_topic, parse_decisions, dlq_headers,
        metric_value):
    rng = np.random.default_rng(4)
    units = [unit_factory(i, rng) for i in range(60)]
    p, group = max(by_partition(units).items(), key=lambda kv: len(kv[1]))
    before, victims, after = group[:4], group[4:8], group[8:]
    others = [u for u in units if u not in group]
    config = service_config(join={"timeout_s": 2.0})
    with run_service(config, broker.bootstrap) as service:
        for modality in MODALITIES:
            write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in before], "zstd")
        for modality in ("vision", "temperature"):
            write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in victims], "lz4")
        _, first = write(broker.bootstrap, topics, "vibration", [u.vibration for u in victims], "zstd",
                         corrupt=True)
        for modality in MODALITIES:
            write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in after], "gzip")
        for _, rest in by_partition(others).items():
            for modality in MODALITIES:
                write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in rest], "snappy")
        dead = read_topic(topics.dlq, 1)
        decisions = parse_decisions(read_topic(topics.decisions, len(units)))
        assert metric_value(service, "inspection_undecodable_batches_total") == 1
        assert metric_value(service, "inspection_dlq_total", stage="fetch", reason="undecodable_batch") == 1
        assert service.stats.poll_errors == 0
    assert len(dead) == 1
    h = dlq_headers(dead[0])
    assert dead[0].key is None
    assert json.loads(dead[0].value) == {"topic": topics.vibration, "partition": p, "first_offset": first,
                                         "last_offset": first + len(victims) - 1, "codec": "zstd",
                                         "error": h["dlq_detail"]}
    assert (h["dlq_stage"], h["dlq_reason"], h["dlq_codec"]) == ("fetch", "undecodable_batch", "zstd")
    assert (h["dlq_topic"], int(h["dlq_partition"])) == (topics.vibration, p)
    assert (int(h["dlq_offset"]), int(h["dlq_last_offset"])) == (first, first + len(victims) - 1)
    by_unit = {d.unit_id: d for d in decisions}
    assert set(by_unit) == {u.unit_id for u in units}  # nothing lost, before or after the bad batch
    assert all(by_unit[u.unit_id].missing == ("vibration",) for u in victims)
    assert all(by_unit[u.unit_id].missing == () for u in before + after + others)


def test_undecodable_batch_does_not_wedge_the_process_and_sigterm_stops_it(
        broker, topics, unit_factory, service_config, read_topic, parse_decisions, serve_process, tmp_path):
    path = tmp_path / "service.json"
    path.write_text(json.dumps(service_config(join={"timeout_s": 2.0}).resolved()))
    rng = np.random.default_rng(5)
    units = [unit_factory(i, rng) for i in range(12)]
    service = serve_process(path, broker.bootstrap, tmp_path / "service.log")
    proc = service.start()
    service.wait_ready()
    for p, group in by_partition(units).items():
        for modality in MODALITIES:
            write(broker.bootstrap, topics, modality, [getattr(u, modality) for u in group], "zstd",
                  corrupt=(p == 0 and modality == "vision"))
    got = parse_decisions(read_topic(topics.decisions, len(units)))
    assert {d.unit_id for d in got} == {u.unit_id for u in units}
    status, body = service.get("/readyz")
    assert status == 200, body
    assert "inspection_undecodable_batches_total 1.0" in service.get("/metrics")[1]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, service.log_tail()
    assert time.monotonic() - start < 30
    assert "cannot decode the record batch" in service.log_tail(1_000_000)


# ------------------------------------------------------------------------------------- wire contract
def test_event_time_bounds_null_key_and_duplicate_modality(broker, topics, unit_factory, service_config,
                                                            run_service, read_topic, parse_decisions, dlq_headers,
                                                            metric_value):
    rng = np.random.default_rng(6)
    now = datetime.now(UTC)
    pool = [restamped(unit_factory(i, rng), now) for i in range(40)]
    _, same = max(by_partition(pool).items(), key=lambda kv: len(kv[1]))
    future, ancient, keyless, twice, normal = same[:5]
    future = dataclasses.replace(future, vision=dataclasses.replace(
        future.vision, event_time=datetime(2999, 1, 1, tzinfo=UTC)))
    ancient = dataclasses.replace(ancient, temperature=dataclasses.replace(
        ancient.temperature, event_time=datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)))
    # a second vibration reading of ``twice``, other values, sent after the first
    second = dataclasses.replace(twice.vibration, reading_id="again", values=twice.vibration.values * 2)
    config = service_config(join={"timeout_s": 3.0, "max_event_age_s": 86_400.0})
    with run_service(config, broker.bootstrap) as service:
        for unit in (future, ancient):
            for modality in MODALITIES:
                write(broker.bootstrap, topics, modality, [getattr(unit, modality)])
        for modality in MODALITIES:
            p = partition_for(keyless.unit_id.encode(), PARTITIONS)
            key = None if modality == "temperature" else "subject"
            produce_batch(broker.bootstrap, topics.for_modality(modality), p,
                          [raw(getattr(keyless, modality), key=key)])
        _, first_vibration = write(broker.bootstrap, topics, "vibration", [twice.vibration])
        write(broker.bootstrap, topics, "vibration", [second])
        for modality in ("vision", "temperature"):
            write(broker.bootstrap, topics, modality, [getattr(twice, modality)])
        time.sleep(1.0)  # the poisoned watermark, if any, is in place before the normal unit arrives
        for modality in MODALITIES:
            write(broker.bootstrap, topics, modality, [getattr(normal, modality)])
        decisions = {d.unit_id: d for d in parse_decisions(read_topic(topics.decisions, 5))}
        dead = read_topic(topics.dlq, 3)
        assert metric_value(service, "inspection_duplicate_readings_total") == 1
    reasons = {dlq_headers(r)["ce_subject"]: (dlq_headers(r)["dlq_stage"], dlq_headers(r)["dlq_reason"])
               for r in dead}
    assert reasons == {future.unit_id: ("validate", "event_time_in_future"),
                       ancient.unit_id: ("validate", "event_time_too_old"),
                       keyless.unit_id: ("deserialize", "missing_key")}
    assert set(decisions) == {future.unit_id, ancient.unit_id, keyless.unit_id, twice.unit_id, normal.unit_id}
    # a unit straddling the bound is decided without the dead-lettered reading
    assert decisions[future.unit_id].missing == ("vision",)
    assert decisions[ancient.unit_id].missing == ("temperature",)
    assert decisions[keyless.unit_id].missing == ("temperature",)
    # the first reading of a modality wins; the second is counted and ignored
    assert decisions[twice.unit_id].missing == ()
    vib = [c for c in decisions[twice.unit_id].inputs if c.topic == topics.vibration]
    assert [c.offset for c in vib] == [first_vibration]
    # the far-future reading did not move the partition's watermark: the next unit is joined whole
    assert decisions[normal.unit_id].missing == ()


def test_broker_gone_turns_readyz_503_and_sigterm_still_stops_the_service(serving_store, serve_process, tmp_path):
    from services.broker import EmbeddedBroker, TopicNames, create_topics

    private = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    private.start()
    topics = TopicNames.with_prefix("gone.")
    create_topics(private.bootstrap, topics, PARTITIONS)
    path = tmp_path / "service.json"
    path.write_text(json.dumps({
        "model": {"store": str(serving_store), "device": "cpu"},
        "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
        "kafka": {"group_id": "gone"}, "shutdown_timeout_s": 30}))
    service = serve_process(path, private.bootstrap, tmp_path / "service.log")
    try:
        proc = service.start()
        service.wait_ready()
        private.stop()
        deadline = time.monotonic() + 60  # twice the 6 s session timeout without a heartbeat, then 503
        while (status := service.get("/readyz"))[0] != 503:
            assert time.monotonic() < deadline, f"/readyz still answers {status} with the broker gone"
            time.sleep(0.5)
        assert "input not consumed" in status[1]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, service.log_tail()
        assert time.monotonic() - start < 45  # the shutdown timeout plus the bounded commit and close
    finally:
        private.stop()


def test_a_batch_broken_midway_is_located_after_the_records_already_handed_out(broker, topics, group_id):
    from kafka import TopicPartition

    from services.clients import make_consumer, undecodable_batch

    messages = [RawMessage(f"k{i}".encode(), bytes([i]) * 400, [("h", b"x")], 1_000 + i) for i in range(6)]
    tp = TopicPartition(topics.vision, 0)
    produce_batch(broker.bootstrap, tp.topic, 0, messages[:2])
    first = produce_batch(broker.bootstrap, tp.topic, 0, messages, "none", corrupt=True)  # the middle is garbage
    after = produce_batch(broker.bootstrap, tp.topic, 0, messages[:1])
    consumer = make_consumer([], broker.bootstrap, group_id)
    got, located = [], []
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        deadline = time.monotonic() + 30
        while after not in got and time.monotonic() < deadline:
            try:
                got += [r.offset for r in consumer.poll(timeout_ms=200).get(tp, [])]
            except Exception as exc:  # noqa: BLE001 - the broken batch
                located.append(undecodable_batch(exc, consumer))
                consumer.seek(tp, located[-1].next_offset)
    finally:
        consumer.close(autocommit=False)
    assert len(located) == 1 and located[0].next_offset == first + 6
    delivered = [o for o in got if first <= o < first + 6]
    assert delivered == list(range(first, located[0].first_offset))  # handed out before the break, not again
    assert got == [0, 1, *delivered, after]
