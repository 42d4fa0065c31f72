"""The embedded broker, topic creation and client settings, against a real Tansu broker (no mocks)."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from kafka import TopicPartition

from inspection.errors import BrokerError, ConfigError
from services.broker import EmbeddedBroker, TopicNames, create_topics, tansu_binary
from services.clients import (
    MAX_MESSAGE_BYTES,
    REDACTED,
    consumer_config,
    make_admin,
    make_consumer,
    make_producer,
    producer_config,
    redact,
    security_config,
    wait_for_assignment,
    wait_for_group,
)

#: Seconds a consumer may take to join a group: Tansu holds a join for half the 6 s session timeout.
JOIN_TIMEOUT_S = 20.0
#: Seconds to wait for produced records to be consumed back.
CONSUME_TIMEOUT_S = 20.0


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _partition_counts(bootstrap: str, names: tuple[str, ...]) -> dict[str, int]:
    admin = make_admin(bootstrap)
    try:
        return {
            t["name"]: len(t["partitions"])
            for t in admin.describe_topics(list(names))
            if t["error_code"] == 0
        }
    finally:
        admin.close()


def _consume(consumer, expected: int, timeout_s: float = CONSUME_TIMEOUT_S) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


@pytest.fixture
def tansu():
    """Skip a test that launches its own broker when the binary is not installed."""
    try:
        return tansu_binary()
    except BrokerError as exc:
        pytest.skip(f"embedded Kafka broker unavailable: {exc}")


# ------------------------------------------------------------------------------------------ the broker


@pytest.mark.kafka
def test_tansu_binary_is_executable(tansu):
    path = tansu
    assert path.is_file()
    assert os.access(path, os.X_OK)


def test_broker_answers_list_topics(broker):
    assert broker.running
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    admin = make_admin(broker.bootstrap)
    try:
        assert isinstance(admin.list_topics(), list)
        assert admin.describe_cluster()["cluster_id"] == broker.cluster_id
    finally:
        admin.close()


def test_second_broker_on_same_port_fails_and_leaves_no_process(broker, tmp_path):
    second = EmbeddedBroker(port=broker.port, log_path=tmp_path / "second.log", ready_timeout_s=10)
    with pytest.raises(BrokerError, match="failed"):
        second.start()
    assert second.pid is not None
    assert not second.running
    assert _pid_gone(second.pid)
    assert second.panicked()  # Tansu panics on a port in use (yet exits 0): the log is the evidence
    assert broker.running  # the session broker is unharmed


@pytest.mark.kafka
def test_stop_leaves_no_process_and_is_idempotent(tansu, tmp_path):
    embedded = EmbeddedBroker(log_path=tmp_path / "own.log")
    with embedded:
        pid = embedded.pid
        assert pid is not None and not _pid_gone(pid)
        assert "127.0.0.1" in embedded.bootstrap
    assert _pid_gone(pid)
    assert not embedded.running
    embedded.stop()  # idempotent
    assert not embedded.panicked()


@pytest.mark.kafka
def test_restart_keeps_port_and_cluster_id(tansu, tmp_path):
    embedded = EmbeddedBroker(log_path=tmp_path / "restart.log")
    try:
        embedded.start()
        bootstrap, first_pid = embedded.bootstrap, embedded.pid
        embedded.restart()
        assert embedded.bootstrap == bootstrap
        assert embedded.pid != first_pid and _pid_gone(first_pid)
        admin = make_admin(embedded.bootstrap)
        try:
            assert admin.describe_cluster()["cluster_id"] == embedded.cluster_id
        finally:
            admin.close()
    finally:
        embedded.stop()
    assert not embedded.panicked()


@pytest.mark.kafka
def test_broker_ignores_callers_tansu_variables(tansu, tmp_path, monkeypatch):
    monkeypatch.setenv("LISTENER_URL", "tcp://0.0.0.0:1")
    monkeypatch.setenv("ADVERTISED_LISTENER_URL", "tcp://example.invalid:1")
    monkeypatch.setenv("STORAGE_ENGINE", "postgres://nowhere/")
    monkeypatch.setenv("CLUSTER_ID", "leaked")
    with EmbeddedBroker(log_path=tmp_path / "env.log") as embedded:
        admin = make_admin(embedded.bootstrap)
        try:
            cluster = admin.describe_cluster()
        finally:
            admin.close()
    assert cluster["cluster_id"] == embedded.cluster_id
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", embedded.port)]


def test_broker_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="env must not set"):
        EmbeddedBroker(env={"LISTENER_URL": "tcp://0.0.0.0:9092"})
    with pytest.raises(ConfigError, match="port"):
        EmbeddedBroker(port=70000)
    with pytest.raises(ConfigError, match="storage"):
        EmbeddedBroker(storage="tansu")
    with pytest.raises(BrokerError, match="no port yet"):
        _ = EmbeddedBroker().bootstrap


# ------------------------------------------------------------------------------------------------ topics


def test_topic_names_defaults_and_prefix():
    names = TopicNames()
    assert names.inputs == ("inspection.vision", "inspection.vibration", "inspection.temperature")
    assert names.for_modality("vibration") == "inspection.vibration"
    prefixed = TopicNames.with_prefix("test1.")
    assert prefixed.vision == "test1.inspection.vision"
    assert prefixed.dlq == "test1.inspection.dlq"
    with pytest.raises(ConfigError, match="unknown modality"):
        names.for_modality("audio")


@pytest.mark.parametrize("bad", ["", ".", "..", "a b", "a/b", "umlaut-ä", "x" * 250, "tab\t"])
def test_topic_names_reject_bad_names(bad):
    with pytest.raises(ConfigError, match="topic name"):
        TopicNames(vision=bad)


def test_topic_names_reject_bad_prefix_duplicates_and_collisions():
    with pytest.raises(ConfigError):
        TopicNames.with_prefix("bad prefix ")
    with pytest.raises(ConfigError, match="distinct"):
        TopicNames(vision="same", vibration="same")
    with pytest.raises(ConfigError, match="'.' versus '_'"):
        TopicNames(vision="a.b", vibration="a_b")


def test_create_topics_is_co_partitioned_and_idempotent(broker):
    names = TopicNames.with_prefix(f"c{uuid.uuid4().hex[:8]}.")
    create_topics(broker.bootstrap, names, partitions=4)
    assert _partition_counts(broker.bootstrap, names.all) == dict.fromkeys(names.all, 4)
    create_topics(broker.bootstrap, names, partitions=4)  # idempotent
    assert _partition_counts(broker.bootstrap, names.all) == dict.fromkeys(names.all, 4)
    with pytest.raises(BrokerError, match="co-partitioned"):
        create_topics(broker.bootstrap, names, partitions=2)


def test_create_topics_refuses_a_mismatched_existing_input_before_creating_any(broker):
    names = TopicNames.with_prefix(f"m{uuid.uuid4().hex[:8]}.")
    admin = make_admin(broker.bootstrap)
    try:
        admin.create_topics({names.vibration: {"num_partitions": 2, "replication_factor": -1}})
    finally:
        admin.close()
    with pytest.raises(BrokerError, match="co-partitioned"):
        create_topics(broker.bootstrap, names, partitions=3)
    assert _partition_counts(broker.bootstrap, names.all) == {names.vibration: 2}


def test_create_topics_validates_arguments(broker):
    names = TopicNames.with_prefix("never.")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="partitions"):
            create_topics(broker.bootstrap, names, partitions=bad)
    with pytest.raises(ConfigError, match="unknown admin config"):
        create_topics(broker.bootstrap, names, client_config={"no_such_key": 1})


def test_create_topics_unreachable_cluster_is_a_broker_error():
    with pytest.raises(BrokerError):
        create_topics("127.0.0.1:1", TopicNames.with_prefix("x."), timeout_s=1)


# ---------------------------------------------------------------------------------- produce and consume


def test_keyed_messages_round_trip_with_headers(broker, topics, group_id):
    n = 200
    producer = make_producer(broker.bootstrap)
    try:
        futures = [
            producer.send(
                topics.vision,
                key=f"unit-{i % 37:03d}".encode(),
                value=f"value-{i}".encode() * 3,
                headers=[("ce_id", f"reading-{i}".encode()), ("ce_subject", f"unit-{i % 37:03d}".encode())],
            )
            for i in range(n)
        ]
        producer.flush(timeout=10)
        metadata = [future.get(timeout=10) for future in futures]
    finally:
        producer.close()
    assert {m.partition for m in metadata} == {0, 1, 2}

    consumer = make_consumer([topics.vision], broker.bootstrap, group_id)
    try:
        assigned = wait_for_assignment(consumer, JOIN_TIMEOUT_S)
        assert assigned == {TopicPartition(topics.vision, p) for p in range(3)}
        for _ in range(3):  # polls that fetch records once assigned: the wait must rewind them
            assert wait_for_assignment(consumer, JOIN_TIMEOUT_S) == assigned
        records = _consume(consumer, n)
    finally:
        consumer.close(autocommit=False)

    assert len(records) == n, (
        "every produced record is consumed exactly once (none lost by the assignment wait)"
    )
    by_id = {}
    partition_of_key: dict[bytes, set[int]] = {}
    for record in records:
        headers = dict(record.headers)
        by_id[headers["ce_id"].decode()] = record
        partition_of_key.setdefault(record.key, set()).add(record.partition)
    assert len(by_id) == n
    for i in range(n):
        record = by_id[f"reading-{i}"]
        assert record.key == f"unit-{i % 37:03d}".encode()
        assert record.value == f"value-{i}".encode() * 3
        assert record.headers == [("ce_id", f"reading-{i}".encode()), ("ce_subject", record.key)]
    assert all(len(parts) == 1 for parts in partition_of_key.values()), "a key always maps to one partition"


def test_large_image_sized_message_round_trips(broker, topics, group_id):
    value = os.urandom(9 * 1024 * 1024)  # larger than the 8 MiB image budget
    producer = make_producer(broker.bootstrap)
    try:
        producer.send(topics.vision, key=b"unit-big", value=value).get(timeout=20)
    finally:
        producer.close()
    consumer = make_consumer([topics.vision], broker.bootstrap, group_id)
    try:
        wait_for_assignment(consumer, JOIN_TIMEOUT_S)
        records = _consume(consumer, 1)
    finally:
        consumer.close(autocommit=False)
    assert len(records) == 1
    assert records[0].key == b"unit-big" and records[0].value == value


def test_group_of_two_splits_co_partitioned_inputs(broker, topics, group_id):
    consumers = [make_consumer(topics.inputs, broker.bootstrap, group_id) for _ in range(2)]
    try:
        # each member polls from its own thread, as separate processes do (see wait_for_group)
        first, second = wait_for_group(
            consumers, lambda a: all(a) and not a[0] & a[1] and len(a[0] | a[1]) == 9, 2 * JOIN_TIMEOUT_S)
    finally:
        for consumer in consumers:
            consumer.close(autocommit=False)

    everything = {TopicPartition(t, p) for t in topics.inputs for p in range(3)}
    assert first and second, f"each member gets partitions; got {first} and {second}"
    assert not first & second, "assignments are disjoint"
    assert first | second == everything, "together they cover every partition"
    for assignment in (first, second):
        numbers = [{tp.partition for tp in assignment if tp.topic == t} for t in topics.inputs]
        assert numbers[0] == numbers[1] == numbers[2], "a partition number goes to one member on every input"


def test_wait_for_assignment_times_out_without_a_group_join(broker, topics):
    consumer = make_consumer([], broker.bootstrap, f"g-{uuid.uuid4().hex}")
    try:
        with pytest.raises(BrokerError, match="no partitions assigned"):
            wait_for_assignment(consumer, 0.3)
    finally:
        consumer.close(autocommit=False)


# ------------------------------------------------------------------------------------------- settings


def test_client_settings_defaults():
    producer = producer_config("127.0.0.1:9092")
    assert producer["acks"] == "all"
    assert producer["max_request_size"] >= 8 * 1024 * 1024
    consumer = consumer_config("127.0.0.1:9092", "g1")
    assert consumer["enable_auto_commit"] is False
    assert consumer["session_timeout_ms"] == 6000 and consumer["heartbeat_interval_ms"] == 1500
    assert consumer["auto_offset_reset"] == "earliest"
    assert consumer["max_partition_fetch_bytes"] == MAX_MESSAGE_BYTES
    assert consumer["fetch_max_bytes"] >= consumer["max_partition_fetch_bytes"]


def test_client_settings_reject_bad_values():
    with pytest.raises(ConfigError, match="unknown producer config"):
        producer_config("127.0.0.1:9092", lingerms=5)
    with pytest.raises(ConfigError, match="max_request_size"):
        producer_config("127.0.0.1:9092", max_request_size=1024)
    with pytest.raises(ConfigError, match="heartbeat"):
        consumer_config("127.0.0.1:9092", "g", heartbeat_interval_ms=5000)
    with pytest.raises(ConfigError, match="group_id"):
        consumer_config("127.0.0.1:9092", "")
    with pytest.raises(ConfigError, match="bootstrap"):
        producer_config("no-port")
    with pytest.raises(ConfigError, match="single string"):
        make_consumer("inspection.vision", "127.0.0.1:9092", "g")


def test_security_config_validates_and_redact_hides_passwords():
    config = security_config(
        "SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="inspector",
        sasl_plain_password="hunter2-secret",
        ssl_cafile="/etc/ssl/ca.pem",
        ssl_password="keypass",
    )
    assert config["security_protocol"] == "SASL_SSL"
    safe = redact(config)
    assert safe["sasl_plain_password"] == REDACTED and safe["ssl_password"] == REDACTED
    assert safe["sasl_plain_username"] == "inspector" and safe["ssl_cafile"] == "/etc/ssl/ca.pem"
    assert "hunter2" not in repr(safe) and "keypass" not in repr(safe)
    merged = redact(producer_config("127.0.0.1:9092", **config))
    assert "hunter2" not in repr(merged) and merged["acks"] == "all"

    with pytest.raises(ConfigError, match="needs") as missing:
        security_config("SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_plain_password="hunter2-secret")
    assert "hunter2" not in str(missing.value)
    with pytest.raises(ConfigError, match="unknown security keys"):
        security_config("SSL", ssl_pasword="typo")
    with pytest.raises(ConfigError, match="security_protocol"):
        security_config("TLS")
    with pytest.raises(ConfigError, match="need security_protocol SASL"):
        security_config("PLAINTEXT", sasl_mechanism="PLAIN")


def test_topic_names_map_input_topics_back_to_modalities():
    names = TopicNames.with_prefix("p1.")
    for modality in ("vision", "vibration", "temperature"):
        assert names.modality_of(names.for_modality(modality)) == modality
    assert names.modality_of(names.decisions) is None
    assert names.modality_of("inspection.vision") is None  # the unprefixed topic belongs to another set
