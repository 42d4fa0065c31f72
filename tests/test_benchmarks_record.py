"""The published numbers are the measured ones: every result file says how it was made, every result file the
docs name exists, and BENCHMARKS.md states each headline number as its result file holds it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()


def _summary(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["summary"]


def _get(data: dict, path: str):
    for key in path.split("."):
        data = data[key]
    return data


#: (result file, key path in its summary, how BENCHMARKS.md writes it)
HEADLINES = [
    ("elpv", "value", lambda v: f"{100 * v:.1f} %"),
    ("elpv", "auroc", lambda v: f"{v:.3f}"),
    ("composite", "value", lambda v: f"{v:.3f}"),
    ("composite", "auroc", lambda v: f"{v:.3f}"),
    ("bearings", "value", lambda v: f"{100 * v:.1f} %"),
    ("skab", "value", lambda v: f"{v:.3f}"),
    ("normal_only", "value.composite", lambda v: f"{v:.3f}"),
    ("normal_only", "value.elpv", lambda v: f"{v:.3f}"),
    ("adapt", "f1_base", lambda v: f"{v:.3f}"),
    ("adapt", "f1_lora_500", lambda v: f"{v:.3f}"),
    ("adapt", "f1_lora_wide_500", lambda v: f"{v:.3f}"),
    ("adapt", "f1_full_500", lambda v: f"{v:.3f}"),
    ("adapt", "f1_scratch_500", lambda v: f"{v:.3f}"),
    ("adapt", "mixed_line_batch_ratio", lambda v: f"{v:.2f}×"),
    ("trace", "ms.untraced", lambda v: f"{v:.2f} ms"),
    ("trace", "ms.traced_own_rows", lambda v: f"{v:.2f} ms"),
    ("stream_cpu", "units_per_s", lambda v: f"{v:.1f}"),
    ("soak", "p99_ms", lambda v: f"{v:.0f} ms"),
    ("chaos", "dead_lettered", lambda v: f"{v}"),
    ("rescore", "local_units_per_s", lambda v: f"{v:.1f}"),
    ("demo", "accuracy", lambda v: f"{v:.3f}"),
    ("demo", "f1", lambda v: f"{v:.3f}"),
    ("demo", "late_fusion_accuracy", lambda v: f"{v:.3f}"),
    ("demo", "late_fusion_f1", lambda v: f"{v:.3f}"),
    ("demo", "majority_accuracy", lambda v: f"{v:.3f}"),
    ("demo_synthetic", "accuracy", lambda v: f"{v:.3f}"),
    ("demo_synthetic", "f1", lambda v: f"{v:.3f}"),
    ("demo_synthetic", "late_fusion_accuracy", lambda v: f"{v:.3f}"),
    ("demo_synthetic", "late_fusion_f1", lambda v: f"{v:.3f}"),
    ("demo", "culprit_share", lambda v: f"{100 * v:.0f} %"),
    ("demo_fusion", "fused.accuracy", lambda v: f"{v:.3f}"),
    ("demo_fusion", "fused.f1", lambda v: f"{v:.3f}"),
    ("demo_fusion", "late_fusion.accuracy", lambda v: f"{v:.3f}"),
    ("demo_fusion", "late_fusion.f1", lambda v: f"{v:.3f}"),
    ("demo_fusion", "heads_max.accuracy", lambda v: f"{v:.3f}"),
    ("demo_fusion", "heads_max.f1", lambda v: f"{v:.3f}"),
]


def test_every_result_file_records_its_machine_commit_command_and_date():
    files = sorted(RESULTS.glob("*.json"))
    assert len(files) >= 10
    for path in files:
        summary = json.loads(path.read_text())["summary"]
        for key in ("machine", "commit", "command", "date"):
            assert summary.get(key), f"{path.name}: no {key}"
        assert re.match(r"[0-9a-f]{7,40}\b", summary["commit"]), (path.name, summary["commit"])  # or several
        assert re.match(r"\d{4}-\d{2}-\d{2}", summary["date"]), (path.name, summary["date"])


def test_every_result_file_the_docs_name_exists():
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"bench/results/([a-z0-9_]+)\.json", doc.read_text())}
    assert named, "no result file named anywhere"
    missing = sorted(n for n in named if not (RESULTS / f"{n}.json").exists())
    assert not missing, missing


@pytest.mark.parametrize(("name", "path", "fmt"), HEADLINES, ids=[f"{n}:{p}" for n, p, _ in HEADLINES])
def test_benchmarks_states_each_headline_number_as_its_result_file_holds_it(name, path, fmt):
    text = fmt(_get(_summary(name), path))
    assert text in BENCHMARKS, f"BENCHMARKS.md does not state {name}.json {path} as {text!r}"
