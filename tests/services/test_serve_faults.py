"""At-least-once under faults, against real processes: the service SIGKILLed mid-stream and restarted, a second
instance joining and leaving under load, and the broker (on S3 storage) restarted mid-stream. Every unit must
be decided; a unit decided twice must carry the same decision id both times."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest

from inspection.records import Decision
from services.broker import EmbeddedBroker, TopicNames, create_topics
from services.clients import make_consumer, make_producer, wait_for_assignment
from services.publish import publish_units

pytestmark = [pytest.mark.slow]

#: Seconds for every unit to be decided once the fault is over (a dead member is noticed after the 6 s
#: session timeout; the backlog is a few hundred small units).
SETTLE_TIMEOUT_S = 180.0


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class DecisionCollector:
    """Reads the decisions topic in a background thread, keeping every decision per unit."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.by_unit: dict[str, list[Decision]] = defaultdict(list)
        self.records = 0
        self._stop = threading.Event()
        self._consumer = make_consumer([topic], bootstrap, f"collector-{uuid.uuid4().hex}",
                                       reconnect_backoff_max_ms=1000)
        wait_for_assignment(self._consumer, timeout_s=30)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._consumer.poll(timeout_ms=200)
            except Exception:  # noqa: BLE001 - the broker may be restarting; keep polling
                time.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    decision = Decision.from_json(record.value)
                    with self._lock:
                        self.by_unit[decision.unit_id].append(decision)
                        self.records += 1

    def wait_for(self, unit_ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if unit_ids <= set(self.by_unit):
                    break
            time.sleep(0.2)
        time.sleep(2.0)  # anything still in flight (a redelivered duplicate) arrives too

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close(autocommit=False)


def assert_all_decided_once_or_idempotently(collector: DecisionCollector, units) -> int:
    """Every unit decided; duplicates (redeliveries) carry the same id and inputs. Returns the duplicates."""
    missing = sorted({u.unit_id for u in units} - set(collector.by_unit))
    assert not missing, f"{len(missing)} units never decided, e.g. {missing[:5]}"
    duplicates = 0
    for u in units:
        decisions = collector.by_unit[u.unit_id]
        assert len({d.id for d in decisions}) == 1, [(d.id, d.inputs) for d in decisions]
        assert all(d.missing == () for d in decisions), [(d.unit_id, d.missing) for d in decisions]
        duplicates += len(decisions) - 1
    return duplicates


def publish_in_background(bootstrap: str, units, topics: TopicNames, rate: float) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        producer = make_producer(bootstrap, reconnect_backoff_max_ms=1000)
        try:
            thread.report = publish_units(producer, units, topics, rate=rate, timeout_s=120)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            producer.close(timeout=10)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def small_units(unit_factory, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [unit_factory(i, rng) for i in range(n)]


# --------------------------------------------------------------------------------------------- crash
def test_sigkill_mid_stream_then_restart_loses_nothing(broker, topics, group_id, unit_factory, service_config,
                                                       serve_process, tmp_path):
    units = small_units(unit_factory, 400, seed=11)
    config_path = tmp_path / "service.json"
    config_path.write_text(json.dumps(service_config(batching={"max_batch": 16, "max_delay_ms": 20,
                                                               "max_queue": 64}).resolved()))
    service = serve_process(config_path, broker.bootstrap, tmp_path / "service.log", group=group_id)
    collector = DecisionCollector(broker.bootstrap, topics.decisions)
    try:
        first = service.start()
        service.wait_ready()
        publisher = publish_in_background(broker.bootstrap, units, topics, rate=80.0)
        deadline = time.monotonic() + 60
        while metric(service.get("/metrics")[1], "inspection_decisions_total") < 100:
            assert time.monotonic() < deadline, "no decisions before the kill"
            time.sleep(0.1)
        assert publisher.is_alive()  # mid-stream
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        second = service.start()  # the same metrics port
        service.wait_ready()
        publisher.join(120)
        assert not publisher.errors
        collector.wait_for({u.unit_id for u in units}, SETTLE_TIMEOUT_S)
        duplicates = assert_all_decided_once_or_idempotently(collector, units)
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, service.log_tail()
    finally:
        collector.close()
    # the restart re-read at most what the killed process had not committed: far fewer than all units again
    assert duplicates < len(units) // 2, duplicates


# ----------------------------------------------------------------------------------------- rebalance
def test_second_instance_joins_and_leaves_under_load_loses_nothing(broker, topics, unit_factory, service_config,
                                                                   run_service):
    units = small_units(unit_factory, 900, seed=12)
    collector = DecisionCollector(broker.bootstrap, topics.decisions)
    config = service_config(batching={"max_batch": 16, "max_delay_ms": 20, "max_queue": 64})
    try:
        with run_service(config, broker.bootstrap, instance_id="a") as a:
            publisher = publish_in_background(broker.bootstrap, units, topics, rate=50.0)
            while a.stats.decisions_acked < 60:
                time.sleep(0.1)
            with run_service(config, broker.bootstrap, instance_id="b") as b:
                # both members hold partitions now; b works under load, then leaves
                deadline = time.monotonic() + 60
                while b.stats.decisions_acked < 30:
                    assert time.monotonic() < deadline, "the second instance never decided anything"
                    time.sleep(0.1)
                joined_and_left_under_load = publisher.is_alive()
                # a counts the rebalance when its main loop handles the revocation. The embedded broker may
                # complete b's join without waiting for a (it holds a JoinGroup for half the session timeout, not
                # the rebalance timeout), so b can be deciding before a has heard of the rebalance: a hears of it
                # at its next heartbeat, within the session timeout
                deadline = time.monotonic() + 30
                while a.stats.rebalances < 1:
                    assert time.monotonic() < deadline, "the first instance never took part in a rebalance"
                    time.sleep(0.1)
            # a takes b's partitions back: the units on them that arrive after b left can only be decided by a
            publisher.join(120)
            assert not publisher.errors
            collector.wait_for({u.unit_id for u in units}, SETTLE_TIMEOUT_S)
            decided_by_b = b.stats.decisions_acked
        duplicates = assert_all_decided_once_or_idempotently(collector, units)
    finally:
        collector.close()
    assert decided_by_b >= 30
    assert joined_and_left_under_load
    assert duplicates < len(units) // 2, duplicates


# ------------------------------------------------------------------------------------- broker restart
def test_broker_restart_on_s3_storage_loses_nothing(s3_endpoint, unit_factory, service_config, run_service,
                                                    tmp_path):
    import boto3

    bucket = f"tansu-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT"], aws_access_key_id="test",
                 aws_secret_access_key="test", region_name=s3_endpoint["AWS_DEFAULT_REGION"]).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": s3_endpoint["AWS_DEFAULT_REGION"]})
    units = small_units(unit_factory, 300, seed=13)
    s3_broker = EmbeddedBroker(storage=f"s3://{bucket}/", env=s3_endpoint, log_path=tmp_path / "tansu.log",
                               ready_timeout_s=30)
    s3_broker.start()
    try:
        topics = TopicNames.with_prefix(f"s3{uuid.uuid4().hex[:8]}.")
        create_topics(s3_broker.bootstrap, topics, 3)
        # a unit whose readings straddle the restart (seconds: S3 writes go through the emulator, and the
        # producers back off and retry) must not be closed by the join timeout with a reading still to come
        config = service_config(topics={name: getattr(topics, name) for name in
                                        ("vision", "vibration", "temperature", "decisions", "dlq")},
                                join={"timeout_s": 120.0},
                                batching={"max_batch": 16, "max_delay_ms": 20, "max_queue": 64})
        with run_service(config, s3_broker.bootstrap) as service:
            publisher = publish_in_background(s3_broker.bootstrap, units, topics, rate=20.0)
            deadline = time.monotonic() + 60
            while service.stats.decisions_acked < 60:
                assert time.monotonic() < deadline, "no decisions before the restart"
                time.sleep(0.1)
            assert publisher.is_alive()  # mid-stream
            s3_broker.restart()
            publisher.join(180)
            assert not publisher.errors, publisher.errors
            # every reading was acknowledged with an offset: the publisher sent again what the broker answered
            # "duplicate" for across the restart without holding it
            readings = {(u.unit_id, m) for u in units for m in u.present}
            assert set(publisher.report.coordinates) == readings
            assert all(c.offset >= 0 for c in publisher.report.coordinates.values())
            collector = DecisionCollector(s3_broker.bootstrap, topics.decisions)
            try:
                collector.wait_for({u.unit_id for u in units}, SETTLE_TIMEOUT_S)
                duplicates = assert_all_decided_once_or_idempotently(collector, units)
            finally:
                collector.close()
        assert not s3_broker.panicked(), s3_broker.log_text()[-3000:]
    finally:
        s3_broker.stop()
    assert duplicates < len(units) // 2, duplicates

