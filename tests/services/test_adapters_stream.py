"""The stream service with per-line adapters: each unit's adapter is picked by its ``ce_lineid`` header.

Real parts throughout: the small model in a real model store with a LoRA adapter for one line saved beside it,
the session's Kafka broker, real composite units published on two lines, decisions read back from the broker.
"""

from __future__ import annotations

import dataclasses

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
