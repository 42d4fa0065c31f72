"""The stream service against the real broker: one decision per unit with the model's own scores and exact
modality explanations; missing and late modalities; every kind of bad input dead-lettered around good units."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from inspection.records import MODALITIES
from inspection.store import ModelStore
from services.publish import FaultPlan
from services.scoring import load_serving_model

pytestmark = [pytest.mark.slow, pytest.mark.data]

#: Stream and direct scores run the same fp32 model on batches of different composition; only the CPU
#: kernels' batch-dependent blocking may differ (~1e-7 on O(1) values), as in the Shapley tests' BATCH_ATOL.
SCORE_ATOL = 1e-5
#: Shapley values are sums of float64 differences of fp32 logits: efficiency holds to float64 rounding.
EFFICIENCY_ATOL = 1e-9


def direct_scores(store_root, units) -> dict[str, float]:
    """The model's own scores: ``model(model.batch(units)).score`` in batches of 64, keyed by unit id."""
    serving = load_serving_model(ModelStore(store_root), None, torch.device("cpu"))
    model = serving.model
    out = {}
    with torch.no_grad():
        for start in range(0, len(units), 64):
            chunk = units[start:start + 64]
            scores = model(model.batch(chunk)).score.tolist()
            out.update({u.unit_id: s for u, s in zip(chunk, scores, strict=True)})
    return out


def test_thousand_units_give_one_decision_each_with_the_models_scores(
        broker, topics, composite_units, serving_store, service_config, run_service, publish, read_topic,
        parse_decisions, metric_value):
    units = composite_units
    # published as fast as the broker takes them, the large vibration windows can trail the images by seconds:
    # a 30 s join timeout keeps that producer-side skew from closing units early
    config = service_config(join={"timeout_s": 30.0})
    with run_service(config, broker.bootstrap) as service:
        report = publish(units, topics)
        records = read_topic(topics.decisions, len(units))
        decided = service.stats.decisions_acked
    assert report.messages == 3 * len(units)
    decisions = parse_decisions(records)
    assert len(decisions) == len(units) == decided  # exactly one per unit: no duplicate in a clean run
    by_unit = {d.unit_id: d for d in decisions}
    assert set(by_unit) == {u.unit_id for u in units}
    assert len({d.id for d in decisions}) == len(units)

    expected = direct_scores(serving_store, units)
    stream = np.array([by_unit[u.unit_id].score for u in units])
    direct = np.array([expected[u.unit_id] for u in units])
    np.testing.assert_allclose(stream, direct, rtol=0, atol=SCORE_ATOL)

    for u in units:
        d = by_unit[u.unit_id]
        assert d.present == MODALITIES and d.missing == ()
        assert d.inputs == tuple(sorted(report.coordinates[(u.unit_id, m)] for m in MODALITIES))
        assert d.decision == ("defect" if d.score >= d.threshold else "ok")
        assert (d.defect_class == "ok") == (d.decision == "ok")
        attr = d.attributions
        assert set(attr["modality"]) == set(MODALITIES)
        assert set(attr["interactions"]) == {"vision×vibration", "vision×temperature", "vibration×temperature"}
        assert attr["coalitions"] == 8 and attr["method"] == "exact"
        full_logit = math.log(d.score / (1.0 - d.score))
        # efficiency: the modality values add up to the unit's own logit minus the all-masked baseline
        assert sum(attr["modality"].values()) == pytest.approx(full_logit - attr["baseline_logit"], abs=1e-4)
        assert abs(attr["efficiency_gap"]) < EFFICIENCY_ATOL
        assert set(d.modality_scores) == set(MODALITIES)
        assert d.model_version == ModelStore(serving_store).promoted().version
        assert d.latency_ms >= 0
    assert metric_value(service, "inspection_decisions_total", decision="ok") \
        + metric_value(service, "inspection_decisions_total", decision="defect") == len(units)
    assert metric_value(service, "inspection_units_total", closed_by="complete") == len(units)
    assert metric_value(service, "inspection_batch_size_count") >= len(units) / 32


def test_missing_modalities_are_marked_and_late_readings_dead_lettered(
        broker, topics, composite_units, service_config, run_service, publish, read_topic, parse_decisions,
        dlq_headers, metric_value):
    units = composite_units[:60]
    # temperature of the first 20 units never arrives; vibration of units 20-39 arrives 6 s after the rest,
    # i.e. after the 3 s join timeout closed their unit: those readings are late
    no_temperature = units[:20]
    late_vibration = units[20:40]
    whole = units[40:]
    config = service_config(join={"timeout_s": 3.0, "watermark_lag_s": 3600.0})
    with run_service(config, broker.bootstrap) as service:
        publish(no_temperature, topics, FaultPlan(drop={"temperature": 1.0}))
        publish(late_vibration, topics, FaultPlan(delay_ms={"vibration": 6000}))
        publish(whole, topics)
        records = read_topic(topics.decisions, len(units))
        dead = read_topic(topics.dlq, len(late_vibration))
        stats = service.summary()
    decisions = {d.unit_id: d for d in parse_decisions(records)}
    assert len(decisions) == len(units) and len(records) == len(units)
    for u in no_temperature:
        d = decisions[u.unit_id]
        assert d.missing == ("temperature",) and d.present == ("vision", "vibration")
        assert set(d.attributions["modality"]) == {"vision", "vibration"}
        assert d.attributions["coalitions"] == 4
        assert {c.topic for c in d.inputs} == {topics.vision, topics.vibration}
    for u in late_vibration:
        d = decisions[u.unit_id]
        assert d.missing == ("vibration",) and d.present == ("vision", "temperature")
    for u in whole:
        assert decisions[u.unit_id].missing == ()
    assert len(dead) == len(late_vibration)
    late_units = set()
    for record in dead:
        h = dlq_headers(record)
        assert (h["dlq_stage"], h["dlq_reason"], h["dlq_topic"]) == ("join", "late", topics.vibration)
        assert record.topic == topics.dlq
        late_units.add(h["ce_subject"])
        assert record.key.decode() == h["ce_subject"]
    assert late_units == {u.unit_id for u in late_vibration}
    # the dead letter carries the original bytes: they decode to the reading that was sent
    from inspection.codec import decode_reading

    by_id = {u.unit_id: u for u in late_vibration}
    for record in dead:
        original = [(k, v) for k, v in record.headers if not k.startswith("dlq_")]
        reading = decode_reading(record.value, original, key=record.key, expected_modality="vibration")
        assert reading == by_id[reading.unit_id].vibration
    assert stats["late_readings"] == len(late_vibration)
    assert metric_value(service, "inspection_join_timeouts_total") == len(no_temperature) + len(late_vibration)
    assert metric_value(service, "inspection_dlq_total", stage="join", reason="late") == len(late_vibration)


def load_bad_inputs():
    """The codec's bad-input table (tests/inspection/test_codec.py), loaded from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "inspection" / "test_codec.py"
    spec = importlib.util.spec_from_file_location("codec_bad_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BAD_INPUTS


#: Service limits between the good units below and the table's small-limit cases: a good unit's largest
#: payload (an 80x80 noise PNG, ~6.5 kB; 1x2000 float32 vibration, 8 kB) fits, the table's 200x200 noise PNG
#: (~40 kB) does not; 2000x2000 pixels and 128 channels are over, 80x80 pixels and 2 channels under.
SERVICE_LIMITS = {"max_payload_bytes": 16_384, "max_pixels": 1_000_000, "max_channels": 4, "max_values": 4_000}


def test_every_bad_input_is_dead_lettered_with_its_reason_and_good_units_still_decided(
        broker, topics, unit_factory, service_config, run_service, read_topic, parse_decisions, dlq_headers,
        metric_value):
    from services.clients import make_producer
    from services.publish import publish_units
    from services.rawbatch import RawMessage, partition_for, produce_batch

    bad_inputs = load_bad_inputs()
    assert len(bad_inputs) >= 40 and len({case[-1] for case in bad_inputs}) >= 20  # the whole table, not a sample
    rng = np.random.default_rng(7)
    good = [unit_factory(i, rng) for i in range(30)]
    config = service_config(limits=SERVICE_LIMITS)
    sent = {}
    with run_service(config, broker.bootstrap) as service:
        producer = make_producer(broker.bootstrap)
        try:
            publish_units(producer, good[:15], topics)
            for name, factory, modality, _limits, reason in bad_inputs:
                msg = factory()
                topic = topics.for_modality(modality)
                if any(v is None for _, v in msg.headers):
                    # a header without a value: the protocol allows it (librdkafka and the Java client send
                    # them), kafka-python refuses one, so this record is written as a raw batch
                    partition = partition_for(msg.key, 3)
                    offset = produce_batch(broker.bootstrap, topic, partition,
                                           [RawMessage(msg.key, msg.value, list(msg.headers), msg.timestamp_ms)])
                else:
                    md = producer.send(topic, key=msg.key, value=msg.value, headers=list(msg.headers),
                                       timestamp_ms=msg.timestamp_ms).get(timeout=30)
                    partition, offset = md.partition, md.offset
                sent[(topic, partition, offset)] = (name, reason, msg)
            publish_units(producer, good[15:], topics)
        finally:
            producer.close(timeout=10)
        dead = read_topic(topics.dlq, len(bad_inputs))
        records = read_topic(topics.decisions, len(good))
    decisions = parse_decisions(records)
    assert sorted(d.unit_id for d in decisions) == sorted(u.unit_id for u in good)
    assert all(d.missing == () for d in decisions)
    assert len(dead) == len(bad_inputs)
    seen = {}
    for record in dead:
        h = dlq_headers(record)
        where = (h["dlq_topic"], int(h["dlq_partition"]), int(h["dlq_offset"]))
        name, reason, msg = sent[where]
        assert (h["dlq_stage"], h["dlq_reason"]) == ("deserialize", reason.value), name
        assert h["dlq_detail"]
        # original bytes and headers, unchanged and in order, before the dlq_* headers
        assert record.key == msg.key and (record.value or b"") == msg.value, name
        original = [(k, v) for k, v in record.headers if not k.startswith("dlq_")]
        assert original == [(k, b"" if v is None else v) for k, v in msg.headers], name
        nulls = [k for k, v in msg.headers if v is None]
        assert h.get("dlq_null_headers") == (",".join(nulls) if nulls else None), name
        seen[name] = reason
    assert set(seen) == {case[0] for case in bad_inputs}
    counts = Counter(case[-1].value for case in bad_inputs)
    for reason, n in counts.items():
        assert metric_value(service, "inspection_dlq_total", stage="deserialize", reason=reason) == n
