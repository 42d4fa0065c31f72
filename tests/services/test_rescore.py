"""Re-scoring history: identity with the stream, resume, bad input, audit (real broker, real service, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from inspection.data.history import read_history, write_history
from inspection.store import ModelStore
from services.rescore import read_decisions, rescore_local
from services.scoring import load_serving_model

#: The stream scores units in micro-batches as they arrive, re-scoring in its own batches: the same code and
#: model, but float32 matrix products over different batch shapes may round differently (on this CPU the
#: scores came out bit-identical). Decisions, classes and ids must be identical.
SCORE_TOLERANCE = 1e-5


def _wait(condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory, broker, serving_store, unit_factory):
    """The stream service decides 40 units with its archive sink on; returns (archive folder, decisions)."""
    import uuid

    from services.broker import TopicNames, create_topics
    from services.clients import make_consumer, make_producer, wait_for_assignment
    from services.publish import publish_units
    from services.readback import drain
    from services.serve import StreamService
    from services.service_config import ServiceConfig

    tmp = tmp_path_factory.mktemp("rescore-stream")
    topics = TopicNames.with_prefix(f"rs{uuid.uuid4().hex[:6]}.")
    create_topics(broker.bootstrap, topics, 3)
    rng = np.random.default_rng(61)
    units = [unit_factory(i, rng) for i in range(40)]
    units[5] = units[5].without("vibration")  # decided without it: listed as missing
    config = ServiceConfig.from_mapping({
        "model": {"store": str(serving_store), "device": "cpu", "reload_interval_s": 0},
        "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
        "join": {"timeout_s": 3.0},
        "kafka": {"group_id": f"rs-{uuid.uuid4().hex[:8]}", "commit_interval_ms": 200},
        "archive": {"path": str(tmp / "archive"), "rotate_units": 15, "rotate_s": 60},
        "metrics": {"port": 0},
    })
    import threading

    service = StreamService(config, broker.bootstrap)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: service.wait_ready(0.2))
        producer = make_producer(broker.bootstrap)
        try:
            publish_units(producer, units, topics)
        finally:
            producer.close(timeout=10)
        _wait(lambda: service.stats.decisions_acked == len(units))
    finally:
        service.stop()
        thread.join(120)
    consumer = make_consumer([topics.decisions], broker.bootstrap, f"read-{uuid.uuid4().hex[:8]}")
    try:
        wait_for_assignment(consumer, timeout_s=30)
        records = list(drain(consumer, max_messages=len(units), idle_timeout_s=10))
    finally:
        consumer.close(autocommit=False)
    from inspection.records import Decision

    decisions = [Decision.from_json(r.value) for r in records]
    jsonl = tmp / "decisions.jsonl"
    jsonl.write_text("".join(r.value.decode() + "\n" for r in records))
    return tmp / "archive", decisions, jsonl


@pytest.fixture(scope="module")
def serving(serving_store):
    return load_serving_model(ModelStore(serving_store), None, torch.device("cpu"))


def test_rescoring_the_streams_archive_reproduces_its_decisions(stream_run, serving, tmp_path):
    archive, decisions, _ = stream_run
    result = rescore_local(archive, serving, tmp_path / "out", batch_size=7, progress=False)
    assert result.decided == len(decisions) == 40 and result.rejected == []
    again = {d.id: d for d in read_decisions(tmp_path / "out")}
    assert set(again) == {d.id for d in decisions}  # same ids: unit, model version, input coordinates
    worst = 0.0
    for d in decisions:
        r = again[d.id]
        assert (r.decision, r.defect_class, r.present, r.missing, r.threshold) == \
            (d.decision, d.defect_class, d.present, d.missing, d.threshold)
        worst = max(worst, abs(r.score - d.score))
        assert r.attributions["modality"].keys() == d.attributions["modality"].keys()
    print(f"largest score difference stream vs re-score: {worst:.2e}")
    assert worst <= SCORE_TOLERANCE
    # hive layout by line and day; run.json states the run
    parts = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.parquet"))
    assert all(str(p).startswith(f"decisions/model_version={serving.version}/line_id=") and "/day=" in str(p)
               for p in parts)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["decided"] == 40 and run["model_version"] == serving.version and run["rejected_rows"] == 0
    assert run["config"]["batch_size"] == 7 and run["config"]["engine"] == "local"  # the run's resolved config
    # start-up and scoring time apart: the rate once scoring runs is at least the whole run's
    assert 0.0 <= run["seconds_to_scoring"] < run["seconds"]
    assert run["units_per_s_scoring"] >= run["units_per_s"] > 0


def test_an_interrupted_run_leaves_no_partial_partition_and_the_next_one_resumes(stream_run, serving, tmp_path):
    archive, decisions, _ = stream_run
    out = tmp_path / "out"
    stopped = []

    def interrupt(decided: int) -> None:
        if decided >= 14 and not stopped:
            stopped.append(decided)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rescore_local(archive, serving, out, batch_size=7, progress=False, on_batch=interrupt)
    visible = [p for p in out.rglob("*.parquet") if not any(s.startswith("_") for s in p.relative_to(out).parts)]
    partial = [p for p in out.rglob("*") if p.name.startswith("_partial")]
    assert partial == []  # the interrupted run cleaned up after itself
    finished = sum(pq.ParquetFile(p).metadata.num_rows for p in visible)
    result = rescore_local(archive, serving, out, batch_size=7, progress=False)
    assert result.skipped_done == finished  # the partitions done before were not scored again
    ids = Counter(d.id for d in read_decisions(out))
    assert set(ids) == {d.id for d in decisions} and set(ids.values()) == {1}  # nothing missing, nothing twice
    assert rescore_local(archive, serving, out, progress=False).decided == 0  # all done: nothing to do


def test_bad_files_and_rows_are_reported_and_the_rest_completes(stream_run, serving, tmp_path):
    archive, decisions, _ = stream_run
    units = [a for f in sorted(archive.glob("*.parquet")) for a in read_history(f)]
    folder = tmp_path / "history"
    write_history(folder / "good.parquet", units[:20])
    # a row whose vision payload is not an image: the codec rejects it, the row is reported
    table = pq.read_table(folder / "good.parquet")
    rows = table.to_pylist()
    rows[3]["vision"]["value"] = b"\x89PNG\r\n\x1a\n" + b"junk" * 10
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), folder / "one-bad-row.parquet")
    (folder / "not-parquet.parquet").write_bytes(b"PAR1 this is not a parquet file")
    pq.write_table(type(table).from_pylist([{"x": 1}]), folder / "foreign.parquet")
    result = rescore_local(folder, serving, tmp_path / "out", progress=False)
    reasons = Counter(r.reason for r in result.rejected)
    assert reasons["unreadable_file"] == 2
    assert sum(v for k, v in reasons.items() if k != "unreadable_file") == 1
    bad = next(r for r in result.rejected if r.reason != "unreadable_file")
    assert bad.file.endswith("one-bad-row.parquet") and bad.row == 3
    assert result.decided == 20 + 19  # every other unit of both readable files
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(run["unreadable_files"]) == sorted(str(folder / n) for n in ("foreign.parquet", "not-parquet.parquet"))


def test_audit_reproduces_a_stream_decision_and_flags_a_tampered_one(stream_run, serving_store, tmp_path):
    archive, decisions, jsonl = stream_run
    exe = [sys.executable, "-m", "services.cli", "audit"]
    target = next(d for d in decisions if abs(d.score - d.threshold) > 0.05 and d.score < 0.98)
    ok = subprocess.run([*exe, target.id, "--history", str(archive), "--store", str(serving_store),
                         "--decisions", str(jsonl)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["matches"] and report["unit_id"] == target.unit_id
    assert abs(report["score_difference"]) <= SCORE_TOLERANCE
    lines = jsonl.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    tampered = next(e for e in events if e["id"] == target.id)
    tampered["data"]["score"] = min(1.0, tampered["data"]["score"] + 0.01)
    (tmp_path / "tampered.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    bad = subprocess.run([*exe, target.id, "--history", str(archive), "--store", str(serving_store),
                          "--decisions", str(tmp_path / "tampered.jsonl")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["matches"] is False
    unknown = subprocess.run([*exe, "0" * 32, "--history", str(archive), "--store", str(serving_store),
                              "--decisions", str(jsonl)], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "is not in" in unknown.stderr


def test_change_report_counts_exactly_the_flips_of_a_threshold_change(stream_run, serving_store, serving, tmp_path):
    import shutil

    from inspection.calibration import fixed_calibration
    from inspection.experiments import load_model

    archive, decisions, _ = stream_run
    store_dir = tmp_path / "store"
    shutil.copytree(serving_store, store_dir)
    store = ModelStore(store_dir)
    old_version = store.promoted().version
    model, card = load_model(store, old_version)
    scores = sorted(d.score for d in decisions)
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # between two scores: no ties
    model, cal = fixed_calibration(model, threshold)
    card = {k: v for k, v in card.items() if k not in ("version", "created", "weights_file", "weights_sha256",
                                                        "weights_bytes", "tensors", "format")}
    new = store.save(model.state_dict(), {**card, "model_config": model.config.to_dict(),
                                          "threshold_version": cal.version, "calibration": cal.to_dict()},
                     promote=True)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "services.cli", "rescore", "--history", str(archive), "--store",
                          str(store_dir), "--compare", old_version, "--out", str(out), "--no-progress",
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == new.version
    # expected from the stream's own decisions: the scores do not depend on the threshold
    ups = sum(d.decision == "ok" and d.score >= threshold for d in decisions)
    downs = sum(d.decision == "defect" and d.score < threshold for d in decisions)
    report = json.loads((out / "changes.json").read_text())
    assert report["units_compared"] == len(decisions) and report["only_new"] == report["only_old"] == 0
    assert report["flips"] == {"ok_to_defect": ups, "defect_to_ok": downs, "total": ups + downs}
    assert ups + downs > 0
    assert sum(r["ok_to_defect"] + r["defect_to_ok"] for r in report["by_line_day"]) == ups + downs
    assert sum(report["score_shift"]["counts"]) == len(decisions) and report["score_shift"]["mean_abs"] == 0.0
    page = (out / "changes.html").read_text()
    assert f"<strong>{ups + downs}</strong> decisions flip" in page
    assert summary["changes"]["flips"]["total"] == ups + downs


def test_level2_reports_are_written_and_linked_from_the_rescored_decisions(stream_run, serving, tmp_path):
    from explain.report import check_report, report_stem
    from services.reports import StreamReporter

    archive, decisions, _ = stream_run
    folder = tmp_path / "history"
    write_history(folder / "h.parquet", [a for f in sorted(archive.glob("*.parquet")) for a in read_history(f)][:10])
    reporter = StreamReporter(tmp_path / "out" / "reports", units="all", level=2, budget=256)
    result = rescore_local(folder, serving, tmp_path / "out", progress=False, reporter=reporter)
    assert result.decided == 10
    for d in read_decisions(tmp_path / "out"):
        stem = report_stem(d.id)
        assert d.report_url and d.report_url.endswith(f"{stem}.html")
        report = json.loads((tmp_path / "out" / "reports" / f"{stem}.json").read_text())
        check_report(report)
        assert report["explanation"]["level"] == 2 and report["decision"]["score"] == d.score


def test_cli_refuses_an_unknown_version_a_small_budget_and_missing_history(stream_run, serving_store, tmp_path):
    archive, _, _ = stream_run
    base = [sys.executable, "-m", "services.cli", "rescore", "--store", str(serving_store), "--out",
            str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    cases = [
        (["--history", str(archive), "--compare", "m9999-deadbeef"], "m9999-deadbeef"),
        (["--history", str(archive), "--explain", "2", "--budget", "2"], "--budget 2 is below"),
        (["--history", str(tmp_path / "nothing-*.parquet")], "no history files match"),
    ]
    for extra, message in cases:
        run = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, (extra, run.stderr[-2000:])
        assert message in run.stderr, (extra, run.stderr[-2000:])
    assert not (tmp_path / "out" / "decisions").exists()  # nothing was scored by a refused run


def test_global_view_over_decision_history(stream_run, serving, tmp_path):
    from explain.global_ import summarize

    archive, decisions, _ = stream_run
    rescore_local(archive, serving, tmp_path / "out", progress=False)
    run = subprocess.run([sys.executable, "-m", "services.cli", "report", "--from", str(tmp_path / "out"), "--out",
                          str(tmp_path / "view")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["decisions"] == len(decisions)
    overview = json.loads((tmp_path / "view" / "global.json").read_text())
    assert overview["units"] == len(decisions)
    # the mean |phi| of each modality, recomputed from the stream's own decisions
    for row in overview["modalities"]:
        values = [d.attributions["modality"][row["name"]] for d in decisions
                  if row["name"] in d.attributions["modality"]]
        assert row["units"] == len(values)
        assert row["mean_abs_phi"] == pytest.approx(float(np.mean(np.abs(values))), rel=1e-4)
    culprits = Counter(max(d.attributions["modality"], key=d.attributions["modality"].get) for d in decisions)
    assert overview["culprits"] == dict(culprits)
    assert sum(p["units"] for p in overview["periods"]) == len(decisions)
    page = (tmp_path / "view" / "index.html").read_text()
    assert page.count("<tr data-line=") == len(decisions)
    assert summarize([])["units"] == 0


def test_the_ray_engine_writes_what_the_local_engine_writes(stream_run, serving_store, serving, tmp_path):
    from services.rescore import rescore_ray

    archive, decisions, _ = stream_run
    local = rescore_local(archive, serving, tmp_path / "local", progress=False)
    remote = rescore_ray(archive, serving_store, serving.version, tmp_path / "ray", workers=2)
    assert (remote.decided, remote.partitions_written, len(remote.rejected)) == \
        (local.decided, local.partitions_written, len(local.rejected)) == (len(decisions), local.partitions_written, 0)
    for part in sorted((tmp_path / "local" / "decisions").rglob("*.parquet")):
        other = tmp_path / "ray" / part.relative_to(tmp_path / "local")
        a, b = pq.read_table(part).to_pylist(), pq.read_table(other).to_pylist()
        assert [r["decision_id"] for r in a] == [r["decision_id"] for r in b]  # same rows, same order
        for x, y in zip(a, b, strict=True):
            assert (x["decision"], x["defect_class"], x["source_file"], x["source_row"]) == \
                (y["decision"], y["defect_class"], y["source_file"], y["source_row"])
            assert abs(x["score"] - y["score"]) <= SCORE_TOLERANCE
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["engine"] == "ray" and run["decided"] == len(decisions)
    assert 0.0 < run["seconds_to_scoring"] < run["seconds"]  # the actors' first task began after the cluster started
    assert run["units_per_s_scoring"] >= run["units_per_s"] > 0
