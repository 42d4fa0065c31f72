"""Monitoring against a real Prometheus (Debian's ``prometheus`` and ``promtool``, installed by ``make test``).

* ``ops/alerts.yml`` passes ``promtool check rules``, and ``promtool test rules`` drives every alert, with the
  shipped thresholds and ``for:`` durations, through series that must fire it and series that must not.
* Every alert has a summary, a description and a runbook section in docs/operations.md, and names only metrics
  the service exports.
* ``ops/grafana-dashboard.json`` is exactly what ``ops/dashboard.py`` generates.
* A real Prometheus process scrapes a real service on the session broker: after a short run every dashboard
  query returns series, and the per-line, MoE and lag metrics agree with what was published.
* A dead-letter flood and a stalled main loop make the matching alerts fire in Prometheus's own alerts API.
  That test loads a copy of ``ops/alerts.yml`` whose ``for:`` durations are rewritten to ``0s`` (nothing else
  changes), so an alert fires at the first evaluation its expression holds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Seconds a Prometheus process may take to answer /-/ready.
PROMETHEUS_START_S = 30.0
#: Seconds for Prometheus to scrape and evaluate what the service already exports (1 s intervals).
SCRAPE_WAIT_S = 30.0
#: Seconds for an alert to fire once its condition holds (the stall needs 15 s of it, then a scrape and a rule
#: evaluation).
ALERT_WAIT_S = 60.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing: install Debian's prometheus package (make test does, as root)")
    return path


def load_dashboard_module():
    """ops/dashboard.py as a module (``ops`` is a folder of the repository, not an installed package)."""
    name = "ops_dashboard"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "ops" / "dashboard.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# ------------------------------------------------------------------------------------------- static checks
def test_promtool_accepts_the_rules_and_the_example_config():
    promtool = tool("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = subprocess.run([promtool, "check", "config", str(ROOT / "ops" / "prometheus.example.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_has_a_summary_and_a_runbook_section():
    from services.metrics import ServiceMetrics

    docs = OPERATIONS.read_text()
    headings = set(re.findall(r"^### (\w+)$", docs, re.M))
    exported = set()
    for family in ServiceMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        exported |= {family.name + s for s in suffixes}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)) == 10
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook"] == f"docs/operations.md#{name.lower()}", name
        assert name in headings, f"docs/operations.md has no '### {name}' section"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        used = set(re.findall(r"\binspection_\w+", rule["expr"]))
        assert used <= exported, f"{name} names metrics the service does not export: {used - exported}"
        assert used or rule["expr"] == 'up{job="inspection"} == 0', name  # only the scrape itself is not ours


# Expected renderings of each alert's summary are written out by hand below: they check the templates too.
def _series(labels: str, values: str) -> dict[str, str]:
    return {"series": labels, "values": values}


def _firing(name: str, labels: dict[str, str], summary: str, description: str | None = None) -> dict[str, Any]:
    rule = next(r for r in alert_rules() if r["alert"] == name)
    annotations = dict(rule["annotations"], summary=summary)
    if description is not None:
        annotations["description"] = description
    assert "{{" not in annotations["description"], f"write out {name}'s rendered description"
    return {"exp_labels": {**labels, "severity": rule["labels"]["severity"]}, "exp_annotations": annotations}


def _case(name: str, series: list[dict[str, str]], checks: list[tuple[str, list[dict[str, Any]]]]) -> dict:
    return {"interval": "15s", "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": alerts} for at, alerts in checks]}


def _rule_unit_tests() -> list[dict[str, Any]]:
    a = {"job": "inspection", "instance": "a"}
    job_a = 'job="inspection", instance="a"'
    job_b = 'job="inspection", instance="b"'
    job_c = 'job="inspection", instance="c"'
    job_d = 'job="inspection", instance="d"'
    job_e = 'job="inspection", instance="e"'
    c = {"job": "inspection", "instance": "c"}
    e = {"job": "inspection", "instance": "e"}
    b = {"job": "inspection", "instance": "b"}
    tests = [
        # down from 150 s; for: 2m -> firing from 270 s. Another job's target is not ours.
        _case("InspectionServiceDown",
              [_series(f"up{{{job_a}}}", "1x9 0x30"), _series('up{job="other", instance="x"}', "0x40")],
              [("3m", []), ("5m", [_firing("InspectionServiceDown", a, "Inspection service a cannot be scraped",
                                            "Prometheus has not reached /metrics of a for 2 minutes: the process "
                                            "is gone, frozen or unreachable.")])]),
        # the loop stops at 300 s: 16 s old then, 31 s at 315 s; for: 30s -> firing at 330 s (46 s old)
        _case("InspectionMainLoopStalled",
              [_series(f"inspection_main_loop_age_seconds{{{job_a}}}", "0.05x19 16+15x10"),
               _series(f"inspection_main_loop_age_seconds{{{job_b}}}", "0.05x40")],
              [("315s", []), ("330s", [_firing("InspectionMainLoopStalled", a,
                                               "Main loop of a has not run for 46s")])]),
        # not ready from 150 s; for: 5m -> firing from 450 s
        _case("InspectionNotReady",
              [_series(f"inspection_ready{{{job_a}}}", "1x9 0x40"), _series(f"inspection_ready{{{job_b}}}", "1x50")],
              [("6m", []), ("8m", [_firing("InspectionNotReady", a, "Inspection service a is not ready")])]),
        # a: half of what is read is dead-lettered, 1 a second; b: 6 %, but one every 15 s; c: nothing but dead
        # letters (no readings series at all)
        _case("InspectionDeadLetterRate",
              [_series(f'inspection_dlq_total{{{job_a}, stage="deserialize", reason="bad"}}', "0+15x60"),
               _series(f'inspection_readings_total{{{job_a}, modality="vision"}}', "0+15x60"),
               _series(f'inspection_dlq_total{{{job_b}, stage="deserialize", reason="bad"}}', "0+1x60"),
               _series(f'inspection_readings_total{{{job_b}, modality="vision"}}', "0+15x60"),
               _series(f'inspection_dlq_total{{{job_c}, stage="join", reason="late"}}', "0+15x60")],
              [("4m", []),
               ("10m", [_firing("InspectionDeadLetterRate", a,
                                "50% of the input of a goes to the dead-letter topic"),
                        _firing("InspectionDeadLetterRate", c,
                                "100% of the input of c goes to the dead-letter topic")])]),
        # vibration flagged from 150 s (for: 30m -> firing from 1950 s); vision flagged 12.5 min, then clear
        _case("InspectionDriftDetected",
              [_series(f'inspection_drift_detected{{{job_a}, modality="vibration"}}', "0x9 1x150"),
               _series(f'inspection_drift_detected{{{job_a}, modality="vision"}}', "0x9 1x50 0x100")],
              [("30m", []),
               ("35m", [_firing("InspectionDriftDetected", {**a, "modality": "vibration"},
                                "Scores of the vibration modality on a have drifted",
                                "The two-sample KS test of the vibration scores against their reference window "
                                "has flagged drift for 30 minutes.")])]),
        # a: every decision between 5 and 10 s (p99 = 5 + 0.99 x 5 = 9.95 s); b: every one under 1 s
        _case("InspectionLatencyP99High",
              [_series(f'inspection_stage_seconds_bucket{{{job_a}, stage="end_to_end", le="{le}"}}', v)
               for le, v in (("1.0", "0x80"), ("5.0", "0x80"), ("10.0", "0+10x80"), ("+Inf", "0+10x80"))]
              + [_series(f'inspection_stage_seconds_bucket{{{job_b}, stage="end_to_end", le="{le}"}}', "0+10x80")
                 for le in ("1.0", "5.0", "10.0", "+Inf")]
              + [_series(f'inspection_stage_seconds_bucket{{{job_a}, stage="join", le="{le}"}}', "0+10x80")
                 for le in ("1.0", "5.0", "10.0", "+Inf")],
              [("9m", []), ("15m", [_firing("InspectionLatencyP99High", a,
                                            "p99 end-to-end latency of a is 9.95s")])]),
        # a: expert 0 takes 70 % of 4 experts' assignments (2.8x its share); b: 40 % (1.6x)
        _case("InspectionExpertImbalance",
              [_series(f'inspection_expert_assignments_total{{{job_a}, layer="0", expert="{x}"}}',
                       "0+70x150" if x == 0 else "0+10x150") for x in range(4)]
              + [_series(f'inspection_expert_assignments_total{{{job_b}, layer="0", expert="{x}"}}',
                         "0+40x150" if x == 0 else "0+20x150") for x in range(4)],
              [("10m", []), ("20m", [_firing("InspectionExpertImbalance", {**a, "layer": "0"},
                                             "MoE layer 0 on a: the busiest expert takes 2.8x its fair share")])]),
        # 4 experts (log 4 = 1.386 nats): a at 0.2 nats (14 %), b at 1.386 (100 %), c at 1.2 (87 %: in band)
        _case("InspectionGateEntropyOutOfBand",
              [_series(f'inspection_gate_entropy{{{job}, layer="0"}}', f"{h}x150")
               for job, h in ((job_a, 0.2), (job_b, 1.3862943), (job_c, 1.2))]
              + [_series(f'inspection_expert_load{{{job}, layer="0", expert="{x}"}}', "0.25x150")
                 for job in (job_a, job_b, job_c) for x in range(4)],
              [("10m", []),
               ("20m", [_firing("InspectionGateEntropyOutOfBand", {**a, "layer": "0"},
                                "Router entropy of MoE layer 0 on a is 14.43% of its maximum"),
                        _firing("InspectionGateEntropyOutOfBand", {**b, "layer": "0"},
                                "Router entropy of MoE layer 0 on b is 100% of its maximum")])]),
        # a: 3 of every 10 units close by timeout; b: none
        _case("InspectionJoinTimeouts",
              [_series(f"inspection_join_timeouts_total{{{job_a}}}", "0+3x100"),
               _series(f'inspection_units_total{{{job_a}, closed_by="complete"}}', "0+7x100"),
               _series(f'inspection_units_total{{{job_a}, closed_by="timeout"}}', "0+3x100"),
               _series(f"inspection_join_timeouts_total{{{job_b}}}", "0x100"),
               _series(f'inspection_units_total{{{job_b}, closed_by="complete"}}', "0+10x100")],
              [("9m", []), ("15m", [_firing("InspectionJoinTimeouts", a,
                                            "30% of the units of a close by join timeout")])]),
        # a: 1,200 records waiting at 1 reading/s = 20 min; b: 60 s; c: 10 waiting, nothing read; d: nothing
        # waiting, nothing read; e: 100 waiting and no readings series at all
        _case("InspectionConsumerLag",
              [_series(f'inspection_consumer_lag{{{job_a}, topic="inspection.vision", partition="{p}"}}', "600x100")
               for p in (0, 1)]
              + [_series(f'inspection_readings_total{{{job_a}, modality="vision"}}', "0+15x100"),
                 _series(f'inspection_consumer_lag{{{job_b}, topic="inspection.vision", partition="0"}}', "60x100"),
                 _series(f'inspection_readings_total{{{job_b}, modality="vision"}}', "0+15x100"),
                 _series(f'inspection_consumer_lag{{{job_c}, topic="inspection.vision", partition="0"}}', "10x100"),
                 _series(f'inspection_readings_total{{{job_c}, modality="vision"}}', "5x100"),
                 _series(f'inspection_consumer_lag{{{job_d}, topic="inspection.vision", partition="0"}}', "0x100"),
                 _series(f'inspection_readings_total{{{job_d}, modality="vision"}}', "5x100"),
                 _series(f'inspection_consumer_lag{{{job_e}, topic="inspection.vision", partition="0"}}', "100x100")],
              [("9m", []),
               ("15m", [_firing("InspectionConsumerLag", a, "a is 20m 0s of input behind"),
                        _firing("InspectionConsumerLag", c, "c is +Inf of input behind"),
                        _firing("InspectionConsumerLag", e, "e is +Inf of input behind")])]),
    ]
    return tests


def test_every_alert_fires_on_its_condition_and_only_then(tmp_path):
    promtool = tool("promtool")
    tests = _rule_unit_tests()
    assert sorted(t["alert_rule_test"][0]["alertname"] for t in tests) == sorted(r["alert"] for r in alert_rules())
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": tests},
                                   sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_dashboard_json_is_the_generated_one(tmp_path):
    module = load_dashboard_module()
    committed = (ROOT / "ops" / "grafana-dashboard.json").read_text()
    assert committed == module.render(), "run: python -m ops.dashboard"
    assert module.main(["--check"]) == 0
    stale = tmp_path / "stale.json"
    stale.write_text(committed.replace("Units decided", "Units"))
    assert module.main(["--check", "--output", str(stale)]) == 1
    model = json.loads(committed)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in model["panels"])
    for subject in ("Units decided", "latency", "Batch size", "Queue depth", "Dead letters by reason",
                    "Drift p-values", "Expert load", "Gate entropy", "Decisions per line", "Consumer lag"):
        assert subject in titles, subject
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


# ------------------------------------------------------------------------------------------- a real Prometheus
def rfc3339(text: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 times (nanoseconds cut to microseconds)."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")).timestamp()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A Prometheus process of this test: its own config, storage and loopback port; 1 s scrapes and rule
    evaluations of one ``inspection`` job."""

    def __init__(self, workdir: Path, target: str, rules: Path | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "inspection", "static_configs": [{"targets": [target]}]}],
        }
        if rules is not None:
            config["rule_files"] = [str(rules)]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        args = [tool("prometheus"), f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + PROMETHEUS_START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus was not ready within {PROMETHEUS_START_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", expr
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when it has no series."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def evaluated_after(self, t0: float) -> bool:
        """Whether every rule group was evaluated after ``t0`` (seconds since the epoch)."""
        groups = self.api("rules")["groups"]
        return bool(groups) and all(rfc3339(g["lastEvaluation"]) > t0 for g in groups)

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = SCRAPE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            time.sleep(0.25)


@pytest.fixture
def prometheus(tmp_path) -> Iterator[Callable[..., Prometheus]]:
    """Start a :class:`Prometheus` scraping ``target``; every one started is stopped (by its PID) at the end."""
    started: list[Prometheus] = []

    def start(target: str, rules: Path | None = None) -> Prometheus:
        started.append(Prometheus(tmp_path / f"prometheus-{len(started)}", target, rules))
        return started[-1].start()

    yield start
    for process in started:
        process.stop()


def alerts_with_zero_for(tmp_path: Path) -> Path:
    """A copy of ops/alerts.yml whose ``for:`` durations are all ``0s`` (nothing else is changed)."""
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
    path = tmp_path / "alerts-for-0s.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def small_units(unit_factory, n: int, seed: int, start: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [unit_factory(i, rng) for i in range(start, start + n)]


def publish_malformed(bootstrap: str, topic: str, count: int, start: int = 0) -> None:
    """``count`` records without CloudEvents headers on an input topic: each one must be dead-lettered."""
    from services.clients import make_producer

    producer = make_producer(bootstrap)
    try:
        futures = [producer.send(topic, key=f"junk-{start + i}".encode(), value=b"not a reading")
                   for i in range(count)]
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close(timeout=10)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


#: Grafana's variables, as Grafana expands them for "All" instances over the test's short run.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "5m"}


#: Join timeout of the dashboard run: units without their temperature reading wait this long, holding their
#: offsets, so the lag they cause is seen by several lag refreshes (every 5 s) and scrapes (every 1 s).
JOIN_TIMEOUT_S = 30.0


@pytest.mark.slow
def test_every_dashboard_query_returns_series_from_a_real_run(broker, topics, unit_factory, service_config,
                                                              run_service, publish, prometheus):
    from services.publish import FaultPlan

    complete = small_units(unit_factory, 60, seed=51)
    incomplete = small_units(unit_factory, 10, seed=52, start=60)  # sent without their temperature reading
    units = complete + incomplete
    per_line = {line: sum(1 for u in units if u.line_id == line) for line in ("line-1", "line-2")}
    assert min(per_line.values()) > 0
    junk = 7
    config = service_config(drift={"window": 20}, join={"timeout_s": JOIN_TIMEOUT_S})
    with run_service(config, broker.bootstrap) as service:
        prom = prometheus(f"127.0.0.1:{service.metrics_port}")
        prom.wait_until(lambda: prom.value("inspection_ready") == 1.0, "the first scrape of a ready service")
        publish_malformed(broker.bootstrap, topics.vision, junk)
        publish(complete, topics)
        wait_until(lambda: service.stats.decisions_acked == len(complete)
                   and service.stats.dead_letters_acked == junk, "the decisions and dead letters")
        # everything before is settled: the incomplete units' vision and vibration readings are the lag, until
        # the join timeout closes them
        publish(incomplete, topics, FaultPlan(drop={"temperature": 1.0}))
        prom.wait_until(lambda: prom.value("sum(inspection_consumer_lag)") == 2 * len(incomplete),
                        "the waiting readings in the lag", JOIN_TIMEOUT_S - 5)
        by_topic = {r["metric"]["topic"]: float(r["value"][1])
                    for r in prom.query("sum by (topic) (inspection_consumer_lag)")}
        assert by_topic == {topics.vision: len(incomplete), topics.vibration: len(incomplete),
                            topics.temperature: 0.0}
        wait_until(lambda: service.stats.decisions_acked == len(units), "the decisions of the incomplete units")
        # the last scrape has everything, and the lag has been refreshed since
        prom.wait_until(lambda: prom.value("sum(inspection_line_decisions_total)") == len(units)
                        and prom.value("sum(inspection_consumer_lag)") == 0.0, "the final counts")

        module = load_dashboard_module()
        empty = []
        for title, expr in module.queries():
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            result = prom.query(expr)
            if not any(math.isfinite(float(r["value"][1])) for r in result):
                empty.append(f"{title}: {expr} -> {result}")
        assert not empty, "dashboard queries without a finite series:\n" + "\n".join(empty)

        # per line: every acknowledged decision counted once, and its score observed once
        for line, n in per_line.items():
            assert prom.value(f'sum(inspection_line_decisions_total{{line="{line}"}})') == n
            assert prom.value(f'inspection_score_count{{line="{line}"}}') == n
            assert prom.value(f'inspection_score_bucket{{line="{line}", le="+Inf"}}') == n
        assert prom.value("sum(inspection_decisions_total)") == len(units)
        assert prom.value("sum(inspection_dlq_total)") == junk
        assert prom.value("inspection_join_timeouts_total") == len(incomplete)
        # the active share of the last batch is the share of experts with a non-zero load in that batch
        share = prom.query("inspection_experts_active_share")
        assert [s["metric"]["layer"] for s in share] == ["0"]
        active = prom.value("count(inspection_expert_load > 0) / count(inspection_expert_load)")
        assert 0.0 < float(share[0]["value"][1]) == active <= 1.0
        # one assignments counter per expert of the 4-expert layer
        assert len(prom.query("inspection_expert_assignments_total")) == 4
        # one lag series per owned input partition (3 topics x 3 partitions)
        assert len(prom.query("inspection_consumer_lag")) == 9


@pytest.mark.slow
def test_a_dead_letter_flood_and_a_stalled_loop_fire_their_alerts(broker, topics, unit_factory, service_config,
                                                                  run_service, publish, prometheus, tmp_path):
    units = small_units(unit_factory, 20, seed=52)
    with run_service(service_config(), broker.bootstrap) as service:
        target = f"127.0.0.1:{service.metrics_port}"
        prom = prometheus(target, alerts_with_zero_for(tmp_path))
        publish(units, topics)
        wait_until(lambda: service.stats.decisions_acked == len(units), "the decisions")
        # one dead letter first: the flood below is then an increase of a series Prometheus already has
        publish_malformed(broker.bootstrap, topics.vision, 1)
        prom.wait_until(lambda: prom.value("sum(inspection_dlq_total)") == 1.0
                        and prom.value("sum(inspection_readings_total)") == 3 * len(units), "the first dead letter")
        seen = time.time()
        prom.wait_until(lambda: prom.evaluated_after(seen), "an evaluation of the rules on that scrape")
        assert "InspectionDeadLetterRate" not in prom.firing()
        assert "InspectionMainLoopStalled" not in prom.firing()

        flood = 200
        publish_malformed(broker.bootstrap, topics.vision, flood, start=1)
        prom.wait_until(lambda: "InspectionDeadLetterRate" in prom.firing(), "the dead-letter alert", ALERT_WAIT_S)
        fired = [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "InspectionDeadLetterRate"]
        assert [(a["labels"]["job"], a["labels"]["instance"], a["labels"]["severity"]) for a in fired] == [
            ("inspection", target, "warning")]
        assert fired[0]["annotations"]["runbook"] == "docs/operations.md#inspectiondeadletterrate"
        wait_until(lambda: service.stats.dead_letters_acked == 1 + flood, "the flood's dead letters")

        # the main loop needs the service's condition lock every turn: holding it stalls the loop (the scrape
        # thread never takes it), and letting go resumes it
        with service._cv:
            prom.wait_until(lambda: "InspectionMainLoopStalled" in prom.firing(), "the stall alert", ALERT_WAIT_S)
            assert prom.value("inspection_main_loop_age_seconds") > 15
        prom.wait_until(lambda: "InspectionMainLoopStalled" not in prom.firing(), "the stall alert to resolve")
        assert prom.value("inspection_ready") == 1.0
