"""The live operator page: in Chromium against the real service and broker (decisions appear as units are
produced, newest first; filters; links to the explanation reports; hostile text stays text; no console error and
no request leaves the service), the bearer token (login form, 401 without it, open probes), the refusal to bind
beyond loopback without a token, and the report folder served read-only (no path leaves it)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from inspection.errors import ConfigError
from inspection.records import MODALITIES, Decision, InputCoordinate

#: Text no page may turn into markup: it would set window.__pwned if it did.
HOSTILE = '<img src=x onerror="window.__pwned=1">&amp;"\'<script>window.__pwned=2</script>'
#: A token long enough for the service's rule (at least 16 printable characters).
TOKEN = "s3cret-operator-token-0123456789"
#: What Chromium logs for a response answered 401.
UNAUTHORISED = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
#: Seconds the page may take to show what the service acknowledged (it polls every 0.5 s in these tests).
SHOW_TIMEOUT_MS = 60_000


# ------------------------------------------------------------------------------------------------ helpers
def request(port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of one request with the path sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def decision(i: int, *, line: str = "line-1", verdict: str = "defect", klass: str = "crack",
             phi: dict[str, float] | None = None, report: str | None = None,
             event_time: datetime = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)) -> Decision:
    """A valid decision record of unit ``u<i>`` (built through the records API, as the service builds them)."""
    phi = phi if phi is not None else {"vision": 0.1, "vibration": 0.8, "temperature": -0.2}
    return Decision(unit_id=f"u{i}", line_id=line, decision=verdict, score=0.9 if verdict == "defect" else 0.1,
                    threshold=0.5, defect_class=klass if verdict == "defect" else "ok",
                    modality_scores={m: 0.5 for m in phi}, present=tuple(phi),
                    missing=tuple(m for m in MODALITIES if m not in phi), attributions={"modality": phi},
                    model_version="m0001-abcdef12", threshold_version="t1",
                    inputs=(InputCoordinate("inspection.vision", 0, i),), event_time=event_time,
                    decided_at=datetime.now(UTC), latency_ms=12.0, report_url=report)


def on_line(unit, line: str):
    """The same unit on another production line (every reading moved with it)."""
    from inspection.records import Unit

    moved = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    return Unit(unit.unit_id, line, label=unit.label, **moved)


def hostile_texts(page) -> int:
    """Elements of the page whose whole text is :data:`HOSTILE` (each table cell and header value)."""
    return page.evaluate("""text => Array.from(document.querySelectorAll('td, dd'))
        .filter(e => e.textContent === text).length""", HOSTILE)


def culprit_of(d: Decision) -> str:
    """The modality with the largest level-1 Shapley value (what the reports call the culprit)."""
    phi = d.attributions["modality"]
    return max(phi, key=lambda m: phi[m])


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    return path


@contextlib.contextmanager
def browser_page(chromium: str, origin: str) -> Iterator[tuple]:
    """A headless Chromium page that may reach nothing but ``origin`` (every other host goes to a dead proxy);
    yields ``(page, errors, foreign)``: console errors, page errors, dialogs and failed requests, and the URLs
    of requests to anything but ``origin``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--proxy-server=127.0.0.1:9"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors: list[str] = []
            foreign: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.on("request", lambda req: None if req.url.startswith(origin) or req.url.startswith("data:")
                    else foreign.append(req.url))
            yield page, errors, foreign
        finally:
            browser.close()


def rows_of(page) -> list[dict[str, str]]:
    """The table's rows as shown: seq, unit, decision, line, culprit, class, and the unit's link if any."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('#decisions tbody tr'), tr => ({
        seq: tr.dataset.seq, unit: tr.cells[0].textContent, line: tr.cells[1].textContent,
        decision: tr.cells[2].textContent, klass: tr.cells[5].textContent, culprit: tr.cells[6].textContent,
        time: tr.dataset.time, href: tr.cells[0].querySelector('a') ? tr.cells[0].querySelector('a')
        .getAttribute('href') : null}))""")


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, small_model_factory) -> tuple[Path, list]:
    """A model store whose every defect class and threshold version is hostile text, calibrated on 48 real
    composite units (threshold = their median score, so about half are defects); returns it and the units,
    alternately on line-1 and line-2."""
    import torch

    from inspection.data import skab
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.errors import DataError
    from inspection.store import ModelStore

    try:
        skab.skab_root()
        source = "auto"
    except DataError:
        source = "synthetic"
    units = CompositeBuilder(CompositeConfig(seed=17, temperature_source=source)).units("test", 48)
    units = [on_line(u, "line-2") if i % 2 else u for i, u in enumerate(units)]
    model = small_model_factory(class_names=("ok", HOSTILE))
    model.fit_normalisation(model.batch(units))
    model.eval()
    with torch.no_grad():
        model.thresholds.fill_(float(model(model.batch(units)).score.median()))
    root = tmp_path_factory.mktemp("hostile-store")
    ModelStore(root).save(model.state_dict(), {"model_config": model.config.to_dict(), "threshold_version": HOSTILE},
                          promote=True)
    return root, units


# ------------------------------------------------------------------------------- in the browser, for real
@pytest.mark.slow
@pytest.mark.data
def test_live_page_shows_decisions_as_they_come_with_filters_links_and_escaped_text(
        chromium, hostile_store, broker, topics, service_config, run_service, publish, read_topic,
        parse_decisions, tmp_path):
    from playwright.sync_api import expect

    store, units = hostile_store
    units = units[:16]
    folder = tmp_path / "reports"
    config = service_config(model={"store": str(store)}, join={"timeout_s": 30.0},
                            reports={"dir": str(folder), "units": "defects", "level": 2, "budget": 128},
                            operator_page={"refresh_s": 0.5, "window": 100})
    with run_service(config, broker.bootstrap) as service:
        origin = f"http://127.0.0.1:{service.metrics_port}"
        with browser_page(chromium, origin) as (page, errors, foreign):
            page.goto(origin + "/")
            assert page.locator("#count").inner_text() == "0"
            assert page.locator("#s-model").inner_text() == service.model_version
            # the first half, then the second: each shows up without a reload
            publish(units[:8], topics)
            expect(page.locator("#decisions tbody tr")).to_have_count(8, timeout=SHOW_TIMEOUT_MS)
            first = {r["unit"] for r in rows_of(page)}
            publish(units[8:], topics)
            expect(page.locator("#decisions tbody tr")).to_have_count(16, timeout=SHOW_TIMEOUT_MS)
            expect(page.locator("#count")).to_have_text("16")
            shown = rows_of(page)
            decisions = {d.unit_id: d for d in parse_decisions(read_topic(topics.decisions, len(units)))}

            assert first == {u.unit_id for u in units[:8]}
            seqs = [int(r["seq"]) for r in shown]
            assert seqs == sorted(seqs, reverse=True)  # newest first
            assert {r["unit"] for r in shown[:8]} == {u.unit_id for u in units[8:]}
            assert {r["unit"] for r in shown} == set(decisions)
            for r in shown:
                d = decisions[r["unit"]]
                assert (r["decision"], r["line"], r["culprit"]) == (d.decision, d.line_id, culprit_of(d))
                assert r["klass"] == (HOSTILE if d.decision == "defect" else "ok")
            defects = [d for d in decisions.values() if d.decision == "defect"]
            assert 0 < len(defects) < len(units)

            # the status header: the service's own numbers
            assert page.locator("#s-thresholds").inner_text() == HOSTILE
            assert float(page.locator("#s-rate").inner_text()) > 0
            assert page.locator("#s-queue").inner_text() == "0"
            assert page.locator("#s-dlq").inner_text() == "0.0"
            assert page.locator("#s-ready").inner_text() == "yes"
            assert page.locator("#s-drift .flag").all_inner_texts() == [f"{m}: -" for m in MODALITIES]

            # filters (each against what the decisions topic holds)
            page.select_option("#f-decision", "defect")
            expect(page.locator("#count")).to_have_text(str(len(defects)), timeout=SHOW_TIMEOUT_MS)
            assert {r["decision"] for r in rows_of(page)} == {"defect"}
            page.select_option("#f-decision", "")
            page.select_option("#f-line", "line-2")
            line2 = sum(1 for d in decisions.values() if d.line_id == "line-2")
            expect(page.locator("#count")).to_have_text(str(line2), timeout=SHOW_TIMEOUT_MS)
            assert {r["line"] for r in rows_of(page)} == {"line-2"}
            page.select_option("#f-line", "")
            culprits = Counter(culprit_of(d) for d in decisions.values())
            culprit, n_culprit = culprits.most_common(1)[0]
            page.select_option("#f-culprit", culprit)
            expect(page.locator("#count")).to_have_text(str(n_culprit), timeout=SHOW_TIMEOUT_MS)
            page.select_option("#f-culprit", "")
            cut = sorted(d.event_time for d in decisions.values())[10]
            page.fill("#f-from", cut.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f"))
            page.press("#f-from", "Enter")
            later = sum(1 for d in decisions.values() if d.event_time >= cut)
            expect(page.locator("#count")).to_have_text(str(later), timeout=SHOW_TIMEOUT_MS)
            assert errors == []
            page.fill("#f-from", "yesterday")  # a bad time: the API answers 400 and the page says why
            page.press("#f-from", "Enter")
            expect(page.locator("#message")).to_contain_text("ISO 8601", timeout=SHOW_TIMEOUT_MS)
            bad_request = errors[:]
            errors.clear()
            assert len(bad_request) == 1 and "status of 400" in bad_request[0]  # and polling stops until a change
            page.fill("#f-from", "")
            page.press("#f-from", "Enter")
            expect(page.locator("#count")).to_have_text("16", timeout=SHOW_TIMEOUT_MS)
            expect(page.locator("#message")).to_have_text("")

            # hostile text is text, in the live rows and in the server-rendered page alike
            assert hostile_texts(page) == len(defects) + 1  # the class cells and the threshold version
            page.reload()
            assert page.locator("#decisions tbody tr").count() == 16  # rendered by the server, before any poll
            assert hostile_texts(page) == len(defects) + 1
            assert page.evaluate("window.__pwned") is None

            # every defect links to its report, which opens
            linked = {r["unit"]: r["href"] for r in rows_of(page) if r["href"]}
            assert set(linked) == {d.unit_id for d in defects}
            assert all(decisions[u].report_url for u in linked)
            unit_id = defects[0].unit_id
            page.locator("#decisions tbody tr", has_text=unit_id).locator("a").click()
            page.wait_for_load_state()
            assert page.url == origin + linked[unit_id]
            assert re.fullmatch(r"/reports/[A-Za-z0-9_-]+\.html", linked[unit_id])
            assert page.locator("#unit-id").inner_text() == unit_id
            assert HOSTILE in page.locator("#banner .meta").inner_text()  # the class, as text
            assert page.evaluate("window.__pwned") is None
            page.go_back()
            expect(page.locator("#decisions tbody tr")).to_have_count(16)
    assert errors == []
    assert foreign == []


@pytest.mark.slow
@pytest.mark.data
def test_with_a_token_every_path_but_the_probes_needs_it_and_the_browser_signs_in(
        chromium, hostile_store, broker, topics, service_config, run_service, publish, read_topic,
        parse_decisions, monkeypatch, tmp_path):
    from playwright.sync_api import expect

    store, units = hostile_store
    monkeypatch.setenv("INSPECTION_TEST_OPS_TOKEN", TOKEN)
    config = service_config(model={"store": str(store)}, join={"timeout_s": 30.0},
                            metrics={"port": 0, "token_env": "INSPECTION_TEST_OPS_TOKEN"},
                            reports={"dir": str(tmp_path / "reports"), "units": "all", "level": 1},
                            operator_page={"refresh_s": 0.5}, drift={"window": 20})
    with run_service(config, broker.bootstrap) as service:
        port = service.metrics_port
        origin = f"http://127.0.0.1:{port}"
        for path in ("/", "/api/decisions", "/api/status", "/metrics", "/operator.js", "/reports/index.html",
                     "/nothing"):
            status, headers, _ = request(port, path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Bearer")
            assert request(port, path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})[0] == 401, path
            assert request(port, path, headers={"Authorization": TOKEN})[0] == 401, path
        for path in ("/healthz", "/readyz"):  # orchestrators' probes stay open
            assert request(port, path)[0] == 200
        assert request(port, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, _, body = request(port, "/api/status", headers={"Authorization": f"bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["model_version"] == service.model_version
        assert request(port, "/", headers={"Cookie": "inspection_ops_session=" + "0" * 64})[0] == 401

        with browser_page(chromium, origin) as (page, errors, foreign):
            response = page.goto(origin + "/")
            assert response.status == 401
            page.fill("#token", "not-the-token-at-all")
            page.click("button[type=submit]")
            expect(page.locator("#login-failed")).to_be_visible()
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            expect(page.locator("#decisions")).to_be_visible()
            publish(units[:40], topics)
            expect(page.locator("#decisions tbody tr")).to_have_count(40, timeout=SHOW_TIMEOUT_MS)
            decisions = parse_decisions(read_topic(topics.decisions, 40))
            assert len(decisions) == 40
            publish(units[:2], topics)  # again: their 6 readings come late and are dead-lettered
            expect(page.locator("#s-dlq")).not_to_have_text("0.0", timeout=SHOW_TIMEOUT_MS)
            deadline = time.monotonic() + SHOW_TIMEOUT_MS / 1000
            while service.metrics.registry.get_sample_value("inspection_dlq_total",
                                                            {"stage": "join", "reason": "late"}) != 6:
                assert time.monotonic() < deadline, "the late readings were not dead-lettered"
                time.sleep(0.1)
            # the drift test has run (a 20-score reference, then a 20-score window): the flags show its result
            flags = {m: service.metrics.registry.get_sample_value("inspection_drift_detected", {"modality": m})
                     for m in MODALITIES}
            assert None not in flags.values()
            expect(page.locator("#s-drift .flag")).to_have_text(
                [f"{m}: {'DRIFT' if flags[m] else 'ok'}" for m in MODALITIES], timeout=SHOW_TIMEOUT_MS)
            # the cookie goes with links too: a report opens
            page.locator("#decisions tbody tr a").first.click()
            page.wait_for_load_state()
            assert page.url.startswith(origin + "/reports/")
            assert page.locator("#banner").count() == 1
            page.go_back()
            # so far Chromium reported the two login forms (answered 401 by design) and nothing else
            assert errors == [UNAUTHORISED] * 2
            page.click(".logout button")
            expect(page.locator("#login")).to_be_visible()
            assert page.evaluate("fetch('/api/decisions').then(r => r.status)") == 401
    assert errors == [UNAUTHORISED] * 4  # and, signed out, the login form again and the refused fetch
    assert foreign == []


# --------------------------------------------------------------------------------- refusing to start
def minimal_config(tmp_path: Path, **metrics):
    from services.service_config import ServiceConfig

    return ServiceConfig.from_mapping({"model": {"store": str(tmp_path / "no-store")},
                                       "metrics": {"port": 0, "token_env": "INSPECTION_TEST_OPS_TOKEN", **metrics}})


@pytest.mark.parametrize("value", [None, ""])
def test_a_non_loopback_bind_without_a_token_refuses_to_start(tmp_path, monkeypatch, value):
    from services.serve import StreamService

    if value is None:
        monkeypatch.delenv("INSPECTION_TEST_OPS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("INSPECTION_TEST_OPS_TOKEN", value)
    service = StreamService(minimal_config(tmp_path, host="0.0.0.0"), "127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"\$INSPECTION_TEST_OPS_TOKEN .*unset or empty"):
        service.run()
    assert service.metrics_port is None  # nothing was bound


def test_a_short_token_is_refused_and_never_printed(tmp_path, monkeypatch):
    from services.serve import StreamService

    monkeypatch.setenv("INSPECTION_TEST_OPS_TOKEN", "short-secret")
    with pytest.raises(ConfigError, match="at least 16") as caught:
        StreamService(minimal_config(tmp_path), "127.0.0.1:9").run()
    assert "short-secret" not in str(caught.value)


def test_the_server_itself_refuses_a_non_loopback_bind_without_auth():
    from services.metrics import OpsServer, ServiceMetrics

    with pytest.raises(ConfigError, match="not loopback"):
        OpsServer(ServiceMetrics(), "0.0.0.0", 0, lambda: (True, "ok"), lambda: (True, "ok"))


def test_token_env_must_name_a_variable(tmp_path):
    with pytest.raises(ConfigError, match="metrics.token_env"):
        minimal_config(tmp_path, token_env="not a name")
    from services.service_config import ServiceConfig

    for bad in ({"window": 0}, {"refresh_s": 0.0}, {"enabled": "yes"}):
        with pytest.raises(ConfigError, match="operator_page"):
            ServiceConfig.from_mapping({"model": {"store": "s"}, "operator_page": bad})


@pytest.mark.slow
def test_inspection_serve_beyond_loopback_without_a_token_exits_2_naming_the_variable(tmp_path):
    config = tmp_path / "service.yaml"
    config.write_text(f"model:\n  store: {tmp_path / 'no-store'}\nmetrics:\n  host: 0.0.0.0\n  port: 0\n")
    env = {k: v for k, v in os.environ.items() if k != "INSPECTION_OPS_TOKEN"}
    exe = str(Path(sys.executable).parent / "inspection")
    done = subprocess.run([exe, "serve", "--config", str(config), "--bootstrap", "127.0.0.1:9"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "$INSPECTION_OPS_TOKEN" in done.stderr and "not loopback" in done.stderr


# ----------------------------------------------------------------------- the server without a broker
@pytest.fixture
def page_server(tmp_path) -> Iterator:
    """A real OpsServer with the operator page over a window of 5 and a report folder holding one report
    (and, beside the folder, a file no request may reach); yields ``(server, window, folder)``."""
    from services.metrics import OpsServer, ServiceMetrics
    from services.operator_page import DecisionWindow, OperatorPage, ReportFolder

    folder = tmp_path / "reports"
    folder.mkdir()
    (tmp_path / "secret.html").write_text("SECRET")
    (folder / "r-0123456789abcdef.html").write_text("<!DOCTYPE html><p>REPORT</p>")
    (folder / ".hidden.html").write_text("HIDDEN")
    (folder / "notes.txt").write_text("NOTES")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.html").write_text("NESTED")
    (folder / "escape.html").symlink_to(tmp_path / "secret.html")
    reports = ReportFolder(folder)
    window = DecisionWindow(5, report_link=reports.link)
    status = {"instance": "t", "model_version": "m1", "threshold_version": "t1", "queue_depth": 0, "drift": {},
              "ready": True, "ready_detail": "ok"}
    page = OperatorPage(window, lambda: status, reports=reports)
    server = OpsServer(ServiceMetrics(), "127.0.0.1", 0, lambda: (True, "ok"), lambda: (True, "ok"),
                       page=page).start()
    try:
        yield server, window, folder
    finally:
        server.stop()


def test_the_report_folder_is_served_read_only_and_no_path_leaves_it(page_server):
    server, _, _ = page_server
    status, headers, body = request(server.port, "/reports/r-0123456789abcdef.html")
    assert status == 200 and body == b"<!DOCTYPE html><p>REPORT</p>"
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for path in ("/reports/../secret.html", "/reports/..%2fsecret.html", "/reports/%2e%2e/secret.html",
                 "/reports/%2E%2E%2Fsecret.html", "/reports//etc/passwd", "/reports/.hidden.html",
                 "/reports/notes.txt", "/reports/sub/x.html", "/reports/escape.html", "/reports/..",
                 "/reports/r-0123456789abcdef.html/..", "/reports/missing.html", "/reports/", "/reports",
                 "/reports/r-0123456789abcdef.html%00.txt", "/reports/\\..\\secret.html"):
        status, _, body = request(server.port, path)
        assert status == 404, path
        assert b"SECRET" not in body and b"HIDDEN" not in body and b"NESTED" not in body and b"NOTES" not in body
    for method in ("PUT", "DELETE", "POST"):
        assert request(server.port, "/reports/r-0123456789abcdef.html", method=method, body=b"x")[0] in (404, 501)
    assert (page_server[2] / "r-0123456789abcdef.html").read_text() == "<!DOCTYPE html><p>REPORT</p>"


def test_the_window_keeps_the_newest_decisions_and_the_api_filters_them(page_server):
    server, window, folder = page_server
    from explain.report import report_stem

    lines = ["line-1", "line-2", "line-1", "line-2", "line-1", "line-2", "line-1"]
    base = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
    made = []
    for i, line in enumerate(lines):
        d = decision(i, line=line, verdict="defect" if i % 3 else "ok", event_time=base + timedelta(minutes=i),
                     phi={"vision": 0.9, "vibration": 0.1} if i < 4 else {"temperature": 0.5, "vision": -0.5},
                     report="file:///elsewhere/x.html" if i in (5, 6) else None)
        made.append(d)
        window.add(d.to_json())
    (folder / f"{report_stem(made[6].id)}.html").write_text("<p>six</p>")  # unit 5's report is missing

    def api(query: str = "") -> dict:
        status, headers, body = request(server.port, "/api/decisions" + query)
        assert status == 200 and headers["content-type"] == "application/json"
        return json.loads(body)

    got = api()
    assert [r["unit_id"] for r in got["decisions"]] == ["u6", "u5", "u4", "u3", "u2"]  # 5 kept, newest first
    assert got["window"] == {"size": 5, "oldest": 3, "newest": 7}
    assert got["lines"] == ["line-1", "line-2"]
    assert [r["unit_id"] for r in api("?after=5")["decisions"]] == ["u6", "u5"]
    assert [r["unit_id"] for r in api("?line=line-2")["decisions"]] == ["u5", "u3"]
    assert [r["unit_id"] for r in api("?decision=ok")["decisions"]] == ["u6", "u3"]
    assert [r["unit_id"] for r in api("?culprit=temperature")["decisions"]] == ["u6", "u5", "u4"]
    assert [r["unit_id"] for r in api("?culprit=vision&decision=defect")["decisions"]] == ["u2"]
    assert [r["unit_id"] for r in api("?from=2026-01-05T06:03&to=2026-01-05T07:05:00%2B01:00")["decisions"]] \
        == ["u5", "u4", "u3"]
    rows = {r["unit_id"]: r for r in api()["decisions"]}
    assert rows["u6"]["report"] == f"/reports/{report_stem(made[6].id)}.html"
    assert rows["u5"]["report"] is None and rows["u4"]["report"] is None
    assert request(server.port, rows["u6"]["report"])[2] == b"<p>six</p>"
    for bad in ("?decision=maybe", "?culprit=sound", "?from=soon", "?after=-1", "?colour=red", "?line=" + "x" * 129):
        status, _, body = request(server.port, "/api/decisions" + bad)
        assert status == 400 and json.loads(body)["error"], bad
    status, headers, body = request(server.port, "/?decision=nope")
    assert status == 400 and b"decision must be one of" in body


def test_rates_count_the_last_minute():
    from services.operator_page import DecisionWindow

    now = [1000.0]
    window = DecisionWindow(3, clock=lambda: now[0])
    now[0] += 120.0
    for _ in range(30):
        window.add(decision(1).to_json())
    window.dead_letter()
    window.dead_letter()
    now[0] += 30.0
    for _ in range(30):
        window.add(decision(2).to_json())
    assert window.rates() == {"units_per_s": pytest.approx(60 / 60), "dead_letters_per_min": pytest.approx(2.0)}
    now[0] += 45.0  # the first 30 decisions and both dead letters are more than a minute old
    assert window.rates() == {"units_per_s": pytest.approx(30 / 60), "dead_letters_per_min": 0.0}


def test_login_sets_a_session_cookie_that_is_not_the_token(tmp_path):
    from services.metrics import OpsServer, ServiceMetrics
    from services.operator_page import DecisionWindow, OperatorPage, OpsAuth

    auth = OpsAuth(TOKEN)
    page = OperatorPage(DecisionWindow(5), lambda: {"drift": {}, "queue_depth": 0}, auth=auth)
    server = OpsServer(ServiceMetrics(), "127.0.0.1", 0, lambda: (True, "ok"), lambda: (True, "ok"), page=page,
                       auth=auth).start()
    try:
        status, headers, _ = request(server.port, "/login", method="POST", body=b"token=wrong",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 401 and "set-cookie" not in headers
        status, headers, _ = request(server.port, "/login", method="POST", body=f"token={TOKEN}".encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        session = cookie.split(";", 1)[0]
        assert request(server.port, "/api/status", headers={"Cookie": session})[0] == 200
        assert request(server.port, "/api/status", headers={"Cookie": f"other=1; {session}"})[0] == 200
        assert request(server.port, "/api/status", headers={"Cookie": session[:-1] + "0"})[0] == 401
        status, _, _ = request(server.port, "/login", method="POST", body=b"x" * 5000)
        assert status == 413
        status, headers, _ = request(server.port, "/logout", method="POST", body=b"")
        assert status == 303 and "Max-Age=0" in headers["set-cookie"]
    finally:
        server.stop()
