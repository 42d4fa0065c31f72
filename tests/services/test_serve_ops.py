"""Operating the stream service against the real broker: metrics and probes, drift, model hot reload, the
Parquet archive, graceful shutdown with its final commit, and backpressure."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import torch

from inspection.data.history import read_history
from inspection.store import ModelStore
from services.scoring import load_serving_model

pytestmark = [pytest.mark.slow]


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def small_units(unit_factory, n: int, seed: int, start: int = 0):
    rng = np.random.default_rng(seed)
    return [unit_factory(i, rng) for i in range(start, start + n)]


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_probes_and_drift(broker, topics, unit_factory, service_config, run_service, publish):
    units = small_units(unit_factory, 80, seed=21)
    config = service_config(drift={"window": 20})
    with run_service(config, broker.bootstrap) as service:
        base = f"http://127.0.0.1:{service.metrics_port}"
        assert service._ops.host == "127.0.0.1"
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz")[0] == 200
        publish(units, topics)
        wait_until(lambda: service.stats.decisions_acked == len(units), what="decisions")
        code, content_type, text = get(f"{base}/metrics")
        assert get(f"{base}/nothing")[0] == 404
    assert code == 200 and content_type.startswith("text/plain")
    for name in ("inspection_readings_total", "inspection_units_total", "inspection_decisions_total",
                 "inspection_stage_seconds_bucket", "inspection_batch_size_bucket", "inspection_queue_depth",
                 "inspection_pending_units", "inspection_join_timeouts_total", "inspection_expert_load",
                 "inspection_gate_entropy", "inspection_expert_max_load_ratio", "inspection_drift_p_value",
                 "inspection_drift_detected", "inspection_model_info", "inspection_commits_total", "inspection_ready"):
        assert name in text, name
    for stage in ("decode", "join", "queue", "score", "produce", "end_to_end"):
        assert f'inspection_stage_seconds_count{{stage="{stage}"}}' in text, stage
    assert 'inspection_readings_total{modality="vision"} 80.0' in text
    # the small model has one MoE layer of 4 experts: the load shares of the last batch sum to 1
    loads = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith('inspection_expert_load{expert=') or line.startswith('inspection_expert_load{layer=')]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0, abs=1e-5)
    entropy = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("inspection_gate_entropy{")]
    assert len(entropy) == 1 and 0.0 <= entropy[0] <= np.log(4) + 1e-6
    # 80 units with every modality: a 20-score reference, then 3 test windows per modality
    p_values = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("inspection_drift_p_value{")}
    assert set(p_values) == {"vision", "vibration", "temperature"}
    assert all(0.0 <= p <= 1.0 for p in p_values.values())
    version = ModelStore(config.model.store).promoted().version
    assert f'inspection_model_info{{threshold_version="t-test-0",version="{version}"}} 1.0' in text


def test_model_hot_reload_switches_between_batches(broker, topics, unit_factory, serving_store_factory,
                                                   service_config, run_service, publish, read_topic,
                                                   parse_decisions, metric_value, tmp_path):
    store_root = serving_store_factory(tmp_path / "store")
    store = ModelStore(store_root)
    first = store.promoted().version
    config = service_config(model={"store": str(store_root), "device": "cpu", "reload_interval_s": 0.2})
    before, after = small_units(unit_factory, 20, seed=31), small_units(unit_factory, 20, seed=32, start=20)
    with run_service(config, broker.bootstrap) as service:
        publish(before, topics)
        wait_until(lambda: service.stats.decisions_acked == 20, what="decisions of the first model")
        # promote a second, different model, then an uncalibrated one that must be refused
        serving_store_factory(store_root, variant=3)
        second = store.promoted().version
        wait_until(lambda: service.model_version == second, what="the hot reload")
        publish(after, topics)
        wait_until(lambda: service.stats.decisions_acked == 40, what="decisions of the second model")
        state, card = store.load(second)
        state["thresholds"] = torch.full_like(state["thresholds"], float("nan"))
        store.save(state, {**{k: v for k, v in card.items() if k not in (
            "version", "created", "weights_file", "weights_sha256", "weights_bytes", "tensors", "format")},
            "threshold_version": None}, promote=True)
        wait_until(lambda: metric_value(service, "inspection_model_reloads_total", result="failed") == 1,
                   what="the refused reload")
        assert service.model_version == second
        reloads_ok = metric_value(service, "inspection_model_reloads_total", result="ok")
    decisions = {d.unit_id: d for d in parse_decisions(read_topic(topics.decisions, 40))}
    assert {decisions[u.unit_id].model_version for u in before} == {first}
    assert {decisions[u.unit_id].model_version for u in after} == {second}
    assert {decisions[u.unit_id].threshold_version for u in after} == {"t-test-3"}
    assert reloads_ok == 1
    # the second model's scores, exactly as that model gives them
    serving = load_serving_model(store, second, torch.device("cpu"))
    with torch.no_grad():
        direct = serving.model(serving.model.batch(after)).score.tolist()
    np.testing.assert_allclose([decisions[u.unit_id].score for u in after], direct, rtol=0, atol=1e-5)


def test_archive_graceful_shutdown_and_final_commit(broker, topics, group_id, unit_factory, service_config,
                                                    run_service, publish, read_topic, parse_decisions, tmp_path):
    units = small_units(unit_factory, 60, seed=41)
    archive = tmp_path / "archive"
    config = service_config(archive={"path": str(archive), "rotate_units": 25, "rotate_s": 60},
                            kafka={"group_id": group_id, "commit_interval_ms": 60_000})
    with run_service(config, broker.bootstrap) as service:
        publish(units, topics)
        wait_until(lambda: service.stats.decisions_acked == len(units), what="decisions")
        # commits every 60 s: nothing has been committed yet; the graceful stop must commit
        assert service.stats.commits == 0
    assert service.stats.commits == 1
    decisions = {d.unit_id: d for d in parse_decisions(read_topic(topics.decisions, len(units)))}
    files = sorted(archive.glob("units-*.parquet"))
    assert len(files) == 3  # 25 + 25 + the 10 written at shutdown
    archived = [a for f in files for a in read_history(f)]
    assert sorted(a.unit.unit_id for a in archived) == sorted(u.unit_id for u in units)
    by_id = {u.unit_id: u for u in units}
    for a in archived:
        assert a.unit.readings == by_id[a.unit.unit_id].readings  # bytes as they were on the wire
        assert tuple(sorted(a.inputs.values())) == decisions[a.unit.unit_id].inputs
    # a new member of the same group starts after the committed offsets: it decides nothing again
    with run_service(service_config(kafka={"group_id": group_id}), broker.bootstrap) as again:
        time.sleep(3.0)
        assert again.stats.records == 0
    assert len(read_topic(topics.decisions, len(units), idle_s=3.0)) == len(units)


def test_backpressure_pauses_input_and_bounds_the_queue(broker, topics, composite_units, service_config,
                                                        run_service, publish, metric_value):
    backlog, live = composite_units[:300], composite_units[300:340]
    config = service_config(join={"buffer_records": 10},
                            batching={"max_batch": 4, "max_delay_ms": 0, "max_queue": 8},
                            kafka={"max_poll_records": 6})
    with run_service(config, broker.bootstrap) as service:
        publish(backlog, topics)
        wait_until(lambda: service.stats.decisions_acked == len(backlog), timeout_s=120, what="backlog decisions")
        # after pausing and resuming, every partition is read again: live units join whole
        publish(live, topics, rate=20.0)
        wait_until(lambda: service.stats.decisions_acked == len(backlog) + len(live), timeout_s=60,
                   what="live decisions")
        stats = service.summary()
        complete = metric_value(service, "inspection_units_total", closed_by="complete")
    assert stats["backpressure_pauses"] >= 1
    assert complete == len(backlog) + len(live)  # nothing waited for a join timeout
    # each released reading closes at most one unit and no more are released than the queue has room for
    assert 4 <= stats["max_queue_depth"] <= 8
