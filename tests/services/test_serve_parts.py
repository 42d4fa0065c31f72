"""The stream service's parts without a broker: strict config, drift test, event-time alignment, offset
bookkeeping and dead-letter records."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from inspection.errors import ConfigError
from inspection.records import InputCoordinate
from services.align import EventTimeAligner, OffsetTracker
from services.dlq import MAX_DETAIL_CHARS, dead_letter
from services.drift import DriftMonitor
from services.service_config import ServiceConfig, load_service_config

EXAMPLE = Path(__file__).parents[2] / "docs" / "service.example.yaml"


# ------------------------------------------------------------------------------------------------ config
def write(tmp_path: Path, text: str, name: str = "service.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_takes_the_documented_defaults(tmp_path):
    config = load_service_config(write(tmp_path, "model:\n  store: models/composite\n"))
    assert config.model.store == "models/composite"
    assert config.metrics.host == "127.0.0.1"  # nothing is exposed beyond loopback unless asked
    assert config.topics.names().inputs == ("inspection.vision", "inspection.vibration", "inspection.temperature")
    assert config.join.expected == ("vision", "vibration", "temperature")
    assert config.batching.max_batch == 32 and config.drift.alpha == 0.05


def test_the_example_config_is_valid_and_complete(tmp_path):
    config = load_service_config(EXAMPLE)
    # every key of every section appears in the example (so the docs show them all)
    text = EXAMPLE.read_text()
    for section, values in config.resolved().items():
        assert f"{section}:" in text, section
        if isinstance(values, dict):
            for key in values:
                assert f"{key}:" in text, f"{section}.{key}"


@pytest.mark.parametrize("text, key", [
    ("model: {store: m}\njoin: {timeout: 5}\n", "timeout"),
    ("model: {store: m}\nbatching: {max_batch: 0}\n", "batching.max_batch"),
    ("model: {store: m}\nbatching: {max_batch: 64, max_queue: 16}\n", "batching.max_queue"),
    ("model: {store: m}\nbatching: {max_delay_ms: fast}\n", "config.batching.max_delay_ms"),
    ("model: {store: m}\njoin: {timeout_s: -1}\n", "join.timeout_s"),
    ("model: {store: m}\njoin: {expected: [vision, audio]}\n", "join.expected"),
    ("model: {store: m}\nmetrics: {port: 70000}\n", "metrics.port"),
    ("model: {store: m}\ndrift: {alpha: 0.9}\n", "drift.alpha"),
    ("model: {store: m}\ndrift: {window: 5}\n", "drift.window"),
    ("model: {store: m, device: tpu}\n", "model.device"),
    ("model: {store: m, prepare_workers: -1}\n", "model.prepare_workers"),
    ("model: {store: m, warm_up: sometimes}\n", "warm_up"),
    ("model: {store: m}\nbatching: {tune: 1}\n", "batching.tune"),
    ("model: {store: m}\nbatching: {pad: 'yes'}\n", "batching.pad"),
    ("model: {store: m}\ntopics: {vision: 'bad topic'}\n", "vision"),
    ("model: {store: m}\nkafka: {group_id: ''}\n", "kafka.group_id"),
    ("model: {store: m}\nkafka: {consumer: {enable_auto_commit: true}}\n", "kafka.consumer"),
    ("model: {store: m}\nkafka: {consumer: {sasl_mechanism: PLAIN}}\n", "security section"),
    ("model: {store: m}\nkafka: {bootstrap: 'localhost'}\n", "kafka.bootstrap"),
    ("model: {store: m}\nlog_format: xml\n", "log_format"),
    ("model: {store: m}\nsecurity: {security_protocol: SASL_SSL}\n", "security"),
    ("model: {store: m}\nsecurity: {security_protocol: SASL_SSL, sasl_mechanism: PLAIN}\n", "sasl_plain_username"),
    ("model: {store: m}\nsecurity: {ssl_cafile: ca.pem}\n", "ssl_cafile"),
    ("join: {timeout_s: 1}\n", "model.store"),
    ("model: {store: m}\nwhatever: 1\n", "whatever"),
])
def test_invalid_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_service_config(write(tmp_path, text))
    assert key in str(info.value)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_service_config(write(tmp_path, "model: {store: m}\nbatching: {max_batchsize: 8}\n"))
    assert "max_batchsize" in str(info.value) and "max_batch" in str(info.value) and "max_delay_ms" in str(info.value)


def test_repeated_keys_and_broken_files_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="'store' appears twice"):
        load_service_config(write(tmp_path, "model:\n  store: a\n  store: b\n"))
    with pytest.raises(ConfigError, match="appear twice"):
        load_service_config(write(tmp_path, '{"model": {"store": "a", "store": "b"}}', "s.json"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_service_config(write(tmp_path, "model: [store\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_service_config(tmp_path / "missing.yaml")


def test_secrets_come_from_the_environment_and_never_appear_in_the_resolved_config(tmp_path, monkeypatch):
    text = ("model: {store: m}\nsecurity:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n"
            "  sasl_plain_username: svc\n  sasl_plain_password_env: KAFKA_TEST_PASSWORD\n  ssl_cafile: /etc/ca.pem\n")
    config = load_service_config(write(tmp_path, text))
    monkeypatch.delenv("KAFKA_TEST_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"\$KAFKA_TEST_PASSWORD"):
        config.security.client_settings()
    monkeypatch.setenv("KAFKA_TEST_PASSWORD", "s3cr3t-value")
    settings = config.security.client_settings()
    assert settings["sasl_plain_password"] == "s3cr3t-value"
    assert settings["security_protocol"] == "SASL_SSL" and settings["ssl_cafile"] == "/etc/ca.pem"
    assert "s3cr3t-value" not in json.dumps(config.resolved())
    with pytest.raises(ConfigError, match="sasl_plain_password"):  # an inline secret is an unknown key
        load_service_config(write(tmp_path, "model: {store: m}\nsecurity: {sasl_plain_password: x}\n"))


def test_resolved_config_loads_back_equal(tmp_path):
    config = ServiceConfig.from_mapping({"model": {"store": "m"}, "topics": {"prefix": "plant1."},
                                         "archive": {"path": "archive"}, "kafka": {"consumer": {"fetch_min_bytes": 2}}})
    path = write(tmp_path, json.dumps(config.resolved()), "resolved.json")
    assert load_service_config(path) == config
    assert config.topics.names().dlq == "plant1.inspection.dlq"


# ------------------------------------------------------------------------------------------------- drift
def test_drift_false_alarms_stay_near_alpha_and_do_not_grow_with_volume():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(window=200, alpha=0.05, modalities=("vision",))
    results = [r for v in rng.beta(2, 5, 200 * 301) if (r := monitor.add("vision", float(v))) is not None]
    assert len(results) == 300
    flagged = sum(r.drift for r in results) / len(results)
    # 300 independent tests at alpha 0.05: the flagged share is Binomial(300, 0.05)/300, 0.05 +- 0.025 (2 sd)
    assert 0.02 <= flagged <= 0.09, flagged
    late = [r.drift for r in results[200:]]  # after 40,000 scores the test is no more trigger-happy
    assert sum(late) / len(late) <= 0.10


def test_drift_flags_a_real_shift_and_resets_with_a_new_model():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(window=300, alpha=0.05, modalities=("vibration",))
    for v in rng.beta(2, 5, 300):
        assert monitor.add("vibration", float(v)) is None  # the reference window
    shifted = [monitor.add("vibration", float(v)) for v in rng.beta(3, 4, 300)]  # mean 0.29 -> 0.43
    result = shifted[-1]
    assert result is not None and result.drift and result.p_value < 1e-6
    assert result.n_reference == result.n_window == 300
    monitor.reset()
    assert monitor.reference_size("vibration") == 0 and monitor.latest == {}
    assert monitor.add("vibration", float("nan")) is None and monitor.reference_size("vibration") == 0


@pytest.mark.parametrize("kwargs", [dict(window=10), dict(alpha=0.0), dict(alpha=0.7), dict(window=True)])
def test_drift_monitor_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        DriftMonitor(**kwargs)


def test_a_dead_letter_of_a_record_with_neither_key_nor_value_gets_an_empty_value_and_says_so():
    letter = dead_letter(key=None, value=None, headers=[("ce_id", b"x")], coordinate=InputCoordinate("t", 0, 5),
                         stage="deserialize", reason="missing_key", detail="no key")
    assert letter.key is None and letter.value == b""  # Kafka clients cannot write a record with neither
    assert ("dlq_null_value", b"true") in letter.headers
    kept = dead_letter(key=None, value=b"v", headers=[], coordinate=InputCoordinate("t", 0, 6),
                       stage="deserialize", reason="missing_key", detail="no key")
    assert kept.value == b"v" and all(k != "dlq_null_value" for k, _ in kept.headers)


# ------------------------------------------------------------------------------------------------- align
Rec = namedtuple("Rec", "topic partition offset timestamp")
TOPICS = ("v", "b", "t")


def owned(*topics: str):
    return lambda topic, partition: not topics or topic in topics


def test_aligner_releases_each_partition_number_in_timestamp_order():
    al = EventTimeAligner(TOPICS, idle_s=1.0, lag_ms=30_000)
    for topic, offset, ts in [("b", 0, 250), ("b", 1, 10_250), ("v", 0, 0), ("t", 0, 500), ("v", 1, 10_000),
                              ("t", 1, 10_500)]:
        al.add(Rec(topic, 0, offset, ts))
    out = al.release(0.0, owned())
    assert [(r.topic, r.timestamp) for r in out] == [
        ("v", 0), ("b", 250), ("t", 500), ("v", 10_000), ("b", 10_250), ("t", 10_500)]
    al.add(Rec("v", 1, 0, 5))  # another partition number: nothing delivered there yet by b and t
    assert al.release(0.5, owned()) == []
    assert [(r.topic, r.partition) for r in al.release(1.6, owned())] == [("v", 1)]  # waited idle_s for them
    assert len(al) == 0


def test_aligner_holds_readings_far_ahead_of_a_topic_that_fell_behind():
    al = EventTimeAligner(TOPICS, idle_s=1.0, lag_ms=30_000)
    for topic in TOPICS:
        al.add(Rec(topic, 0, 0, 0))
    assert len(al.release(0.0, owned())) == 3
    for i in range(1, 8):  # temperature and vibration run 70 s ahead; vision delivers nothing
        al.add(Rec("t", 0, i, i * 10_000))
        al.add(Rec("b", 0, i, i * 10_000))
    out = al.release(0.0, owned())
    assert [r.timestamp for r in out] == [10_000, 10_000, 20_000, 20_000, 30_000, 30_000]  # within the lag
    assert al.release(0.9, owned()) == []  # 40 s would be past the lag of vision's last reading: wait
    al.add(Rec("v", 0, 1, 10_000))  # vision progresses: it is waited for again, from now
    assert [r.topic for r in al.release(1.5, owned())] == ["v", "b", "t"]
    assert al.release(2.4, owned()) == []
    out = al.release(2.6, owned())  # vision silent for 1.1 s: the others go on without it
    assert [(r.topic, r.timestamp) for r in out] == [("b", 50_000), ("t", 50_000), ("b", 60_000), ("t", 60_000),
                                                     ("b", 70_000), ("t", 70_000)]
    al.add(Rec("b", 0, 8, 200_000))
    assert [r.topic for r in al.release(2.6, owned("b"))] == ["b"]  # partitions we do not own never hold us


def test_aligner_shares_a_release_limit_between_partition_numbers():
    al = EventTimeAligner(TOPICS, idle_s=0.0, lag_ms=30_000)
    for p in range(3):
        for i in range(10):
            for topic in TOPICS:
                al.add(Rec(topic, p, i, i * 10_000))
    out = al.release(0.0, owned(), limit=9)
    assert [r.partition for r in out] == [0, 1, 2] * 3
    assert len(al.release(0.0, owned())) == 90 - 9


def test_aligner_caps_far_future_timestamps_at_the_clock_plus_the_skew():
    year_2999 = 32_503_680_000_000
    wall = [1_800_000_000_000.0]  # epoch ms

    def run(aligner: EventTimeAligner) -> list:
        now = wall[0]
        for topic, ts in (("v", now), ("b", year_2999), ("t", now)):
            aligner.add(Rec(topic, 0, 0, int(ts)))
        assert [r.topic for r in aligner.release(0.0, owned())] == ["v", "t"]
        assert [r.topic for r in aligner.release(1.1, owned())] == ["b"]  # after waiting idle_s for v and t
        wall[0] += 60_000  # a minute later v and t deliver again; b delivers nothing
        aligner.add(Rec("v", 0, 1, int(wall[0])))
        aligner.add(Rec("t", 0, 1, int(wall[0])))
        return aligner.release(1.2, owned())

    # b's timestamp counted as clock + 300 s: a minute later v and t are within the lag of it, and after the
    # skew and the lag have passed on the wall clock b is waited for again like any topic that fell behind
    capped = EventTimeAligner(TOPICS, idle_s=1.0, lag_ms=30_000, max_future_ms=300_000, wall_ms=lambda: wall[0])
    assert len(run(capped)) == 2
    wall[0] += 600_000
    capped.add(Rec("v", 0, 2, int(wall[0])))
    capped.add(Rec("t", 0, 2, int(wall[0])))
    assert capped.release(1.3, owned()) == []
    # without the cap, b's year-2999 timestamp makes it count as never behind again
    wall[0] = 1_800_000_000_000.0
    uncapped = EventTimeAligner(TOPICS, idle_s=1.0, lag_ms=30_000, wall_ms=lambda: wall[0])
    run(uncapped)
    wall[0] += 600_000
    uncapped.add(Rec("v", 0, 2, int(wall[0])))
    uncapped.add(Rec("t", 0, 2, int(wall[0])))
    assert [(r.topic, r.offset) for r in uncapped.release(1.3, owned())] == [("v", 2), ("t", 2)]


# ----------------------------------------------------------------------------------------------- offsets
def c(topic: str, partition: int, offset: int) -> InputCoordinate:
    return InputCoordinate(topic, partition, offset)


def test_offset_tracker_commits_below_the_lowest_offset_still_needed():
    tr = OffsetTracker()
    for off in range(10):
        tr.processed("v", 0, off)
    tr.processed("b", 0, 4)
    g = tr.hold([c("v", 0, 3), c("b", 0, 2)], count=2)  # two sinks
    tr.hold([c("v", 0, 7)])
    assert tr.safe_offsets({}) == {("v", 0): 3, ("b", 0): 2}
    assert tr.safe_offsets({("v", 0): 1}) == {("v", 0): 1, ("b", 0): 2}  # the join still holds offset 1
    tr.release([c("v", 0, 3), c("b", 0, 2)], g)
    assert tr.safe_offsets({}) == {("v", 0): 3, ("b", 0): 2}  # one sink left
    tr.release([c("v", 0, 3), c("b", 0, 2)], g)
    assert tr.safe_offsets({}) == {("v", 0): 7, ("b", 0): 5}
    assert tr.in_flight() == 1


def test_offset_tracker_ignores_acknowledgements_from_before_a_revocation():
    tr = OffsetTracker()
    tr.processed("v", 0, 5)
    old = tr.hold([c("v", 0, 5)])
    tr.reset()
    tr.processed("v", 0, 5)
    new = tr.hold([c("v", 0, 5)])
    tr.release([c("v", 0, 5)], old)
    assert tr.safe_offsets({}) == {("v", 0): 5}
    tr.release([c("v", 0, 5)], new)
    assert tr.safe_offsets({}) == {("v", 0): 6}


# --------------------------------------------------------------------------------------------- dead letters
def test_dead_letter_keeps_the_original_record_and_appends_its_reason():
    where = c("inspection.vision", 2, 41)
    headers = [("ce_id", b"r1"), ("ce_source", None), ("x-custom", b"\xff")]
    letter = dead_letter(key=b"u1", value=b"\x89PNG...", headers=headers, coordinate=where, stage="deserialize",
                         reason="image_decode_failed", detail="x" * 5000, timestamp_ms=1_700_000_000_000)
    assert letter.key == b"u1" and letter.value == b"\x89PNG..."
    assert letter.headers[:3] == [("ce_id", b"r1"), ("ce_source", b""), ("x-custom", b"\xff")]
    extra = dict(letter.headers[3:])
    assert extra["dlq_stage"] == b"deserialize" and extra["dlq_reason"] == b"image_decode_failed"
    assert (extra["dlq_topic"], extra["dlq_partition"], extra["dlq_offset"]) == (b"inspection.vision", b"2", b"41")
    assert extra["dlq_null_headers"] == b"ce_source" and extra["dlq_timestamp"] == b"1700000000000"
    assert len(extra["dlq_detail"]) == MAX_DETAIL_CHARS
    with pytest.raises(ValueError, match="stage"):
        dead_letter(key=None, value=b"", headers=[], coordinate=where, stage="parse", reason="x", detail="")
