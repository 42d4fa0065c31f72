"""Explanation reports in a real browser (Playwright driving Debian's chromium, headless): the unit pages and the
index render from real composite units, their pictures load, the filters work, hostile text stays text, and no
page logs a console error. A screenshot of a unit page is kept as a test artifact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.data]

HOSTILE = '<img src=x onerror="window.__pwned=1">&amp;"\''
ARTIFACTS = Path(os.environ.get("INSPECTION_TEST_ARTIFACTS", Path(__file__).parents[2] / "runs" / "test-artifacts"))


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, small_model_factory) -> Path:
    import torch

    from explain.api import explain
    from explain.report import build_report, explain_to_reports, write_index, write_unit_report
    from inspection.data import skab
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.errors import DataError

    try:
        skab.skab_root()
        source = "auto"
    except DataError:
        source = "synthetic"
    units = CompositeBuilder(CompositeConfig(seed=11, temperature_source=source)).units("test", 6)
    model = small_model_factory()
    model.fit_normalisation(model.batch(units))
    model.eval()
    with torch.no_grad():
        model.thresholds.fill_(float(model(model.batch(units)).score.median()))
    out = tmp_path_factory.mktemp("reports")
    written = explain_to_reports(model, units, out, level=2, budget=128, seed=0, model_version="m-test",
                                 threshold_version="t-test")
    # a report file from elsewhere whose every text field is hostile (ids are validated in records, not in files)
    attribution = explain(model, units[:1], level=2, budget=128)[0]
    hostile = build_report(attribution, unit=units[0], decision={"decision": "defect", "score": 0.9,
                                                                "threshold": 0.5, "class": HOSTILE})
    hostile["unit_id"] = HOSTILE
    hostile["line_id"] = HOSTILE
    hostile["explanation"]["groups"]["vision"][0]["name"] = HOSTILE
    json_path, _ = write_unit_report(out, hostile, units[0], stem="hostile")
    written.append((json_path, hostile))
    write_index(out, written)
    return out


def collect_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
    return errors


def test_reports_and_index_render_with_pictures_filters_and_escaped_text(chromium, report_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = collect_errors(page)
            page.goto((report_dir / "index.html").as_uri())
            rows = page.locator("#units tbody tr")
            assert rows.count() == 7
            assert page.locator("#count").inner_text() == "7"
            decisions = [rows.nth(i).get_attribute("data-decision") for i in range(7)]
            page.select_option("#f-decision", "defect")
            assert page.locator("#count").inner_text() == str(decisions.count("defect"))
            assert page.locator("#units tbody tr:visible").count() == decisions.count("defect")
            page.select_option("#f-decision", "")
            page.select_option("#f-line", HOSTILE)  # the hostile line id is an option's text, not markup
            assert page.locator("#count").inner_text() == "1"
            page.select_option("#f-line", "")
            culprits = [rows.nth(i).get_attribute("data-culprit") for i in range(7)]
            page.select_option("#f-culprit", culprits[0])
            assert page.locator("#count").inner_text() == str(culprits.count(culprits[0]))
            page.select_option("#f-culprit", "")
            page.fill("#f-from", "2999")
            assert page.locator("#count").inner_text() == "0"
            page.fill("#f-from", "")
            assert page.get_by_text(HOSTILE, exact=True).count() >= 1
            assert page.evaluate("window.__pwned") is None
            assert page.locator("#overview-modalities tr").count() >= 2

            hrefs = [rows.nth(i).locator("a").get_attribute("href") for i in range(7)]
            for href in hrefs:
                page.goto((report_dir / href).resolve().as_uri())
                assert page.locator("#banner").count() == 1
                heat = page.locator("#heatmap")
                assert heat.count() == 1
                assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
                assert page.locator("#groups-vibration svg").count() == 2  # spectrum and envelope spectrum
                assert page.locator("#groups-temperature svg").count() >= 1
                assert page.locator("#modalities .bar").count() == 3
            assert page.get_by_text(HOSTILE, exact=True).count() >= 2  # the last page is the hostile one
            assert page.evaluate("window.__pwned") is None
            page.goto((report_dir / hrefs[0]).resolve().as_uri())
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "explanation-report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (ARTIFACTS / "explanation-report.png").stat().st_size > 10_000


def test_report_files_are_valid_versioned_json_with_every_level(report_dir):
    from explain.report import REPORT_SCHEMA, read_reports, report_files

    reports = read_reports(report_files(report_dir))
    assert len(reports) == 7
    for path, report in reports:
        assert report["schema"] == REPORT_SCHEMA
        exp = report["explanation"]
        assert exp["level"] == 2 and exp["masking"] == "tokens" and exp["budget"] > 0
        assert abs(exp["efficiency_gap"]) < 1e-5
        assert set(exp["groups"]) == set(exp["modality"]["players"])
        assert path.with_suffix(".html").is_file()
        assert "/" not in path.name and path.name.endswith(".json")
    glob = json.loads((report_dir / "global.json").read_text())
    assert glob["units"] == 7 and {m["name"] for m in glob["modalities"]} == {"vision", "vibration", "temperature"}
    assert np.isfinite([g["mean_abs_phi"] for g in glob["groups"]]).all()
