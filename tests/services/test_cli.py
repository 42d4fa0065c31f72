"""The ``inspection`` command line, run as a real process (against the real broker where it needs one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from inspection.data.history import count_history, read_history
from inspection.store import ModelStore
from services.clients import make_admin

pytestmark = [pytest.mark.slow, pytest.mark.data]

EXE = str(Path(sys.executable).parent / "inspection")


def run(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_topics_produce_consume_and_archive(broker, serving_store, tmp_path):
    prefix = f"cli{uuid.uuid4().hex[:8]}."
    b = broker.bootstrap
    created = run("topics", "create", "--bootstrap", b, "--topic-prefix", prefix, "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert last_json(created.stdout)["created"][0] == f"{prefix}inspection.vision"

    mismatch = run("topics", "create", "--bootstrap", b, "--topic-prefix", prefix, "--partitions", "3")
    assert mismatch.returncode == 2 and "partition" in mismatch.stderr

    archive = tmp_path / "sent.parquet"
    produced = run("produce", "--bootstrap", b, "--topic-prefix", prefix, "--limit", "30", "--seed", "1",
                   "--drop", "temperature=1", "--delay", "vibration=50", "--archive", str(archive))
    assert produced.returncode == 0, produced.stderr
    report = last_json(produced.stdout)
    assert report["units"] == 30
    assert report["sent"] == {"vision": 30, "vibration": 30}
    assert report["dropped"] == {"temperature": 30}
    assert "CC BY-NC-SA 4.0" in produced.stderr  # licences are printed when a data set is first used
    assert count_history(archive) == 30
    archived = list(read_history(archive))
    assert all(set(a.inputs) == {"vision", "vibration"} for a in archived)
    assert all(a.inputs["vision"].topic == f"{prefix}inspection.vision" for a in archived)

    consumed = run("consume", "--bootstrap", b, "--topic-prefix", prefix, "--topic", f"{prefix}inspection.vision",
                   "--max", "30", "--idle-timeout", "20")
    assert consumed.returncode == 0, consumed.stderr
    lines = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert len(lines) == 30
    assert {line["unit_id"] for line in lines} == {a.unit.unit_id for a in archived}
    assert all((line["width"], line["height"], line["dtype"]) == (300, 300, "uint8") for line in lines)

    again = run("produce", "--bootstrap", b, "--topic-prefix", prefix, "--history", str(archive))
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["sent"] == {"vision": 30, "vibration": 30}

    # the archive re-scores: every unit decided, temperature listed as missing (it was never sent)
    from services.rescore import read_decisions

    rescored = run("rescore", "--history", str(archive), "--store", str(serving_store), "--out",
                   str(tmp_path / "rescore"), "--device", "cpu", "--no-progress")
    assert rescored.returncode == 0, rescored.stderr
    summary = last_json(rescored.stdout)
    assert summary["decided"] == 30 and summary["rejected_rows"] == 0
    decisions = list(read_decisions(tmp_path / "rescore"))
    assert {d.unit_id for d in decisions} == {a.unit.unit_id for a in archived}
    assert all(d.present == ("vision", "vibration") and d.missing == ("temperature",) for d in decisions)


def test_errors_are_explained_with_exit_code_2(tmp_path):
    env = {"INSPECTION_BOOTSTRAP": ""}
    missing = run("produce", "--limit", "1", env=env)
    assert missing.returncode == 2 and "--bootstrap is required" in missing.stderr
    bad = run("produce", "--bootstrap", "127.0.0.1:1", "--drop", "audio=0.5", env=env)
    assert bad.returncode == 2 and "MODALITY=NUMBER" in bad.stderr
    nofile = run("produce", "--bootstrap", "127.0.0.1:1", "--history", str(tmp_path / "none.parquet"), env=env)
    assert nofile.returncode == 2 and "does not exist" in nofile.stderr


def test_broker_command_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen([EXE, "broker", "--partitions", "2", "--log", str(tmp_path / "b.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("broker ready: bootstrap=127.0.0.1:"), line + proc.stderr.read()
        bootstrap = line.split("bootstrap=")[1].split()[0]
        admin = make_admin(bootstrap)
        try:
            assert {"inspection.vision", "inspection.dlq"} <= set(admin.list_topics())
        finally:
            admin.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    broker_pid = int(line.split("pid=")[1].split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(broker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the broker process {broker_pid} outlived the command")


def test_demo_without_injected_faults_decides_every_unit(tmp_path):
    """The CLI demo with nothing missing or malformed (tests/services/test_demo.py covers the faults): every unit
    is sent whole, decided once and archived; the summary goes to stdout and the output folder."""
    result = run("demo", "--units", "12", "--preset", "fast", "--store", str(tmp_path / "store"), "--rate", "0",
                 "--missing", "0", "--malformed", "0", "--out", str(tmp_path / "demo"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert json.loads(result.stdout)["units"] == summary["units"]
    assert summary["units"]["produced"] == summary["units"]["decided"] == 12
    assert summary["units"]["dead_lettered"] == 0 and summary["dlq"]["by_reason"] == {}
    assert summary["messages_sent"] == {"vision": 12, "vibration": 12, "temperature": 12, "malformed": 0}
    assert count_history(tmp_path / "demo" / "history.parquet") == 12
    assert summary["archived_units"] == 12 and summary["rescore"]["matching"] == 12


def test_models_commands_verify_before_promoting_and_refuse_a_missing_store(tmp_path):
    missing = tmp_path / "typo" / "models"
    for args in (["list"], ["promote", "m0001-deadbeef"], ["rollback"]):
        result = run("models", *args, "--store", str(missing), timeout=120)
        assert result.returncode == 2 and f"model store {missing} does not exist" in result.stderr, result.stderr
    assert not (tmp_path / "typo").exists()

    store = ModelStore(tmp_path / "models", keep=10, create=True)
    calibrated = {"threshold_version": "t1"}
    a = store.save({"w": torch.zeros(2), "thresholds": torch.tensor([0.5])}, calibrated, promote=True).version
    b = store.save({"w": torch.ones(2), "thresholds": torch.tensor([0.5])}, calibrated).version
    untrained = store.save({"w": torch.full((2,), 2.0), "thresholds": torch.tensor([float("nan")])},
                           {"threshold_version": None}).version
    tampered = store.save({"w": torch.full((2,), 3.0), "thresholds": torch.tensor([0.5])}, calibrated)
    weights = tampered.path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\xff")
    root = str(store.root)

    refused = run("models", "promote", untrained, "--store", root, timeout=120)
    assert refused.returncode == 2 and "is not calibrated" in refused.stderr, refused.stderr
    assert "run `inspection calibrate` on it first" in refused.stderr
    refused = run("models", "promote", tampered.version, "--store", root, timeout=120)
    assert refused.returncode == 2 and "is tampered or corrupted" in refused.stderr, refused.stderr
    assert store.promoted().version == a

    promoted = run("models", "promote", b, "--store", root, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    assert last_json(promoted.stdout) == {"promoted": b}
    rolled = run("models", "rollback", "--store", root, timeout=120)
    assert rolled.returncode == 0, rolled.stderr
    assert last_json(rolled.stdout) == {"promoted": a}
    listed = run("models", "list", "--store", root, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["version"], r["promoted"]) for r in rows] == [
        (a, True), (b, False), (untrained, False), (tampered.version, False)]


def test_explain_and_report_commands_write_reports_an_index_and_the_global_view(serving_store, tmp_path):
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.data.history import write_history

    units = CompositeBuilder(CompositeConfig(seed=9, temperature_source="synthetic")).units("test", 5)
    history = tmp_path / "history.parquet"
    write_history(history, units)
    out = tmp_path / "reports"
    done = run("explain", "--history", str(history), "--store", str(serving_store), "--out", str(out),
               "--level", "2", "--budget", "128", "--unit", units[1].unit_id, "--unit", units[3].unit_id)
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["reports"] == 2 and summary["level"] == 2
    reports = sorted(out.glob("*.json"))
    assert len(reports) == 3  # two units and global.json
    data = [json.loads(p.read_text()) for p in reports if p.name != "global.json"]
    assert sorted(d["unit_id"] for d in data) == sorted([units[1].unit_id, units[3].unit_id])
    assert all(d["decision"]["decision"] in ("ok", "defect") and d["model_version"] for d in data)
    assert (out / "index.html").read_text().count("<tr data-line=") == 2

    again = run("report", "--from", str(out), "--out", str(tmp_path / "index"), "--period", "hour")
    assert again.returncode == 0, again.stderr
    index = (tmp_path / "index" / "index.html").read_text()
    assert "../reports/" in index  # links to the unit pages beside their reports
    assert json.loads((tmp_path / "index" / "global.json").read_text())["period"] == "hour"

    unknown = run("explain", "--history", str(history), "--store", str(serving_store), "--out", str(tmp_path / "x"),
                  "--unit", "no-such-unit")
    assert unknown.returncode == 2 and "no-such-unit" in unknown.stderr
    empty = run("report", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert empty.returncode == 2 and "neither a report file nor a folder" in empty.stderr
