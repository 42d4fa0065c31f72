"""Report documents and the global view, without a browser: file names, validation, aggregation."""

from __future__ import annotations

import pytest

from explain.global_ import summarize
from explain.report import REPORT_SCHEMA, ReportError, check_report, report_stem


def test_report_stems_are_safe_distinct_and_stable():
    hostile = ["../../etc/passwd", "a/b", "<script>", "", "x" * 500, "unit 1", "unit_1", "ü-nit"]
    stems = [report_stem(k) for k in hostile]
    assert len(set(stems)) == len(stems)  # "unit 1" and "unit_1" read alike but do not collide
    for stem in stems:
        assert stem.replace("-", "").replace("_", "").isalnum() and len(stem) <= 57
    assert report_stem("u-1") == report_stem("u-1")


def report(unit_id: str, phi: dict, groups: dict, when: str, interactions: dict | None = None) -> dict:
    return {"schema": REPORT_SCHEMA, "unit_id": unit_id, "event_time": when,
            "explanation": {"level": 2, "modality": {"phi": phi, "interactions": interactions or {}},
                            "groups": {m: [{"name": n, "phi": v} for n, v in gs.items()] for m, gs in groups.items()}},
            "summary": {"culprit_modality": max(phi, key=phi.get)}}


def test_global_view_aggregates_modalities_groups_interactions_and_periods():
    reports = [
        report("a", {"vision": 1.0, "vibration": -0.5}, {"vision": {"r0": 0.75, "r1": 0.25}},
               "2026-01-05T06:00:00+00:00", {"vision×vibration": 0.2}),
        report("b", {"vision": -3.0, "vibration": 0.5}, {"vision": {"r0": -1.0, "r1": -2.0}},
               "2026-01-05T07:30:00+00:00", {"vision×vibration": -0.4}),
        report("c", {"temperature": 2.0}, {}, "2026-01-06T00:00:00+00:00"),
    ]
    for r in reports:
        check_report(r)
    g = summarize(reports, period="day")
    assert g["units"] == 3
    mods = {m["name"]: m for m in g["modalities"]}
    assert mods["vision"]["mean_abs_phi"] == pytest.approx(2.0) and mods["vision"]["mean_phi"] == pytest.approx(-1.0)
    assert mods["temperature"]["units"] == 1 and g["modalities"][0]["name"] in ("vision", "temperature")
    groups = {(x["modality"], x["name"]): x for x in g["groups"]}
    assert groups[("vision", "r1")]["mean_abs_phi"] == pytest.approx(1.125)
    assert g["interactions"][0] == {"pair": "vision×vibration", "mean": pytest.approx(-0.1),
                                    "mean_abs": pytest.approx(0.3), "units": 2}
    assert g["culprits"] == {"vision": 1, "vibration": 1, "temperature": 1}
    assert [p["period"] for p in g["periods"]] == ["2026-01-05", "2026-01-06"]
    assert g["periods"][0]["units"] == 2 and g["periods"][0]["mean_abs_phi"]["vision"] == pytest.approx(2.0)
    hourly = summarize(reports, period="hour")
    assert [p["period"] for p in hourly["periods"]] == ["2026-01-05T06:00", "2026-01-05T07:00", "2026-01-06T00:00"]
    with pytest.raises(ValueError, match="period must be one of"):
        summarize(reports, period="week")


def test_check_report_names_what_is_wrong():
    with pytest.raises(ReportError, match="expected a report with schema"):
        check_report({"schema": "something/else"})
    with pytest.raises(ReportError, match="lacks the field 'summary'"):
        check_report({"schema": REPORT_SCHEMA, "unit_id": "u", "explanation": {"level": 1, "modality": {}}})
