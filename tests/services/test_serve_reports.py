"""Explanation reports from the stream: written before each selected decision is sent, so its link resolves."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]


def test_defect_decisions_link_to_level2_reports_written_before_they_are_sent(
        broker, topics, unit_factory, service_config, run_service, publish, read_topic, parse_decisions,
        metric_value, tmp_path):
    rng = np.random.default_rng(8)
    units = [unit_factory(i, rng) for i in range(24)]
    folder = tmp_path / "reports"
    config = service_config(reports={"dir": str(folder), "units": "defects", "level": 2, "budget": 128})
    with run_service(config, broker.bootstrap) as service:
        publish(units, topics)
        decisions = parse_decisions(read_topic(topics.decisions, len(units)))
        written = metric_value(service, "inspection_reports_total", result="written")
        failed = metric_value(service, "inspection_reports_total", result="failed")
    defects = [d for d in decisions if d.decision == "defect"]
    assert len(decisions) == len(units) and defects and len(defects) < len(units)
    assert failed == 0 and written == len(defects)
    for d in decisions:
        if d.decision == "ok":
            assert d.report_url is None
            continue
        path = Path(unquote(urlparse(d.report_url).path))
        assert d.report_url.startswith("file://") and path.is_file() and path.parent == folder.resolve()
        report = json.loads(path.with_suffix(".json").read_text())
        assert report["decision"]["id"] == d.id and report["unit_id"] == d.unit_id
        assert report["explanation"]["level"] == 2 and report["explanation"]["budget"] <= 128 + 8
        assert report["decision"]["score"] == pytest.approx(d.score)
        assert d.unit_id in path.read_text()
    assert not list(folder.glob(".tmp-*"))  # every file was renamed into place whole


def test_a_budget_too_small_for_the_model_is_refused_at_start(broker, topics, service_config, tmp_path):
    from inspection.errors import ConfigError
    from services.serve import StreamService

    config = service_config(reports={"dir": str(tmp_path / "r"), "budget": 16})
    with pytest.raises(ConfigError, match="need at least 100 model evaluations"):
        StreamService(config, broker.bootstrap).run()
