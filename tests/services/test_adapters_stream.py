"""The stream service with per-line adapters: each unit's adapter is picked by its ``ce_lineid`` header, a promote
or rollback of a line's adapter reaches the running service between batches, and the explanation reports of
adapted decisions are made with the adapter in place.

Real parts throughout: the small model in a real model store with a LoRA adapter for one line saved beside it,
the session's Kafka broker, real composite units published on two lines, decisions read back from the broker,
adapters promoted and rolled back with the ``inspection adapters`` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch

from inspection.adapters import AdapterConfig, save_adapter, train_adapter
from inspection.records import InputCoordinate, Label, Unit
from inspection.store import ModelStore
from inspection.training import TrainConfig
from services.join import JoinedUnit
from services.scoring import load_serving_model, score_units

pytestmark = [pytest.mark.slow, pytest.mark.data]

#: Stream and direct scores run the same fp32 model and adapters on micro-batches of different composition;
#: float32 GEMMs of other row counts sum in another order (logits differ by a few 1e-6).
SCORE_ATOL = 1e-5


def relined(unit: Unit, line: str) -> Unit:
    parts = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    return dataclasses.replace(unit, line_id=line, **parts)


@pytest.fixture(scope="module")
def adapted_store(tmp_path_factory, serving_store_factory, composite_units):
    """The small served model with an adapter for line ``adapted`` (trained on 48 composite units of it)."""
    from inspection.model import InspectionModel, ModelConfig

    root = serving_store_factory(tmp_path_factory.mktemp("adapted") / "store")
    store = ModelStore(root)
    base = store.promoted()
    state, card = store.load(base.version)
    model = InspectionModel.from_state(ModelConfig.from_dict(card["model_config"]), state).eval()
    # the small model's classes are ok / defect: the composite units' defect classes become "defect"
    units = [dataclasses.replace(relined(u, "adapted"), label=Label(
        u.label.defect, "defect" if u.label.defect else "ok", u.label.culprits)) for u in composite_units[900:960]]
    result = train_adapter(model, units[:48], units[48:], "adapted", AdapterConfig(rank=4),
                           TrainConfig(epochs=2, batch_size=16, lr=3e-2, device="cpu", amp=False))
    save_adapter(store, base.version, "adapted", result)
    return root


def test_the_service_picks_each_units_adapter_by_its_line(broker, topics, composite_units, adapted_store,
                                                          service_config, run_service, publish, read_topic,
                                                          parse_decisions):
    units = [relined(u, "adapted" if i % 2 else "plain") for i, u in enumerate(composite_units[:40])]
    config = service_config(model={"store": str(adapted_store)}, join={"timeout_s": 30.0})
    with run_service(config, broker.bootstrap):
        publish(units, topics)
        decisions = parse_decisions(read_topic(topics.decisions, len(units)))
    assert len(decisions) == len(units)
    by_unit = {d.unit_id: d for d in decisions}
    serving = load_serving_model(ModelStore(adapted_store), None, torch.device("cpu"))
    adapter = serving.adapters.lines["adapted"]
    joined = [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                         0.0) for i, u in enumerate(units)]
    direct = {s.decision.unit_id: s.decision for s in score_units(serving, joined).scored}
    plain = {s.decision.unit_id: s.decision
             for s in score_units(dataclasses.replace(serving, adapters=None), joined).scored}
    moved = []
    for u in units:
        d = by_unit[u.unit_id]
        assert d.line_id == u.line_id
        assert d.score == pytest.approx(direct[u.unit_id].score, abs=SCORE_ATOL)
        if u.line_id == "adapted":
            assert d.model_version == f"{serving.version}+adapted:{adapter.version}"
            assert d.threshold == pytest.approx(adapter.threshold, abs=1e-7)
            assert d.threshold_version == adapter.threshold_version
            moved.append(abs(d.score - plain[u.unit_id].score))
        else:
            assert d.model_version == serving.version and d.threshold_version == serving.threshold_version
            assert d.score == pytest.approx(plain[u.unit_id].score, abs=SCORE_ATOL)
    assert np.max(moved) > 1e-3  # the adapter changes its line's scores: the checks above can tell lines apart


def wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def adapters_cli(*argv: str) -> dict:
    """``inspection adapters ARGV`` in this process; its JSON answer."""
    from services.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["adapters", *argv]) == 0
    return json.loads(out.getvalue())


def test_a_running_service_follows_adapter_promotions_and_explains_with_the_adapter_it_decided_with(
        broker, topics, composite_units, adapted_store, service_config, run_service, publish, read_topic,
        parse_decisions, metric_value, tmp_path):
    from inspection.adapters import adapter_store, load_adapter

    root = tmp_path / "store"
    shutil.copytree(adapted_store, root)
    family = ModelStore(root)
    base = family.promoted()
    state, card = load_adapter(family, base, "adapted")
    v1 = card["version"]
    # a second version of the line's adapter: every low-rank update 2.25 times as large, its own threshold
    store_fields = ("version", "created", "weights_file", "weights_sha256", "weights_bytes", "tensors", "format",
                    "threshold")
    v2 = adapter_store(family, base.version, "adapted").save(
        {**{k: 1.5 * t for k, t in state.items()}, "thresholds": torch.tensor([0.4])},
        {**{k: v for k, v in card.items() if k not in store_fields}, "threshold_version": "t-second"},
        promote=False).version
    phases = [("v1", v1, 0), ("v2", v2, 6), ("rolled back", v1, 12)]
    units = [relined(u, "adapted" if i % 2 else "plain") for i, u in enumerate(composite_units[100:118])]
    folder = tmp_path / "reports"
    config = service_config(model={"store": str(root), "reload_interval_s": 0.2}, join={"timeout_s": 30.0},
                            reports={"dir": str(folder), "units": "all", "level": 2, "budget": 128})
    with run_service(config, broker.bootstrap) as service:
        assert service.adapter_versions == {"adapted": v1}
        for what, version, start in phases:
            if what == "v2":
                assert adapters_cli("promote", v2, "--store", str(root), "--line", "adapted")["promoted"] == v2
            elif what == "rolled back":
                assert adapters_cli("rollback", "--store", str(root), "--line", "adapted")["promoted"] == v1
            wait_until(lambda version=version: service.adapter_versions == {"adapted": version},
                       f"the service to serve adapter {version} ({what})")
            publish(units[start:start + 6], topics)
            wait_until(lambda start=start: service.stats.decisions_acked == start + 6, f"the decisions ({what})")
        reloads = metric_value(service, "inspection_model_reloads_total", result="ok")
        reports_failed = metric_value(service, "inspection_reports_total", result="failed")
    assert reloads == 2 and reports_failed == 0
    by_unit = {d.unit_id: d for d in parse_decisions(read_topic(topics.decisions, len(units)))}
    assert len(by_unit) == len(units)
    moved = 0.0
    for what, version, start in phases:
        part = units[start:start + 6]
        # what this phase's adapter gives these units, scored directly with exactly that adapter version
        serving = load_serving_model(family, None, torch.device("cpu"), adapters={"adapted": version})
        direct = {s.decision.unit_id: s.decision for s in score_units(serving, [
            JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(part)]).scored}
        other = load_serving_model(family, None, torch.device("cpu"),
                                   adapters={"adapted": v2 if version == v1 else v1})
        swapped = {s.decision.unit_id: s.decision.score for s in score_units(other, [
            JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(part)]).scored}
        for u in part:
            d = by_unit[u.unit_id]
            assert d.score == pytest.approx(direct[u.unit_id].score, abs=SCORE_ATOL), (what, u.line_id)
            assert d.threshold == pytest.approx(direct[u.unit_id].threshold, abs=1e-7)
            if u.line_id == "adapted":
                assert d.model_version == f"{base.version}+adapted:{version}", what
                assert d.threshold_version == ("t-second" if version == v2 else card["threshold_version"])
                moved = max(moved, abs(d.score - swapped[u.unit_id]))
            else:
                assert d.model_version == base.version and d.threshold_version == serving.threshold_version
            # the report of every decision: written with the adapter the decision was made with
            path = Path(unquote(urlparse(d.report_url).path))
            report = json.loads(path.with_suffix(".json").read_text())
            exp = report["explanation"]
            assert report["model_version"] == d.model_version and report["decision"]["id"] == d.id
            assert report["decision"]["score"] == d.score and exp["level"] == 2
            # v(all) is the decision's own logit: its baseline plus its modality Shapley values, as the stream
            # recorded them (not recomputed from the report), and the report's modality values are the stream's
            stream = d.attributions
            assert exp["modality"]["value_full"] == pytest.approx(
                stream["baseline_logit"] + sum(stream["modality"].values()), abs=1e-4)
            assert exp["modality"]["phi"] == pytest.approx(stream["modality"], abs=1e-4)
            # level 2 ran the same model as the decision: the region, band and segment values add up to its logit
            assert abs(exp["efficiency_gap"]) < 1e-4, (what, u.line_id, exp["efficiency_gap"])
            assert f"model {d.model_version}" in path.read_text()
    assert moved > 1e-3  # the two adapter versions score the line differently: the checks above tell them apart
