"""The Grafana dashboard of the stream service, generated from code.

``python -m ops.dashboard`` (from the repository root) writes ``ops/grafana-dashboard.json``;
``python -m ops.dashboard --check`` exits 1 when that file differs from what this module builds (the tests
run the same comparison). Edit the panels here, never the JSON by hand.

The JSON is in Grafana's export format: importing it asks for a Prometheus data source (``DS_PROMETHEUS``).
Every query selects ``instance=~"$instance"`` (a variable listing the instances that export
``inspection_ready``) and rates over ``$__rate_interval``. Rows, top to bottom: throughput, latency, batching
and queues, input and dead letters, model health, decisions per line (see docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where ``python -m ops.dashboard`` writes the dashboard.
DASHBOARD_PATH = Path(__file__).with_name("grafana-dashboard.json")
UID = "inspection-service"
TITLE = "Inspection stream service"
#: The data source the importer picks (Grafana's ``__inputs`` convention).
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: Label selector every query carries.
S = 'instance=~"$instance"'
RATE = "$__rate_interval"

_WIDTH = 24  # Grafana's grid columns
_PANEL_H = 8


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend (``{{label}}`` placeholders)."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A time-series panel: title, what it shows, its unit (Grafana unit id) and queries."""

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantiles(metric: str, by: str, qs: Sequence[float], extra: str = "") -> tuple[Target, ...]:
    sel = f"{S}{', ' + extra if extra else ''}"
    group = f"{by}, le" if by else "le"
    return tuple(Target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
                        f"p{round(q * 100):d}" + (f" {{{{{by}}}}}" if by else "")) for q in qs)


#: Normalised gate entropy: mean entropy over log(experts) of each instance's layer, in [0, 1].
_NORMALISED_ENTROPY = (f"avg by (layer) (inspection_gate_entropy{{{S}}} / on (job, instance, layer) "
                       f"ln(count by (job, instance, layer) (inspection_expert_load{{{S}}})))")

ROWS: tuple[Row, ...] = (
    Row("Throughput", (
        Panel("Units decided", "Units closed by the join per second, by what closed them (complete, timeout, "
              "watermark, capacity, flush).", "ops",
              (Target(f"sum by (closed_by) (rate(inspection_units_total{{{S}}}[{RATE}]))", "{{closed_by}}"),)),
        Panel("Decisions", "Decisions acknowledged by the broker per second, by decision.", "ops",
              (Target(f"sum by (decision) (rate(inspection_decisions_total{{{S}}}[{RATE}]))", "{{decision}}"),)),
        Panel("Readings", "Readings decoded and joined per second, by modality.", "ops",
              (Target(f"sum by (modality) (rate(inspection_readings_total{{{S}}}[{RATE}]))", "{{modality}}"),)),
    )),
    Row("Latency", (
        Panel("p99 latency per stage", "99th percentile of each pipeline stage: decode, join, queue, prepare, "
              "score, produce, report, end_to_end.", "s",
              _quantiles("inspection_stage_seconds", "stage", (0.99,))),
        Panel("p50 latency per stage", "Median of each pipeline stage.", "s",
              _quantiles("inspection_stage_seconds", "stage", (0.5,))),
        Panel("End-to-end latency", "Newest reading of a unit to its decision's acknowledgement; the "
              "InspectionLatencyP99High alert fires above 5 s.", "s",
              _quantiles("inspection_stage_seconds", "", (0.5, 0.9, 0.99), 'stage="end_to_end"'), (5.0,)),
    )),
    Row("Batching and queues", (
        Panel("Batch size", "Units per forward pass (median, 95th percentile, mean) and the batch limit.", "none",
              _quantiles("inspection_batch_size", "", (0.5, 0.95)) + (
                  Target(f"sum(rate(inspection_batch_size_sum{{{S}}}[{RATE}])) / "
                         f"sum(rate(inspection_batch_size_count{{{S}}}[{RATE}]))", "mean"),
                  Target(f"max(inspection_batch_limit{{{S}}})", "limit"))),
        Panel("Queue depth", "Units closed and not yet acknowledged, units waiting in the join, and 1 while "
              "input is held back by backpressure.", "none",
              (Target(f"sum by (instance) (inspection_queue_depth{{{S}}})", "queued {{instance}}"),
               Target(f"sum by (instance) (inspection_pending_units{{{S}}})", "joining {{instance}}"),
               Target(f"max by (instance) (inspection_input_paused{{{S}}})", "paused {{instance}}"))),
        Panel("Consumer lag", "Records on the broker after each member's fetch position, per input topic.",
              "none", (Target(f"sum by (topic) (inspection_consumer_lag{{{S}}})", "{{topic}}"),)),
    )),
    Row("Input and dead letters", (
        Panel("Dead letters by reason", "Records dead-lettered per second, by stage and reason code.", "ops",
              (Target(f"sum by (stage, reason) (rate(inspection_dlq_total{{{S}}}[{RATE}]))",
                      "{{stage}}/{{reason}}"),)),
        Panel("Join timeouts", "Share of the units closed by the join timeout (decided without a missing "
              "reading); the InspectionJoinTimeouts alert fires above 10 %.", "percentunit",
              (Target(f"sum(rate(inspection_join_timeouts_total{{{S}}}[{RATE}])) / "
                      f"sum(rate(inspection_units_total{{{S}}}[{RATE}]))", "timeouts"),), (0.1,)),
        Panel("Readiness and main loop", "1 while /readyz answers 200, and seconds since the main loop last "
              "ran (the InspectionMainLoopStalled alert fires above 15 s).", "none",
              (Target(f"min by (instance) (inspection_ready{{{S}}})", "ready {{instance}}"),
               Target(f"max by (instance) (inspection_main_loop_age_seconds{{{S}}})", "loop age {{instance}}"))),
    )),
    Row("Model health", (
        Panel("Expert load (last batch)", "Share of the routed assignments per expert in each instance's last "
              "batch, averaged over instances.", "percentunit",
              (Target(f"avg by (layer, expert) (inspection_expert_load{{{S}}})", "layer {{layer}} expert {{expert}}"),)),
        Panel("Expert load (window)", "Share of the routed assignments per expert over the rate window, from "
              "the assignment counters (free of one batch's noise).", "percentunit",
              (Target(f"sum by (layer, expert) (rate(inspection_expert_assignments_total{{{S}}}[{RATE}])) / on "
                      f"(layer) group_left sum by (layer) (rate(inspection_expert_assignments_total{{{S}}}"
                      f"[{RATE}]))", "layer {{layer}} expert {{expert}}"),)),
        Panel("Gate entropy", "Mean router entropy over log(experts): 0 = every token on the same experts, 1 = "
              "no preference; the InspectionGateEntropyOutOfBand alert fires outside [0.3, 0.99].", "percentunit",
              (Target(_NORMALISED_ENTROPY, "layer {{layer}}"),), (0.3, 0.99)),
        Panel("Active experts and imbalance", "Share of the experts that got at least one token in the last "
              "batch, and the busiest expert's load over its fair share (1 = balanced).", "none",
              (Target(f"avg by (layer) (inspection_experts_active_share{{{S}}})", "active share layer {{layer}}"),
               Target(f"max by (layer) (inspection_expert_max_load_ratio{{{S}}})", "max/fair layer {{layer}}"))),
        Panel("Drift p-values", "p-value of the latest two-sample KS test of each modality's scores against "
              "their reference window (drift below drift.alpha, 0.05 by default).", "none",
              (Target(f"min by (modality) (inspection_drift_p_value{{{S}}})", "{{modality}}"),), (0.05,)),
    )),
    Row("Decisions per line", (
        Panel("Decisions per line", "Decisions acknowledged per second, by line and decision.", "ops",
              (Target(f"sum by (line, decision) (rate(inspection_line_decisions_total{{{S}}}[{RATE}]))",
                      "{{line}} {{decision}}"),)),
        Panel("Defect share per line", "Share of each line's decisions that are defects.", "percentunit",
              (Target(f'sum by (line) (rate(inspection_line_decisions_total{{{S}, decision="defect"}}[{RATE}])) / '
                      f"sum by (line) (rate(inspection_line_decisions_total{{{S}}}[{RATE}]))", "{{line}}"),)),
        Panel("Score per line", "Median and 90th percentile of the defect score of each line's decisions.",
              "none", _quantiles("inspection_score", "line", (0.5, 0.9))),
    )),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, Any]:
    steps = [{"color": "green", "value": None}] + [
        {"color": "red", "value": value} for value in panel.thresholds]
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": _PANEL_H, "w": width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if panel.thresholds else "off"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend, "refId": chr(65 + i)}
                    for i, t in enumerate(panel.targets)],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (export format, with ``__inputs`` for the data source)."""
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": _WIDTH, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        width = _WIDTH // len(row.panels) if len(row.panels) <= 3 else _WIDTH // 3
        for i, panel in enumerate(row.panels):
            column = i % (_WIDTH // width)
            if i and column == 0:
                y += _PANEL_H
            panels.append(_panel_json(panel, next_id, column * width, y, width))
            next_id += 1
        y += _PANEL_H
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}],
        "uid": UID,
        "title": TITLE,
        "description": "Throughput, latency, queues, dead letters, MoE and model health of `inspection serve`; "
                       "generated by ops/dashboard.py.",
        "tags": ["inspection"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "templating": {"list": [{
            "name": "instance",
            "label": "Instance",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": "label_values(inspection_ready, instance)", "refId": "instance"},
            "definition": "label_values(inspection_ready, instance)",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }]},
        "panels": panels,
    }


def render() -> str:
    """The dashboard's JSON text, exactly as committed."""
    return json.dumps(dashboard(), indent=2) + "\n"


def queries(model: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of a dashboard model (default: :func:`dashboard`)."""
    model = dashboard() if model is None else model
    return [(p["title"], t["expr"]) for p in model["panels"] if p["type"] != "row" for t in p["targets"]]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboard (or, with ``--check``, compare it); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m ops.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DASHBOARD_PATH, help="where to write the JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated JSON")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != text:
            sys.stderr.write(f"{args.output} is not what ops/dashboard.py generates: run python -m ops.dashboard\n")
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
