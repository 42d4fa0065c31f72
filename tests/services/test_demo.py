"""``inspection demo`` end to end: its own embedded broker, real composite units, the stream service with reports,
dead letters, re-scoring and the summary, checked against the units' labels and the files it wrote.

The demo runs with the ``fast`` preset (a weak model trained in seconds; the same code path as the standard one)
on a few dozen units; its models are trained once per module into a temporary store and reused by the later runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from inspection.errors import ConfigError
from inspection.records import Decision
from services.demo import DemoOptions, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.kafka]

EXE = str(Path(sys.executable).parent / "inspection")
UNITS, SEED, MISSING = 30, 1, 0.1
#: The reasons the codec gives the three injected malformed readings (truncated PNG, ce_time that is no time,
#: a NaN sample): docs/service.md's reason codes.
INJECTED_REASONS = {"image_decode_failed": 1, "bad_event_time": 1, "non_finite": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-store") / "models"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, store):
    """One demo run: 30 test units at 10 units/s, 3 of them without a modality, 3 malformed."""
    out = tmp_path_factory.mktemp("demo") / "run"
    words = io.StringIO()
    options = DemoOptions(units=UNITS, seed=SEED, rate=10.0, out=out, store=store, preset="fast", missing=MISSING,
                          malformed=3, progress=False, results=out.parent / "results")
    result = run_demo(options, stream=words)
    return out, result, words.getvalue()


@pytest.fixture(scope="module")
def test_units():
    """The units the demo produces, drawn independently of it: the composite test split of the seed."""
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    return CompositeBuilder(CompositeConfig(seed=SEED)).units("test", UNITS)


def decisions_table(out: Path) -> list[dict]:
    return pq.read_table(out / "decisions.parquet").to_pylist()


def test_every_unit_is_decided_or_dead_lettered_and_the_run_passes(demo, test_units):
    out, result, words = demo
    assert result.exit_code == 0, (result.failed, words[-3000:])
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["failed_checks"] == [] and all(summary["checks"].values())
    units = summary["units"]
    assert units["produced"] == UNITS
    assert units["decided"] + units["dead_lettered"] == UNITS
    assert units["dead_lettered"] == 3
    assert summary["dlq"]["by_reason"] == INJECTED_REASONS
    # the dead letters and the decisions name disjoint units that together are exactly the units produced
    decided = {row["unit_id"] for row in decisions_table(out)}
    lettered = {letter["unit_id"] for letter in summary["dlq"]["letters"]}
    assert not decided & lettered
    assert decided | lettered == {u.unit_id for u in test_units}
    assert {letter["stage"] for letter in summary["dlq"]["letters"]} == {"deserialize"}
    assert "OK: every check passed" in words


def test_decisions_parquet_has_one_row_per_decided_unit_and_lists_the_missing_modalities(demo, test_units):
    out, result, _ = demo
    rows = decisions_table(out)
    assert len(rows) == UNITS - 3 == result.summary["units"]["decided"]
    assert len({r["unit_id"] for r in rows}) == len(rows)
    lacking = [r for r in rows if r["missing"]]
    assert len(lacking) == round(MISSING * UNITS)  # each sent without exactly one modality
    assert all(len(r["missing"]) == 1 and len(r["present"]) == 2 for r in lacking)
    assert all(len(r["present"]) == 3 for r in rows if not r["missing"])
    # the accuracy in the summary is the decisions' agreement with the units' own labels
    labels = {u.unit_id: u.label.defect for u in test_units}
    right = sum((r["decision"] == "defect") == labels[r["unit_id"]] for r in rows)
    assert result.summary["quality"]["fused"]["accuracy"] == pytest.approx(right / len(rows))
    assert result.summary["quality"]["units"] == len(rows)
    defects = sum(labels[r["unit_id"]] for r in rows)
    majority = result.summary["quality"]["majority"]
    expected = defects if majority["class"] == "defect" else len(rows) - defects
    assert majority["accuracy"] == pytest.approx(expected / len(rows))


def test_the_result_file_holds_the_runs_numbers_with_its_provenance(demo, test_units):
    out, result, words = demo
    name = "demo.json" if result.summary["temperature_source"] == "skab" else "demo_synthetic.json"
    assert [p.name for p in (out.parent / "results").iterdir()] == [name]
    saved = json.loads((out.parent / "results" / name).read_text())
    head = saved["summary"]
    assert head["benchmark"] == name.removesuffix(".json")
    assert all(head[k] for k in ("machine", "commit", "command", "date"))
    assert result.summary["result_file"] == str(out.parent / "results" / name)
    # the headline accuracy and F1 are the decisions' agreement with the units' labels
    labels = {u.unit_id: u.label.defect for u in test_units}
    rows = decisions_table(out)
    said = [r["decision"] == "defect" for r in rows]
    truth = [labels[r["unit_id"]] for r in rows]
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    wrong = sum(s != t for s, t in zip(said, truth, strict=True))
    assert head["decided"] == len(rows) and head["defects"] == sum(truth)
    assert head["accuracy"] == pytest.approx(1 - wrong / len(rows))
    assert head["f1"] == pytest.approx(tp / (tp + 0.5 * wrong) if tp + wrong else 1.0)
    # the baselines' numbers are the summary's, and the words say the same
    late = result.summary["quality"]["late_fusion"]
    assert (head["late_fusion_accuracy"], head["late_fusion_f1"]) == (late["accuracy"], late["f1"])
    assert f"accuracy {head['accuracy']:.3f}, F1 {head['f1']:.3f}" in words
    assert head["p50_ms"] <= head["p99_ms"] and head["units_per_s"] > 0 and head["failed_checks"] == []


def test_a_model_of_an_older_recipe_is_trained_afresh(demo, store, monkeypatch):
    import dataclasses

    from services import demo_model

    assert not demo_model.preset_model_needed(store, "fast", seed=SEED)  # the run's own model serves
    fast = demo_model.PRESETS["fast"]
    newer = dataclasses.replace(fast, training=dataclasses.replace(fast.training, epochs=fast.epochs + 1))
    monkeypatch.setitem(demo_model.PRESETS, "fast", newer)
    assert demo_model.preset_model_needed(store, "fast", seed=SEED)


def test_report_index_links_a_report_of_every_defect_decision(demo):
    out, result, _ = demo
    rows = decisions_table(out)
    defects = [r for r in rows if r["decision"] == "defect"]
    assert defects, "the fast model flagged no defect: nothing to explain"
    index = out / "reports" / "index.html"
    assert result.summary["reports"]["index"] == str(index)
    links = re.findall(r'<a href="([^"]+\.html)">', index.read_text())
    assert len(links) == len(defects)
    assert all((index.parent / link).is_file() for link in links)
    for row in defects:  # the stream's decisions link their reports, written before the decision was sent
        url = Decision.from_json(row["cloudevent"].encode()).report_url
        assert url and url.startswith("file://")
        assert Path(urllib.request.url2pathname(url[len("file://"):])).is_file()


def test_rescored_archive_equals_the_stream(demo):
    from services.rescore import read_decisions

    out, result, _ = demo
    stream = {r["unit_id"]: (r["decision_id"], r["decision"]) for r in decisions_table(out)}
    again = {d.unit_id: (d.id, d.decision) for d in read_decisions(out / "rescore")}
    assert again == stream
    assert result.summary["rescore"]["matching"] == len(stream)


def test_a_second_run_reuses_the_store_and_serves_the_page_until_interrupted(demo, store, tmp_path):
    """``--keep-running`` (the CLI, a real process) on the models the first run trained: nothing is trained again,
    the page serves the decisions and their reports until Ctrl-C (SIGINT), which ends the demo with exit code 0
    and takes the page down. Without SKAB the summary says the temperature was synthetic."""
    before = {p.name for p in store.iterdir()}
    # PYTHONFAULTHANDLER: a demo that does not end is aborted below, and its threads' stacks say where it hung
    env = {**os.environ, "INSPECTION_SKAB_DIR": str(tmp_path / "no-skab"), "PYTHONFAULTHANDLER": "1"}
    # a person's Ctrl-C reaches a foreground demo; a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, so the demo is started with Ctrl-C's default action, as at a terminal
    foreground = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", foreground, EXE, "demo", "--preset", "fast", "--store", str(store),
                             "--units", "8", "--rate", "0", "--seed", str(SEED), "--out", str(tmp_path / "demo"),
                             "--keep-running"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        url = None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"stay up: (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, "".join(lines)[-4000:]
        with urllib.request.urlopen(url + "api/decisions", timeout=10) as response:
            assert response.status == 200
            page = json.loads(response.read())
        summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
        shown = {d["unit_id"]: d for d in page["decisions"]}
        decided = {r["unit_id"] for r in decisions_table(tmp_path / "demo")}
        assert set(shown) == decided and len(decided) == 8 - 3
        reported = [d["report"] for d in shown.values() if d["decision"] == "defect"]
        assert all(reported)
        for link in reported:  # the page serves each defect's report
            with urllib.request.urlopen(url + link.lstrip("/"), timeout=10) as response:
                assert response.status == 200 and b"<html" in response.read(2000).lower()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail("the demo did not end within 120 s of Ctrl-C; its threads:\n" + err[-8000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines.append(err)
    text = "".join(lines)
    assert proc.returncode == 0, text[-4000:]
    assert "no calibrated model" not in text and "epoch 1/1" not in text  # the first run's models were reused
    assert {p.name for p in store.iterdir()} == before
    assert summary["temperature_source"] == "synthetic"
    assert "synthetic temperature" in text
    assert json.loads(out)["units"]["produced"] == 8
    with pytest.raises(OSError):  # the page went down with the demo
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("units", 0, "--units must be >= 1; got 0"),
    ("rate", -1.0, "--rate must be >= 0 units/s"),
    ("missing", 1.0, "--missing must be a share in [0, 1)"),
    ("malformed", -2, "--malformed must be >= 0"),
    ("preset", "huge", "unknown demo preset 'huge'"),
])
def test_invalid_options_are_refused_before_anything_runs(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DemoOptions(**{field: value, "out": tmp_path / "out", "store": tmp_path / "store"})
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_bad_rate_with_exit_code_2(tmp_path):
    result = subprocess.run([EXE, "demo", "--rate", "-1", "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["inspection: error: --rate must be >= 0 units/s (0: as fast as "
                                                  "possible); got -1.0"]
    assert result.stdout == "" and not any(tmp_path.iterdir())


def test_dead_letter_reasons_count_once_per_injected_reading(demo):
    _, result, _ = demo
    letters = result.summary["dlq"]["letters"]
    assert Counter(letter["reason"] for letter in letters) == Counter(INJECTED_REASONS)
    assert {letter["topic"] for letter in letters} == {"inspection.vision", "inspection.temperature",
                                                       "inspection.vibration"}
